"""The prepared on-disk format every training stage reads (written once by prepare).

* ``arrays`` (small data sets): ``{train,test}_images.npy`` (N, H, W, C) uint8 and
  ``{train,test}_labels.npy`` (N,) int64;
* ``manifest`` (image folders such as ImageNet, never copied): ``{train,test}.csv`` with
  ``path,label`` rows;

plus ``meta.json`` (:class:`mfm.data.meta.DatasetMeta`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mfm.data.meta import PREPARE_HINT, DatasetMeta, save_meta
from mfm.data.sources.common import ArrayData, SourceData
from mfm.errors import UserError


def _write_manifest(path: Path, rows: Sequence[tuple[str, int]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


def write_prepared(data: SourceData, meta: DatasetMeta, out_dir: str | Path) -> None:
    """Write the prepared format into ``out_dir`` (callers pass a temporary folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(data, ArrayData):
        for split in tqdm(("train", "test"), desc="write", unit="split", disable=None):
            np.save(out_dir / f"{split}_images.npy", getattr(data, f"{split}_images"))
            np.save(out_dir / f"{split}_labels.npy", getattr(data, f"{split}_labels"))
    else:
        _write_manifest(out_dir / "train.csv", data.train)
        _write_manifest(out_dir / "test.csv", data.test)
    save_meta(meta, out_dir)


def read_manifest(path: str | Path, root: str | Path | None = None) -> tuple[list[str], list[int]]:
    """Paths and labels of a manifest CSV; relative paths are taken from ``root``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; {PREPARE_HINT}")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    base = Path(root) if root else path.parent
    try:
        paths = [str(base / row["path"]) for row in rows]
        labels = [int(row["label"]) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{path} is not a path,label manifest; {PREPARE_HINT.replace('first', 'again')}"
        ) from None
    return paths, labels
