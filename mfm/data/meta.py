"""``meta.json``: what every stage after prepare needs to know about the prepared data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mfm.errors import UserError
from mfm.io import write_json

Kind = Literal["arrays", "manifest"]
Split = Literal["train", "test"]

META_FILE = "meta.json"
PREPARE_HINT = "run `dvc repro prepare` (or python -m mfm prepare) first"


class DatasetMeta(BaseModel):
    """The prepared data set's kind, classes, channels, size, statistics and origin."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    kind: Kind
    classes: list[str]
    num_classes: int
    channels: Literal[1, 3]
    image_size: tuple[int, int] | None
    mean: list[float]
    std: list[float]
    num_train: int
    num_test: int
    source: str


def load_meta(prepared_dir: str | Path, dataset: str | None = None) -> DatasetMeta:
    """Read ``meta.json``; a missing or damaged one means prepare has to run (again).

    With ``dataset``, data prepared for another ``data.dataset`` is refused, so a stage run by
    hand after a params change never trains on stale data.
    """
    path = Path(prepared_dir) / META_FILE
    again = PREPARE_HINT.replace("first", "again")
    if not path.is_file():
        raise UserError(f"{path} not found; {PREPARE_HINT}")
    try:
        meta = DatasetMeta.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err.__class__.__name__}); {again}") from None
    if dataset is not None and meta.dataset != dataset:
        raise UserError(
            f"{prepared_dir} holds {meta.dataset!r} but data.dataset is {dataset!r}; {again}"
        )
    return meta


def save_meta(meta: DatasetMeta, prepared_dir: str | Path) -> None:
    """Write ``meta.json`` (atomically, like every output)."""
    write_json(Path(prepared_dir) / META_FILE, meta.model_dump(mode="json"))
