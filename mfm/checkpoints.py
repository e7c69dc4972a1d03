"""Resumable training checkpoints: written atomically with a fallback copy, read with
``weights_only=True``, and tied to the settings that made them.

The checkpoint a new one replaces is kept as ``<name>.prev.pt`` until the run finishes, so a
kill while writing or a full disk costs at most the steps since the one before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mfm.errors import UserError
from mfm.io import save_torch

log = logging.getLogger("mfm")

CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "global_step", "history", "fingerprint"}


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before the latest one is kept, the fallback if that is torn."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def fingerprint(config: dict[str, Any]) -> str:
    """Short stable hash of the settings a checkpoint was trained with."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def write_checkpoint(state: dict[str, Any], path: Path, complete: bool) -> None:
    """Save ``state``; the checkpoint it replaces becomes the fallback copy, which a finished
    run (``complete``) no longer needs."""
    if path.is_file():
        os.replace(path, previous_checkpoint(path))
    save_torch(state, path)
    if complete:
        previous_checkpoint(path).unlink(missing_ok=True)


def read_checkpoint(path: Path, desc: str) -> dict[str, Any] | None:
    """The newest readable checkpoint: the latest, else the one before it (a kill while
    writing, a full disk). None if there is none; a UserError if none is readable."""
    candidates = [p for p in (path, previous_checkpoint(path)) if p.is_file()]
    problems = []
    for candidate in candidates:
        try:
            ckpt = torch.load(candidate, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or not set(ckpt) >= CHECKPOINT_KEYS:
                raise ValueError("not a training checkpoint")
        except Exception as err:  # noqa: BLE001 - a torn, truncated or foreign file
            problems.append(f"{candidate} ({err.__class__.__name__})")
            log.warning("%s: checkpoint %s is unreadable", desc, candidate)
            continue
        if problems:
            log.warning("%s: falling back to the previous checkpoint", desc)
        return ckpt
    if problems:
        raise UserError(
            f"{desc}: no readable checkpoint: {'; '.join(problems)}; delete "
            f"{' and '.join(p.split(' (')[0] for p in problems)} to train from scratch"
        )
    return None
