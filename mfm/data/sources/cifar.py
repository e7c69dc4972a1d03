"""CIFAR-10/100 through torchvision's own classes: its md5 checks, download and pickle parsing.

torchvision wants the folder *holding* ``cifar-10-batches-py/`` (or ``cifar-100-python/``);
``data.root`` may name either that folder or the release folder itself. Without
``data.root`` the data lives in (and downloads go to) ``data/raw``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mfm.config import DataParams, Params
from mfm.data.sources import common
from mfm.data.sources.common import ArrayData
from mfm.errors import UserError

TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _dataset_class(dataset: str) -> Any:
    """torchvision's class for ``dataset``, looked up on each call (tests replace it)."""
    import torchvision.datasets

    return getattr(torchvision.datasets, TORCHVISION_CLASSES[dataset])


def _root(data: DataParams, release: str) -> Path:
    """The folder holding the ``release`` folder: data.root (or its parent when data.root is
    the release folder itself), else data/raw."""
    root = Path(data.root).expanduser() if data.root else common.RAW_DIR
    return root.parent if root.name == release else root


def _bad_file(dataset_class: Any, folder: Path) -> str | None:
    """The first file of the release that is missing or fails torchvision's md5 check."""
    from torchvision.datasets.utils import check_integrity

    meta = dataset_class.meta
    files = [*dataset_class.train_list, *dataset_class.test_list, (meta["filename"], meta["md5"])]
    return next((name for name, md5 in files if not check_integrity(str(folder / name), md5)), None)


def _not_found(data: DataParams, folder: Path, dataset_class: Any) -> UserError:
    """torchvision's "Dataset not found or corrupted", as the one line that says which."""
    release = dataset_class.base_folder
    if not folder.is_dir():
        return UserError(
            f"{data.dataset} not found in {folder} (data.download is false); set data.download: "
            f"true (needs internet) or data.root to the folder holding {release}/"
        )
    bad = _bad_file(dataset_class, folder) or "a file"
    return UserError(
        f"{folder} is incomplete or corrupt ({bad} is missing or fails its md5 check); set "
        "data.download: true (needs internet) to fetch it again, or data.root to a complete copy"
    )


def _open(dataset_class: Any, root: Path, train: bool, data: DataParams) -> Any:
    """One split through torchvision (downloading first when allowed and needed)."""
    folder = root / dataset_class.base_folder
    try:
        return dataset_class(str(root), train=train, download=data.download)
    except Exception as err:  # network, disk, checksum: all reported the same way
        if isinstance(err, RuntimeError) and str(err).startswith("Dataset"):
            raise _not_found(data, folder, dataset_class) from None
        if not data.download:
            raise
        reason = f"{err.__class__.__name__}: {err}".splitlines()[0]
        raise UserError(
            f"{data.dataset} not found in {folder} and torchvision's download failed ({reason}); "
            f"set data.root to a folder holding {dataset_class.base_folder}/ (the python version)"
        ) from None


def load_cifar(params: Params) -> ArrayData:
    """CIFAR-10/100 as (N, 32, 32, 3) uint8 arrays with torchvision's labels and class names."""
    dataset_class = _dataset_class(params.data.dataset)
    root = _root(params.data, dataset_class.base_folder)
    train = _open(dataset_class, root, True, params.data)
    test = _open(dataset_class, root, False, params.data)
    return ArrayData(
        np.ascontiguousarray(train.data, dtype=np.uint8),
        np.asarray(train.targets, dtype=np.int64),
        np.ascontiguousarray(test.data, dtype=np.uint8),
        np.asarray(test.targets, dtype=np.int64),
        [str(name) for name in train.classes],
        str(root / dataset_class.base_folder),
    )
