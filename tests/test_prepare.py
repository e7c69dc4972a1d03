"""The prepare stage on tiny data sets built by the tests: every source, the format, atomicity."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets

from mfm.data.meta import load_meta
from mfm.data.sources import fashion_mnist
from mfm.data.subsets import subset_indices
from mfm.errors import UserError
from mfm.prepare import channel_stats, run

pytestmark = pytest.mark.usefixtures("offline_data")


def _arrays(out: Path) -> dict[str, np.ndarray]:
    names = ("train_images", "train_labels", "test_images", "test_labels")
    return {name: np.load(out / f"{name}.npy") for name in names}


# --------------------------------------------------------------------------- fashion_mnist


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path, make_fashion, make_params, gz):
    written = make_fashion(tmp_path / "fm", gz=gz)
    out = tmp_path / "prepared"
    metrics = run(make_params(dataset="fashion_mnist", root=str(tmp_path / "fm")), out)

    arrays = _arrays(out)
    assert arrays["train_images"].shape == (12, 6, 5, 1)
    assert arrays["train_images"].dtype == np.uint8
    assert arrays["train_labels"].dtype == np.int64
    np.testing.assert_array_equal(arrays["train_images"][..., 0], written["train_images"])
    np.testing.assert_array_equal(arrays["test_labels"], written["test_labels"])
    meta = load_meta(out)
    assert meta.classes[0] == "T-shirt/top" and meta.classes[-1] == "Ankle boot"
    assert (meta.kind, meta.channels, meta.image_size) == ("arrays", 1, (6, 5))
    assert meta.source == str(tmp_path / "fm")
    assert metrics == {
        "dataset": "fashion_mnist",
        "num_train": 12,
        "num_test": 5,
        "num_classes": 10,
        "image_size": [6, 5],
        "channels": 1,
    }


def test_fashion_mnist_torchvision_layout(tmp_path, make_fashion, make_params):
    make_fashion(tmp_path / "root" / "FashionMNIST" / "raw", gz=False)
    run(make_params(dataset="fashion_mnist", root=str(tmp_path / "root")), tmp_path / "out")
    assert load_meta(tmp_path / "out").source == str(tmp_path / "root" / "FashionMNIST" / "raw")


def test_fashion_mnist_debian_place(tmp_path, make_fashion, make_params):
    make_fashion(fashion_mnist.DEBIAN_FASHION_MNIST)
    metrics = run(make_params(dataset="fashion_mnist"), tmp_path / "out")
    assert metrics["num_train"] == 12
    assert load_meta(tmp_path / "out").source == str(fashion_mnist.DEBIAN_FASHION_MNIST)


def test_fashion_mnist_truncated_file_names_it(tmp_path, make_fashion, make_params):
    make_fashion(tmp_path / "fm", gz=False)
    bad = tmp_path / "fm" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte is truncated"):
        run(make_params(dataset="fashion_mnist", root=str(tmp_path / "fm")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fashion_mnist_missing_lists_every_place(tmp_path, make_params, offline_data):
    root = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        run(make_params(dataset="fashion_mnist", root=str(root)), tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    for place in (
        root,
        root / "FashionMNIST" / "raw",
        fashion_mnist.DEBIAN_FASHION_MNIST,
        offline_data / "FashionMNIST" / "raw",
    ):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.download: true" in message


def test_fashion_mnist_failed_download_is_a_user_error(tmp_path, make_params):
    with pytest.raises(UserError, match="download failed .*no network in tests"):
        run(make_params(dataset="fashion_mnist", download=True), tmp_path / "out")


def test_fashion_mnist_download_goes_to_raw_dir(
    tmp_path, make_fashion, make_params, offline_data, monkeypatch
):
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            make_fashion(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    metrics = run(make_params(dataset="fashion_mnist", download=True), tmp_path / "out")
    assert calls == [(str(offline_data), True)]
    assert metrics["num_test"] == 5


# --------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_stratified_split(tmp_path, make_params):
    metrics = run(make_params(dataset="digits"), tmp_path / "out")
    arrays = _arrays(tmp_path / "out")
    assert arrays["train_images"].shape == (1437, 8, 8, 1)
    assert arrays["test_images"].shape == (360, 8, 8, 1)
    assert arrays["train_images"].dtype == np.uint8
    assert arrays["train_images"].min() == 0 and arrays["train_images"].max() == 255
    counts = np.bincount(arrays["test_labels"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # about 20% of each class's ~180
    assert metrics["num_classes"] == 10 and metrics["image_size"] == [8, 8]


def test_digits_seed_determinism(tmp_path, make_params):
    run(make_params(dataset="digits", seed=3), tmp_path / "a")
    run(make_params(dataset="digits", seed=3), tmp_path / "b")
    run(make_params(dataset="digits", seed=4), tmp_path / "c")
    a, b, c = (_arrays(tmp_path / name) for name in "abc")
    np.testing.assert_array_equal(a["train_labels"], b["train_labels"])
    np.testing.assert_array_equal(a["test_images"], b["test_images"])
    assert not np.array_equal(a["test_images"], c["test_images"])


def test_limits_take_seeded_subsets(tmp_path, make_params):
    full = make_params(dataset="digits")
    run(full, tmp_path / "full")
    limited = make_params(dataset="digits", train_limit=100, test_limit=30)
    metrics = run(limited, tmp_path / "small")
    assert (metrics["num_train"], metrics["num_test"]) == (100, 30)
    small, whole = _arrays(tmp_path / "small"), _arrays(tmp_path / "full")
    keep = subset_indices(1437, 100, seed=0, stream=0)
    np.testing.assert_array_equal(small["train_images"], whole["train_images"][keep])
    run(limited, tmp_path / "again")
    np.testing.assert_array_equal(small["test_labels"], _arrays(tmp_path / "again")["test_labels"])


def test_meta_mean_std_match_the_training_images(tmp_path, make_params):
    run(make_params(dataset="digits", train_limit=500), tmp_path / "out")
    meta = load_meta(tmp_path / "out")
    train = np.load(tmp_path / "out" / "train_images.npy") / 255
    assert meta.mean == pytest.approx([train.mean()], abs=1e-9)
    assert meta.std == pytest.approx([train.std()], abs=1e-9)
    assert 0.1 < meta.mean[0] < 0.5 and 0.2 < meta.std[0] < 0.5
    raw = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert raw["num_train"] == 500 and raw["num_classes"] == 10 and raw["channels"] == 1
    assert raw["classes"] == [str(i) for i in range(10)]


def test_channel_stats_chunks_agree_with_numpy(monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, size=(50, 4, 3, 3), dtype=np.uint8)
    monkeypatch.setattr("mfm.prepare.STATS_CHUNK", 7)
    mean, std = channel_stats(images)
    scaled = images / 255
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)))


# --------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("at_release", [False, True])
def test_cifar10_through_torchvision(tmp_path, make_cifar, make_params, at_release):
    """data.root may hold cifar-10-batches-py/ or be that folder itself."""
    folder = make_cifar(tmp_path / "root")
    root = folder if at_release else tmp_path / "root"
    metrics = run(make_params(dataset="cifar10", root=str(root)), tmp_path / "out")
    assert metrics == {
        "dataset": "cifar10",
        "num_train": 20,
        "num_test": 6,
        "num_classes": 10,
        "image_size": [32, 32],
        "channels": 3,
    }
    arrays = _arrays(tmp_path / "out")
    batch = pickle.loads((folder / "data_batch_2").read_bytes())
    first = batch["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(arrays["train_images"][4], first)
    assert arrays["train_labels"][4] == batch["labels"][0]
    assert arrays["train_images"].flags.c_contiguous and arrays["train_labels"].dtype == np.int64
    meta = load_meta(tmp_path / "out")
    assert meta.classes == [f"class{i}" for i in range(10)]
    assert meta.source == str(folder)
    assert len(meta.mean) == 3 and all(0.4 < m < 0.6 for m in meta.mean)


def test_cifar100_uses_fine_labels_and_raw_dir(tmp_path, make_cifar, make_params, offline_data):
    folder = make_cifar(offline_data, dataset="cifar100")
    # download: true with a complete copy in place verifies it and never reaches the network
    metrics = run(make_params(dataset="cifar100", download=True), tmp_path / "out")
    assert (metrics["num_train"], metrics["num_test"], metrics["num_classes"]) == (4, 6, 100)
    test = pickle.loads((folder / "test").read_bytes())
    np.testing.assert_array_equal(_arrays(tmp_path / "out")["test_labels"], test["fine_labels"])
    assert load_meta(tmp_path / "out").classes[-1] == "fine99"


def test_cifar_missing_is_a_user_error(tmp_path, make_params):
    empty = tmp_path / "empty"
    with pytest.raises(UserError, match="cifar-10-batches-py.*data.download is false") as err:
        run(make_params(dataset="cifar10", root=str(empty)), tmp_path / "out")
    assert str(empty / "cifar-10-batches-py") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="torchvision's download failed .*no network in tests"):
        run(make_params(dataset="cifar10", download=True), tmp_path / "out")


@pytest.mark.parametrize("damage", ["data_batch_3", "batches.meta"])
def test_cifar_corrupt_file_is_named(tmp_path, make_cifar, make_params, damage):
    folder = make_cifar(tmp_path / "root")
    (folder / damage).write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match=f"{damage} is missing or fails its md5 check.*download"):
        run(make_params(dataset="cifar10", root=str(tmp_path / "root")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- imagefolder


def _manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_imagefolder_writes_manifests(tmp_path, make_image_tree, make_params):
    root = make_image_tree(tmp_path / "imgs")
    metrics = run(make_params(dataset="imagefolder", root=str(root)), tmp_path / "out")
    assert metrics == {
        "dataset": "imagefolder",
        "num_train": 5,
        "num_test": 2,
        "num_classes": 2,
        "image_size": None,
        "channels": 3,
    }
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.csv", "train.csv"]
    train = _manifest(out / "train.csv")
    assert [(Path(r["path"]).name, r["label"]) for r in train] == [
        ("x.png", "0"),
        ("y.png", "0"),
        ("a.png", "1"),
        ("b.PNG", "1"),
        ("c.png", "1"),
    ]
    assert all(Path(r["path"]).is_file() for r in train)
    meta = load_meta(out)
    assert (meta.classes, meta.kind, meta.image_size) == (["cat", "dog"], "manifest", None)
    assert meta.mean == pytest.approx([0.485, 0.456, 0.406])
    assert meta.std == pytest.approx([0.229, 0.224, 0.225])


def test_imagefolder_accepts_test_and_limits(tmp_path, make_image_tree, make_params):
    root = make_image_tree(tmp_path / "imgs", test_name="test")
    params = make_params(dataset="imagefolder", root=str(root), train_limit=3, test_limit=1)
    metrics = run(params, tmp_path / "out")
    assert (metrics["num_train"], metrics["num_test"]) == (3, 1)
    assert len(_manifest(tmp_path / "out" / "train.csv")) == 3


def test_imagefolder_ignores_hidden_entries(tmp_path, make_image_tree, make_params):
    """Notebook checkpoints, Finder files and macOS resource forks are neither classes nor
    images (unignored, each would add a class or fail the image check)."""
    root = make_image_tree(tmp_path / "imgs")
    garbage = b"not an image at all"
    for folder in ("train/.ipynb_checkpoints", "train/dog/.ipynb_checkpoints", "val/.cache"):
        (root / folder).mkdir()
        (root / folder / "a-checkpoint.png").write_bytes(garbage)
    for name in ("train/dog/.DS_Store", "train/dog/._a.png", "val/cat/._z.png", ".DS_Store"):
        (root / name).write_bytes(garbage)
    metrics = run(make_params(dataset="imagefolder", root=str(root)), tmp_path / "out")
    assert (metrics["num_train"], metrics["num_test"], metrics["num_classes"]) == (5, 2, 2)
    paths = [r["path"] for r in _manifest(tmp_path / "out" / "train.csv")]
    assert not any("/." in path for path in paths)


def test_imagefolder_empty_class_folder(tmp_path, make_image_tree, make_params):
    root = make_image_tree(tmp_path / "imgs")
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder .*train/bird holds no images"):
        run(make_params(dataset="imagefolder", root=str(root)), tmp_path / "out")


def test_imagefolder_class_only_in_val(tmp_path, make_image_tree, make_params):
    root = make_image_tree(tmp_path / "imgs")
    (root / "val" / "fox").mkdir()
    with pytest.raises(UserError, match=r"val/fox has no counterpart"):
        run(make_params(dataset="imagefolder", root=str(root)), tmp_path / "out")


@pytest.mark.parametrize("make_root", [False, True])
def test_imagefolder_missing_root_or_train(tmp_path, make_params, make_root):
    root = tmp_path / "imgs"
    if make_root:
        (root / "val" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="needs train/ and val/"):
        run(make_params(dataset="imagefolder", root=str(root)), tmp_path / "out")
    with pytest.raises(UserError, match="data.root is not set"):
        run(make_params(dataset="imagefolder"), tmp_path / "out")


# --------------------------------------------------------------------------- atomicity


def test_failed_prepare_keeps_previous_output(tmp_path, make_params):
    out = tmp_path / "prepared"
    run(make_params(dataset="digits", train_limit=50, test_limit=20), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError):
        run(make_params(dataset="fashion_mnist"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_labels_out_of_range_are_reported(tmp_path, make_fashion, make_params):
    make_fashion(tmp_path / "fm", gz=False)
    labels = np.array([0, 1, 12], dtype=np.uint8)
    header = bytes([0, 0, 8, 1]) + np.asarray([3], dtype=">u4").tobytes()
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    images = tmp_path / "fm" / "t10k-images-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + np.asarray([3, 6, 5], dtype=">u4").tobytes()
    images.write_bytes(header + bytes(3 * 6 * 5))
    with pytest.raises(UserError, match=r"test labels span 0\.\.12 but there are 10 classes"):
        run(make_params(dataset="fashion_mnist", root=str(tmp_path / "fm")), tmp_path / "out")
