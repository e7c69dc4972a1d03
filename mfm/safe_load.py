"""Reading checkpoints made by other code without running any of it.

``torch.load(weights_only=True)`` executes nothing, but refuses every class it does not know.
Released checkpoints carry a few harmless ones: the authors' (SimMIM-style) files pickle their
yacs ``CfgNode`` config, MAE-style files an ``argparse.Namespace``. Those two names are mapped
to inert stand-ins (a plain mapping and an attribute record), so the config can still be read;
a file that needs any other class is refused with the names it asks for.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from mfm.errors import UserError


class ArgsRecord:
    """Stands in for ``argparse.Namespace``: pickle restores its ``__dict__``, nothing runs."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# A yacs CfgNode is a dict subclass that pickles as NEWOBJ + SETITEMS + BUILD: OrderedDict is
# the one mapping torch's restricted unpickler both fills item by item and gives a __dict__.
INERT_STAND_INS: list[tuple[type, str]] = [
    (OrderedDict, "yacs.config.CfgNode"),
    (ArgsRecord, "argparse.Namespace"),
]


def load_foreign_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as plain containers and tensors, read with
    ``weights_only=True`` and the stand-ins above; a UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; give the path of a .pth/.pt file")
    try:
        with torch.serialization.safe_globals(INERT_STAND_INS):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(_refusal(path, err)) from None
    except Exception as err:  # noqa: BLE001 - a torn, truncated or non-torch file
        raise UserError(
            f"{path} is not a readable torch checkpoint ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:120]}); check the download (size, checksum)"
        ) from None
    if not isinstance(blob, dict):
        raise UserError(
            f"{path} holds a {type(blob).__name__}, not a dict of weights; "
            "save the model's state_dict() (or a dict with one under 'model')"
        )
    return blob


def _refusal(path: Path, err: Exception) -> str:
    """One line naming the classes the file would need to execute on load."""
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: keep torch's own reason
        wanted = []
    known = {name for _, name in INERT_STAND_INS}
    unknown = sorted(set(wanted) - known)
    what = ", ".join(unknown) if unknown else str(err).splitlines()[0][:160]
    return (
        f"{path} is refused: loading it would run code from {what}; only tensors, plain "
        "containers, a yacs config and an argparse namespace are read. Re-save its weights "
        "as a plain dict (torch.save({'model': model.state_dict()}, path)) where you trust it"
    )
