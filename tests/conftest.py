"""Shared fixtures: tiny data sets built on the spot, and a machine-independent data layer."""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import mfm.data
from mfm.config import Params

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 array in the IDX format: 0, 0, 0x08, ndim, big-endian dims, payload."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write ``array`` as ``path`` (+ ``.gz`` when gz) and return the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def fake_fashion_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A handful of 6x5 (non-square, to catch H/W mix-ups) images and labels per split."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8),
        "train_labels": np.arange(12, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, size=(5, 6, 5), dtype=np.uint8),
        "test_labels": np.arange(5, dtype=np.uint8),
    }


@pytest.fixture
def make_fashion() -> Callable[..., dict[str, np.ndarray]]:
    """Write the fake Fashion-MNIST IDX files into a folder; returns the arrays written."""

    def build(folder: Path, gz: bool = True) -> dict[str, np.ndarray]:
        arrays = fake_fashion_arrays()
        for key, name in IDX_NAMES.items():
            write_idx(folder / name, arrays[key], gz)
        return arrays

    return build


def _cifar_batch(rng: np.random.Generator, n: int, label_key: str, classes: int) -> dict:
    """A batch as CIFAR's python pickles hold it: bytes keys, (n, 3072) uint8 rows."""
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key.encode(): [int(v) for v in rng.integers(0, classes, size=n)],
    }


@pytest.fixture
def make_cifar() -> Callable[..., Path]:
    """Write a tiny fake CIFAR-10 or CIFAR-100 python release under ``root``; returns its folder."""

    def build(root: Path, dataset: str = "cifar10", per_batch: int = 4) -> Path:
        rng = np.random.default_rng(0)
        if dataset == "cifar10":
            folder, names = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
            test, meta, label_key, names_key = "test_batch", "batches.meta", "labels", "label_names"
            classes = [f"class{i}" for i in range(10)]
        else:
            folder, names = root / "cifar-100-python", ["train"]
            test, meta, label_key, names_key = "test", "meta", "fine_labels", "fine_label_names"
            classes = [f"fine{i}" for i in range(100)]
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            batch = _cifar_batch(rng, per_batch, label_key, len(classes))
            (folder / name).write_bytes(pickle.dumps(batch))
        batch = _cifar_batch(rng, per_batch + 2, label_key, len(classes))
        (folder / test).write_bytes(pickle.dumps(batch))
        names_entry = {names_key.encode(): [c.encode() for c in classes]}
        (folder / meta).write_bytes(pickle.dumps(names_entry))
        return folder

    return build


def save_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """A random PIL image of ``size`` (W, H) in ``mode``."""
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)


@pytest.fixture
def make_image_tree() -> Callable[..., Path]:
    """An ImageNet-style tree: ``root/{train,<test_name>}/{cat,dog}/*.png`` (mixed modes)."""

    def build(root: Path, test_name: str = "val") -> Path:
        layout: dict[str, dict[str, list[tuple[str, str]]]] = {
            "train": {
                "dog": [("a.png", "RGB"), ("b.PNG", "L"), ("c.png", "RGBA")],
                "cat": [("x.png", "RGB"), ("y.png", "RGB")],
            },
            test_name: {"dog": [("d.png", "RGB")], "cat": [("z.png", "L")]},
        }
        seed = 0
        for split, classes in layout.items():
            for name, files in classes.items():
                for file_name, mode in files:
                    seed += 1
                    save_image(root / split / name / file_name, (20 + seed, 18), mode, seed)
        (root / "train" / "dog" / "notes.txt").write_text("not an image")
        return root

    return build


class _OfflineDataset:
    """Stands in for torchvision's downloading datasets: the network is never reached."""

    def __init__(self, root: str, *args: Any, download: bool = False, **kwargs: Any) -> None:
        raise RuntimeError("no network in tests")


@pytest.fixture
def offline_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the machine-wide data places at empty tmp folders and make downloads fail fast.

    Returns the tmp folder standing in for ``data/raw``.
    """
    import torchvision.datasets

    raw = tmp_path / "raw"
    monkeypatch.setattr(mfm.data, "RAW_DIR", raw)
    monkeypatch.setattr(mfm.data, "DEBIAN_FASHION_MNIST", tmp_path / "debian-fashion-mnist")
    for name in ("FashionMNIST", "CIFAR10", "CIFAR100"):
        monkeypatch.setattr(torchvision.datasets, name, _OfflineDataset)
    return raw


@pytest.fixture
def make_params() -> Callable[..., Params]:
    """Params from ``data`` section entries (downloads off unless asked for) and a seed."""

    def build(seed: int = 0, **data: Any) -> Params:
        data.setdefault("download", False)
        return Params.model_validate({"data": data, "runtime": {"seed": seed}})

    return build


def tiny_training_params(
    pretrain_epochs: int, finetune_epochs: int, batch_size: int
) -> dict[str, Any]:
    """Params for running the training stages as subprocesses on digits in seconds."""
    return {
        "data": {"dataset": "digits", "img_size": 16},
        "model": {
            "name": "vit_tiny_patch16_224",
            "patch_size": 4,
            "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
        },
        "pretrain": {"epochs": pretrain_epochs, "batch_size": batch_size, "warmup_epochs": 0.0},
        "finetune": {"epochs": finetune_epochs, "batch_size": batch_size},
        "runtime": {"device": "cpu", "workers": 0},
    }


@pytest.fixture(scope="session")
def snakemake_rules() -> dict[str, dict[str, Any]]:
    """Every Snakemake rule as {cmd, deps, params, outs} (parsing the workflow takes a while)."""
    from tests.pipeline_spec import snakemake_rules as read_rules

    return read_rules()
