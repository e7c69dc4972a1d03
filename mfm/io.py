"""Atomic file writes: a killed stage never leaves a half-written output behind.

Everything is written next to its final path under a temporary name and renamed into place
with ``os.replace``, which is atomic on POSIX file systems. DVC and Snakemake therefore only
ever see complete outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from a team
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; swap it in for ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | Path, path: str | Path) -> None:
    """Put the finished directory ``src`` in place of ``path`` (two renames, no copy)."""
    src, path = Path(src), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(src, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, path)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (imported lazily so light commands stay torch-free)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
