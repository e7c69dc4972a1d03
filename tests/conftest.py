"""Shared fixtures: tiny data sets built on the spot, and a machine-independent data layer."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mfm.config import Params
from mfm.data.sources import common, fashion_mnist
from mfm.engine import LoopConfig

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
    """A batch as torchvision unpickles CIFAR's files: str keys, (n, 3072) uint8 rows."""
    return {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, classes, size=n)],
    }


def _write_pickle(path: Path, entry: dict) -> list[str]:
    """Pickle ``entry`` to ``path``; returns [file name, md5] as torchvision's lists hold them."""
    path.write_bytes(pickle.dumps(entry))
    return [path.name, hashlib.md5(path.read_bytes()).hexdigest()]


@pytest.fixture
def make_cifar(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Write a tiny fake CIFAR-10 or CIFAR-100 python release under ``root``; returns its folder.

    torchvision's real class reads it: its md5 lists are set to the fake files' md5s.
    """
    import torchvision.datasets

    def build(root: Path, dataset: str = "cifar10", per_batch: int = 4) -> Path:
        rng = np.random.default_rng(0)
        if dataset == "cifar10":
            tv_class, label_key = torchvision.datasets.CIFAR10, "labels"
            classes = [f"class{i}" for i in range(10)]
        else:
            tv_class, label_key = torchvision.datasets.CIFAR100, "fine_labels"
            classes = [f"fine{i}" for i in range(100)]
        folder = root / tv_class.base_folder
        folder.mkdir(parents=True, exist_ok=True)
        for key, size in (("train_list", per_batch), ("test_list", per_batch + 2)):
            written = [
                _write_pickle(folder / name, _cifar_batch(rng, size, label_key, len(classes)))
                for name, _ in getattr(tv_class, key)
            ]
            monkeypatch.setattr(tv_class, key, written)
        meta = {tv_class.meta["key"]: classes}
        _, md5 = _write_pickle(folder / tv_class.meta["filename"], meta)
        monkeypatch.setattr(tv_class, "meta", {**tv_class.meta, "md5": md5})
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
    """Stands in for torchvision's FashionMNIST download: the network is never reached."""

    def __init__(self, root: str, *args: Any, download: bool = False, **kwargs: Any) -> None:
        raise RuntimeError("no network in tests")


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("no network in tests")


@pytest.fixture
def offline_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the machine-wide data places at empty tmp folders and make downloads fail fast
    (CIFAR's through torchvision's own class, whose download step is cut off).

    Returns the tmp folder standing in for ``data/raw``.
    """
    import torchvision.datasets
    import torchvision.datasets.cifar

    raw = tmp_path / "raw"
    monkeypatch.setattr(common, "RAW_DIR", raw)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "debian-fashion-mnist")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _OfflineDataset)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", _no_network)
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
        "segment": {
            "epochs": finetune_epochs,
            "batch_size": batch_size // 2,
            "crop_size": 32,
            "resize": [32, 32],
            "channels": 16,
            "scenes": {"size": 32, "train": 4 * batch_size, "test": 8, "scale": [1.5, 2.5]},
        },
        "runtime": {"device": "cpu", "workers": 0},
    }


@pytest.fixture(scope="session")
def snakemake_rules() -> dict[str, dict[str, Any]]:
    """Every Snakemake rule as {cmd, deps, params, outs} (parsing the workflow takes a while)."""
    from tests.pipeline_spec import snakemake_rules as read_rules

    return read_rules()


def cpu_loop_config(out: Path, epochs: int, **changes: Any) -> LoopConfig:
    """Loop settings for tests: CPU, no AMP, a checkpoint every epoch in ``out``, every step
    logged; ``changes`` override any field (e.g. ``live_dir``, ``clip_grad``)."""
    settings: dict[str, Any] = {
        "epochs": epochs,
        "device": torch.device("cpu"),
        "amp": False,
        "clip_grad": None,
        "seed": 0,
        "checkpoint_path": out / "checkpoint.pt",
        "checkpoint_every": 1,
        "log_every": 1,
    }
    return LoopConfig(**{**settings, **changes})
