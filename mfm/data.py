"""Datasets: where each one's files come from, the prepared on-disk format, and the loaders.

``prepare`` turns any source into one of two formats under one folder (``data/prepared``):

* ``arrays`` (small data sets): ``{train,test}_images.npy`` (N, H, W, C) uint8,
  ``{train,test}_labels.npy`` (N,) int64;
* ``manifest`` (image folders such as ImageNet, never copied): ``{train,test}.csv`` with
  ``path,label`` rows;

plus ``meta.json`` (:class:`DatasetMeta`). Training stages only ever read that folder, through
:func:`image_dataset`, :func:`make_loader`, :func:`device_augment` and :func:`normalizer`.
Workers only decode and (for manifests) crop to uint8; float conversion and the batched
augmentations run on the training device.
"""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mfm.config import DataParams, Params
from mfm.distributed import GlobalBatchShard, World, per_rank_batch
from mfm.errors import UserError
from mfm.io import write_json

Kind = Literal["arrays", "manifest"]
Split = Literal["train", "test"]

META_FILE = "meta.json"
RAW_DIR = Path("data/raw")  # where downloads go (relative to the project root)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875
REFETCH = "delete it and fetch the data set again"
PREPARE_HINT = "run `dvc repro prepare` (or python -m mfm prepare) first"

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_ROOT_HINT = "a folder holding train-images-idx3-ubyte.gz and the other three IDX files"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------- meta


class DatasetMeta(BaseModel):
    """What every later stage needs to know about the prepared data (``meta.json``)."""

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


# --------------------------------------------------------------------------- sources


@dataclass
class ArrayData:
    """A small data set held in memory: images (N, H, W, C) uint8, labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    source: str
    kind: Kind = "arrays"


@dataclass
class ManifestData:
    """An image-folder data set as (path, label) lists: the files stay where they are."""

    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    source: str
    channels: Literal[1, 3] = 3
    kind: Kind = "manifest"


SourceData = ArrayData | ManifestData


def _as_images(array: np.ndarray) -> np.ndarray:
    """(N, H, W) grey or (N, H, W, C) -> (N, H, W, C) uint8, the one arrays layout."""
    array = np.asarray(array, dtype=np.uint8)
    return array[..., None] if array.ndim == 3 else array


# IDX (MNIST family) -------------------------------------------------------------

IDX_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """Read a file, gunzipping when it is gzip (by content, not by name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(
            f"{path} is unreadable or truncated ({err.__class__.__name__}); {REFETCH}"
        ) from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (big-endian header).

    Checks the magic number and that the payload has exactly the size the header promises,
    so a truncated download is caught here rather than as a wrong shape during training.
    """
    path = Path(path)
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != IDX_UBYTE or data[3] != ndim:
        expected = 0x800 + ndim
        raise UserError(
            f"{path} is not an IDX file of {ndim}-d bytes (magic {expected:#06x}); {REFETCH}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(data) - header != size:
        got = len(data) - header
        raise UserError(
            f"{path} is truncated or corrupt ({got} bytes of {size} expected); {REFETCH}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` inside ``folder``, whichever exists."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``folder``, or None unless all four are there."""
    found = {key: _idx_file(folder, name) for key, name in FASHION_FILES.items()}
    if any(path is None for path in found.values()):
        return None
    return {key: path for key, path in found.items() if path is not None}


def _fashion_candidates(data: DataParams) -> list[Path]:
    """Folders to search, in order: data.root (plain or torchvision layout), Debian, data/raw."""
    places: list[Path] = []
    if data.root:
        root = Path(data.root).expanduser()
        places += [root, root / "FashionMNIST" / "raw"]
    places += [DEBIAN_FASHION_MNIST, RAW_DIR / "FashionMNIST" / "raw"]
    return places


def _download_fashion_mnist() -> str | None:
    """torchvision's download into ``RAW_DIR``; returns the failure reason, None on success."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(RAW_DIR), train=True, download=True)
    except Exception as err:  # network, disk, checksum: all reported the same way
        return f"{err.__class__.__name__}: {err}".splitlines()[0]
    return None


def _find_fashion_mnist(data: DataParams) -> Path:
    """The first folder holding all four IDX files, downloading if allowed and needed."""
    places = _fashion_candidates(data)
    for folder in places:
        if _fashion_files(folder):
            return folder
    looked = ", ".join(str(p) for p in places)
    if data.download:
        reason = _download_fashion_mnist()
        folder = RAW_DIR / "FashionMNIST" / "raw"
        if reason is None and _fashion_files(folder):
            return folder
        raise UserError(
            f"Fashion-MNIST not found in {looked} and the download failed ({reason}); "
            f"run `apt-get install dataset-fashion-mnist` or set data.root to {FASHION_ROOT_HINT}"
        )
    raise UserError(
        f"Fashion-MNIST not found in {looked} (data.download is false); "
        "run `apt-get install dataset-fashion-mnist`, set data.download: true (needs internet), "
        f"or set data.root to {FASHION_ROOT_HINT}"
    )


def _read_split_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, checked to have the same length."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; replace the pair with matching files"
        )
    return _as_images(images), labels


def load_fashion_mnist(params: Params) -> ArrayData:
    """Fashion-MNIST from its IDX files (gz or not), wherever they are found first."""
    folder = _find_fashion_mnist(params.data)
    files = _fashion_files(folder) or {}
    pairs = [("train_images", "train_labels"), ("test_images", "test_labels")]
    arrays = [
        _read_split_pair(files[img], files[lab])
        for img, lab in tqdm(pairs, desc="fashion_mnist", unit="split", disable=None)
    ]
    (train_x, train_y), (test_x, test_y) = arrays
    return ArrayData(train_x, train_y, test_x, test_y, list(FASHION_CLASSES), str(folder))


# scikit-learn digits -------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_MAX_VALUE = 16


def load_digits_data(params: Params) -> ArrayData:
    """scikit-learn's 8x8 digits, scaled 0..16 -> 0..255, split 80/20 stratified and seeded."""
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    scaled = np.rint(bunch.images * (255 / DIGITS_MAX_VALUE))
    images = _as_images(np.clip(scaled, 0, 255))
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=params.runtime.seed,
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ArrayData(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        [str(name) for name in bunch.target_names],
        f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
    )


# CIFAR ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarLayout:
    """File names and keys of one CIFAR python release (as torchvision lays it out)."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    torchvision_class: str


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        torchvision_class="CIFAR10",
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        torchvision_class="CIFAR100",
    ),
}


def _cifar_folder(root: Path, layout: CifarLayout) -> Path | None:
    """``root/<release folder>`` (or ``root`` itself) when every file of the release is there."""
    names = (*layout.train_files, *layout.test_files, layout.meta_file)
    for folder in (root / layout.folder, root):
        if all((folder / name).is_file() for name in names):
            return folder
    return None


def _download_cifar(root: Path, layout: CifarLayout) -> str | None:
    """torchvision's download (with its md5 checks); returns the failure reason, None if fine."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, layout.torchvision_class)
    try:
        dataset_class(str(root), train=True, download=True)
    except Exception as err:  # network, disk, checksum: all reported the same way
        return f"{err.__class__.__name__}: {err}".splitlines()[0]
    return None


def _find_cifar(data: DataParams, layout: CifarLayout) -> Path:
    """The release folder under data.root (or data/raw), downloading it if allowed."""
    root = Path(data.root).expanduser() if data.root else RAW_DIR
    folder = _cifar_folder(root, layout)
    if folder is not None:
        return folder
    where = f"{root / layout.folder} and {root}"
    if not data.download:
        raise UserError(
            f"{data.dataset} not found in {where} (data.download is false); set data.download: "
            f"true (needs internet) or data.root to the folder holding {layout.folder}/"
        )
    reason = _download_cifar(root, layout)
    folder = _cifar_folder(root, layout)
    if reason is not None or folder is None:
        raise UserError(
            f"{data.dataset} not found in {where} and torchvision's download failed ({reason}); "
            f"set data.root to a folder holding {layout.folder}/ (the python version)"
        )
    return folder


def _text(value: Any) -> Any:
    """Python-2 pickles give bytes keys and names; make them str."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _load_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys (the files are trusted torchvision downloads)."""
    try:
        with path.open("rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
    except Exception as err:  # any unpickling failure means a damaged file
        raise UserError(
            f"{path} is not a readable CIFAR pickle ({err.__class__.__name__}); {REFETCH}"
        ) from None
    if not isinstance(entry, dict):
        raise UserError(f"{path} does not hold a CIFAR dict; {REFETCH}")
    return {_text(key): value for key, value in entry.items()}


def _read_cifar_batches(
    folder: Path, names: Sequence[str], layout: CifarLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR batches into (N, 32, 32, 3) uint8 images and int64 labels."""
    images, labels = [], []
    for name in tqdm(names, desc=layout.folder, unit="file", disable=None):
        path = folder / name
        entry = _load_pickle(path)
        if "data" not in entry or layout.label_key not in entry:
            raise UserError(f"{path} lacks 'data' or '{layout.label_key}'; {REFETCH}")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if (
            data.ndim != 2
            or data.shape[1] != 3 * 32 * 32
            or len(data) != len(entry[layout.label_key])
        ):
            raise UserError(f"{path} has data of shape {data.shape}; {REFETCH}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry[layout.label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def load_cifar(params: Params) -> ArrayData:
    """CIFAR-10/100 from torchvision's python batches (downloaded by torchvision if allowed)."""
    layout = CIFAR_LAYOUTS[params.data.dataset]
    folder = _find_cifar(params.data, layout)
    names_entry = _load_pickle(folder / layout.meta_file)
    if layout.names_key not in names_entry:
        path = folder / layout.meta_file
        raise UserError(f"{path} lacks '{layout.names_key}'; {REFETCH}")
    classes = [str(_text(name)) for name in names_entry[layout.names_key]]
    train_x, train_y = _read_cifar_batches(folder, layout.train_files, layout)
    test_x, test_y = _read_cifar_batches(folder, layout.test_files, layout)
    return ArrayData(train_x, train_y, test_x, test_y, classes, str(folder))


# Image folders (ImageNet layout) ---------------------------------------------------


def _is_image(entry: os.DirEntry[str]) -> bool:
    return entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of one split."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _list_images(class_dir: Path) -> list[str]:
    """Sorted absolute paths of the images in one class folder; empty is an error."""
    paths = sorted(entry.path for entry in os.scandir(class_dir) if _is_image(entry))
    if not paths:
        allowed = " ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(
            f"class folder {class_dir} holds no images ({allowed}); add images or remove the folder"
        )
    return paths


def _scan_split(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) rows for one split, labels indexing the training classes."""
    index = {name: i for i, name in enumerate(classes)}
    rows: list[tuple[str, int]] = []
    for name in tqdm(
        _class_folders(split_dir), desc=f"scan {split_dir.name}", unit="class", disable=None
    ):
        if name not in index:
            raise UserError(
                f"class folder {split_dir / name} has no counterpart in "
                f"{split_dir.parent / 'train'}; add it to train/ or remove it"
            )
        rows += [(path, index[name]) for path in _list_images(split_dir / name)]
    return rows


def load_imagefolder(params: Params) -> ManifestData:
    """``data.root/{train, val|test}/<class>/<image>`` as manifests; nothing is copied."""
    if not params.data.root:
        raise UserError(
            "data.dataset is imagefolder but data.root is not set; set data.root to a folder "
            "holding train/ and val/ (or test/) with one sub-folder per class"
        )
    root = Path(params.data.root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(
            f"data.root {root} does not exist; fix data.root (imagefolder needs train/ and val/ "
            "or test/ sub-folders of class folders)"
        )
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise UserError(
            f"{root} needs train/ and val/ (or test/) sub-folders of class folders; "
            "fix data.root or the folder layout"
        )
    classes = _class_folders(train_dir)
    if not classes:
        raise UserError(f"{train_dir} has no class folders; add one folder of images per class")
    train = _scan_split(train_dir, classes)
    test = _scan_split(test_dir, classes)
    return ManifestData(train, test, classes, str(root))


HEADER_CHECK_THREADS = 8  # header reads wait on the file system (network mounts above all)
HEADER_CHECK_CHUNK = 4096


def _unreadable(path: str) -> str | None:
    """Why Pillow cannot identify ``path`` as an image (it reads the header only), else None."""
    from PIL import Image

    try:
        with Image.open(path):
            return None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return err.__class__.__name__


def check_images(paths: Sequence[str]) -> None:
    """Open every image's header with Pillow (no pixel decoding), so that prepare, not a
    training run much later, names a garbage or non-image file."""
    from concurrent.futures import ThreadPoolExecutor

    bad: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="check images", unit="img", disable=None)
    with ThreadPoolExecutor(HEADER_CHECK_THREADS) as pool, bar:
        for start in range(0, len(paths), HEADER_CHECK_CHUNK):
            chunk = paths[start : start + HEADER_CHECK_CHUNK]
            reasons = pool.map(_unreadable, chunk)
            bad += [(path, why) for path, why in zip(chunk, reasons, strict=True) if why]
            bar.update(len(chunk))
    if len(bad) == 1:
        path, why = bad[0]
        raise UserError(
            f"cannot read image {path} ({why}); remove or replace it, then rerun prepare"
        )
    if bad:
        path, why = bad[0]
        raise UserError(
            f"cannot read {len(bad)} images, e.g. {path} ({why}); remove or replace them, "
            "then rerun prepare"
        )


DATASETS: dict[str, Callable[[Params], SourceData]] = {
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits_data,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "imagefolder": load_imagefolder,
}


def load_source(params: Params) -> SourceData:
    """Load ``params.data.dataset`` from wherever its files are (the registry lookup)."""
    return DATASETS[params.data.dataset](params)


# --------------------------------------------------------------------------- format


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


# --------------------------------------------------------------------------- loaders


class ArrayImages(Dataset):
    """Images from a prepared ``.npy`` (memory-mapped, so workers share the page cache)."""

    def __init__(self, images_path: str | Path, labels_path: str | Path) -> None:
        self.images_path = Path(images_path)
        for path in (self.images_path, Path(labels_path)):
            if not path.is_file():
                raise UserError(f"{path} not found; {PREPARE_HINT}")
        self.labels = np.load(labels_path).astype(np.int64)
        self._images: np.ndarray | None = None
        length = len(self._open())
        if length != len(self.labels):
            raise UserError(
                f"{self.images_path} has {length} images for {len(self.labels)} labels; "
                f"{PREPARE_HINT.replace('first', 'again')}"
            )

    def _open(self) -> np.ndarray:
        """The memory map, opened lazily so a pickled dataset (spawned worker) reopens it."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = np.array(self._open()[index].transpose(2, 0, 1))  # copy out of the map, CHW
        return torch.from_numpy(image), int(self.labels[index])


class ImageReadError(UserError):
    """An image file Pillow cannot decode (the message names it and the fix).

    A DataLoader worker's exception is re-raised in the main process as the same type, built
    from "Caught ... Original Traceback ...": keep only the original message, so the CLI
    still prints one line.
    """

    def __init__(self, message: str) -> None:
        tag = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "Original Traceback" in message and tag in message:
            message = message.rpartition(tag)[2].strip()
        super().__init__(message)


class ManifestImages(Dataset):
    """Image files listed in a manifest, decoded with PIL and cropped to a fixed uint8 size."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
        channels: int = 3,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: str) -> Any:
        """Open and fully decode one image; a bad file is the user's to fix, so say which."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                return image.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageReadError(
                f"cannot read image {path} ({err.__class__.__name__}); remove or replace it, "
                "then rerun prepare"
            ) from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self._decode(self.paths[index])), self.labels[index]


CropScale = tuple[float, float]
PRETRAIN_CROP_SCALE: CropScale = (0.2, 1.0)  # the MFM recipe's RandomResizedCrop


def image_transform(
    img_size: int, train: bool, crop_scale: CropScale = PRETRAIN_CROP_SCALE
) -> Callable[[Any], torch.Tensor]:
    """Per-image PIL -> uint8 (C, size, size): random resized crop, or resize + centre crop."""
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    if train:
        resize = [v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=bicubic)]
    else:
        resize = [
            v2.Resize(int(img_size / EVAL_CROP_RATIO), interpolation=bicubic),
            v2.CenterCrop(img_size),
        ]
    return v2.Compose([*resize, v2.PILToTensor()])


def image_dataset(
    prepared_dir: str | Path,
    split: Split,
    img_size: int,
    train: bool,
    crop_scale: CropScale = PRETRAIN_CROP_SCALE,
) -> Dataset:
    """The prepared ``split`` as a Dataset of (uint8 (C, H, W), label)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prepared_dir = Path(prepared_dir)
    meta = load_meta(prepared_dir)
    if meta.kind == "arrays":
        return ArrayImages(
            prepared_dir / f"{split}_images.npy", prepared_dir / f"{split}_labels.npy"
        )
    paths, labels = read_manifest(prepared_dir / f"{split}.csv", meta.source)
    transform = image_transform(img_size, train, crop_scale)
    return ManifestImages(paths, labels, transform, meta.channels)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int,
    drop_last: bool,
    epoch: int = 0,
) -> DataLoader:
    """A DataLoader whose order (and workers' random crops) follow ``seed + epoch`` only.

    Rebuilding it for a given epoch replays that epoch exactly, which is what resuming from a
    checkpoint needs.
    """
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def training_loader(
    dataset: Dataset,
    global_batch: int,
    seed: int,
    workers: int,
    epoch: int,
    here: World | None = None,
    start_batch: int = 0,
) -> DataLoader:
    """This process's share of each shuffled global batch of ``epoch`` (full batches only),
    from global batch ``start_batch`` on.

    The order follows ``seed + epoch`` only, and N torchrun processes together see exactly
    the global batches one process sees, so resuming and scaling out replay the same data.
    """
    here = here or World()
    local = per_rank_batch(global_batch, here, "batch_size")
    sampler = GlobalBatchShard(len(dataset), global_batch, here, seed, True, start_batch)
    sampler.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)  # workers' seeds (random crops of image folders)
    return DataLoader(
        dataset,
        batch_size=local,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


# --------------------------------------------------------------------------- device side


class ToUnitFloat(nn.Module):
    """uint8 [0, 255] -> float32 [0, 1] (float input is taken as already scaled)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else x.to(torch.float32) / 255


class Clamp01(nn.Module):
    """Bicubic resampling overshoots; keep pixels in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


class ResizeSquare(nn.Module):
    """Bicubic resize of a batch to (size, size); a no-op when it already is that size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return nn.functional.interpolate(
            x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
        )


def device_augment(
    meta: DatasetMeta, img_size: int, train: bool, crop_scale: CropScale = PRETRAIN_CROP_SCALE
) -> nn.Module:
    """Batched augmentation on the training device: uint8 (B, C, H, W) -> float [0, 1] crops.

    Arrays are stored at native size, so they are cropped (train) or resized (eval) here;
    manifest images arrive already cropped by the workers, so only the flip is left.
    """
    import kornia.augmentation as K

    steps: list[nn.Module] = [ToUnitFloat()]
    if meta.kind == "arrays" and train:
        size = (img_size, img_size)
        crop = K.RandomResizedCrop(size, scale=crop_scale, resample="bicubic")
        steps += [crop, K.RandomHorizontalFlip(), Clamp01()]
    elif meta.kind == "arrays":
        steps += [ResizeSquare(img_size), Clamp01()]
    elif train:
        steps += [K.RandomHorizontalFlip()]
    return nn.Sequential(*steps)


def normalizer(meta: DatasetMeta) -> nn.Module:
    """Per-channel standardisation with the prepared mean/std (applied after corruption)."""
    import kornia.enhance

    return kornia.enhance.Normalize(torch.tensor(meta.mean), torch.tensor(meta.std))
