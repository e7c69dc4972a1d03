"""The corrupt stage on tiny images: reproducibility, layout, small/grey images, reading the set
back, errors, run(), and the torch-free imports its workers rely on (image folders:
test_corrupt_imagefolder.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mfm.corrupt
from mfm.config import Params
from mfm.corrupt import build, corrupt_image, corruption_names, image_seed, run, seeded_numpy
from mfm.corrupted_set import load_corrupted
from mfm.data.subsets import CORRUPT_STREAM, subset_indices
from mfm.errors import UserError
from mfm.prepare import run as prepare

NAMES = ["gaussian_noise", "glass_blur", "impulse_noise"]  # the last two self-seed
SEVERITIES = [1, 3]
REFERENCE_ORDER = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
]
REFERENCE_EXTRAS = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]


def _images(n: int, side: int, channels: int, seed: int) -> np.ndarray:
    """Smooth random images (noise alone would hide what blurs do)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 215, side)[None, :, None, None]
    noise = rng.integers(-40, 40, size=(n, side, side, channels))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return _images(6, 28, 1, seed=1)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return _images(4, 40, 3, seed=2)


def _build(images: np.ndarray, out: Path, seed: int = 0, workers: int = 1, **kw) -> Path:
    labels = np.arange(len(images)) % 3
    build(images, labels, kw.get("names", NAMES), SEVERITIES, seed, out, workers)
    return out


@pytest.fixture(scope="module")
def built_grey(grey, tmp_path_factory) -> Path:
    return _build(grey, tmp_path_factory.mktemp("grey") / "c")


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_files(built_grey, grey, tmp_path):
    again = _build(grey, tmp_path / "again")
    assert _files(again) == _files(built_grey)


def test_other_seed_changes_random_corruptions(built_grey, grey, tmp_path):
    other = _build(grey, tmp_path / "other", seed=1)
    for name in NAMES:
        assert not np.array_equal(
            np.load(other / f"{name}.npy"), np.load(built_grey / f"{name}.npy")
        ), name


def test_worker_count_does_not_change_output(rgb, tmp_path):
    one = _build(rgb, tmp_path / "one", workers=1)
    two = _build(rgb, tmp_path / "two", workers=2)
    assert _files(one) == _files(two)


def test_one_image_rebuilds_alone(built_grey, grey):
    stored = np.load(built_grey / "glass_blur.npy")
    block, index = 1, 4  # severity 3, fifth image
    seed = image_seed(0, "glass_blur", SEVERITIES[block], index)
    alone = corrupt_image(grey[index], "glass_blur", SEVERITIES[block], seed)
    np.testing.assert_array_equal(alone, stored[block * len(grey) + index])


def test_seeded_numpy_restores_global_state():
    real = np.random.default_rng
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    with pytest.raises(RuntimeError), seeded_numpy(5):
        assert np.random.default_rng is not real
        raise RuntimeError("boom")
    assert np.random.default_rng is real
    assert np.random.random() == expected


# --------------------------------------------------------------------------- layout


def test_layout_labels_and_info(built_grey, grey):
    n = len(grey)
    for name in NAMES:
        array = np.load(built_grey / f"{name}.npy")
        assert array.shape == (len(SEVERITIES) * n, 28, 28, 1) and array.dtype == np.uint8
    labels = np.load(built_grey / "labels.npy")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.arange(n) % 3)
    assert json.loads((built_grey / "info.json").read_text()) == {
        "corruptions": NAMES,
        "severities": SEVERITIES,
        "num_images": n,
        "seed": 0,
        "image_size": [28, 28],
        "channels": 1,
    }


def test_severity_blocks_in_order(built_grey, grey):
    stored = np.load(built_grey / "gaussian_noise.npy")
    n = len(grey)
    for block, severity in enumerate(SEVERITIES):
        for index in (0, n - 1):
            seed = image_seed(0, "gaussian_noise", severity, index)
            expected = corrupt_image(grey[index], "gaussian_noise", severity, seed)
            np.testing.assert_array_equal(stored[block * n + index], expected)


def test_load_corrupted_reads_blocks(built_grey, grey):
    data = load_corrupted(built_grey)
    stored = np.load(built_grey / "glass_blur.npy")
    np.testing.assert_array_equal(data.images("glass_blur", 3), stored[len(grey) :])
    items = [(name, severity) for name, severity, _ in data.items()]
    assert items == [(name, s) for name in NAMES for s in SEVERITIES]
    assert data.labels.shape == (len(grey),)


def test_rgb_keeps_shape(rgb):
    out = corrupt_image(rgb[0], "glass_blur", 2, seed=3)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, rgb[0])


def test_tiny_non_square_grey_image():
    image = _images(1, 8, 1, seed=3)[0, :, :5]
    out = corrupt_image(image, "gaussian_noise", 3, seed=0)
    assert out.shape == (8, 5, 1) and out.dtype == np.uint8


def test_noise_grows_with_severity(grey):
    def distance(severity: int) -> float:
        outs = [corrupt_image(img, "gaussian_noise", severity, i) for i, img in enumerate(grey)]
        return float(np.mean(np.abs(np.stack(outs).astype(float) - grey)))

    assert distance(5) > distance(1) > 0


def test_corruption_names_follow_the_reference():
    assert corruption_names("common") == REFERENCE_ORDER
    assert corruption_names("all") == REFERENCE_ORDER + REFERENCE_EXTRAS


# --------------------------------------------------------------------------- errors


def test_load_corrupted_missing_or_damaged(built_grey, tmp_path):
    with pytest.raises(UserError, match="dvc repro corrupt"):
        load_corrupted(tmp_path / "nothing")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, payload in _files(built_grey).items():
        (damaged / name).write_bytes(payload[:-10] if name == "glass_blur.npy" else payload)
    with pytest.raises(UserError, match="damaged.*dvc repro corrupt"):
        load_corrupted(damaged)


# --------------------------------------------------------------------------- the stage


def test_run_on_digits(tmp_path, monkeypatch):
    params = Params.model_validate(
        {
            "data": {"dataset": "digits"},
            "robustness": {"num_images": 8, "severities": [2, 1]},
            "runtime": {"workers": 1},
        }
    )
    prepare(params, tmp_path / "prepared")
    monkeypatch.setattr(mfm.corrupt, "corruption_names", lambda which: NAMES[:2])
    metrics = run(params, tmp_path / "prepared", tmp_path / "corrupted")

    assert metrics["seconds"] > 0 and metrics["images_per_second"] > 0
    del metrics["seconds"], metrics["images_per_second"]
    assert metrics == {
        "corruptions": 2,
        "severities": 2,
        "num_images": 8,
        "images_written": 32,
        "workers": 1,
    }
    data = load_corrupted(tmp_path / "corrupted")
    assert data.info["severities"] == [1, 2]
    assert data.images("glass_blur", 2).shape == (8, 8, 8, 1)
    test_labels = np.load(tmp_path / "prepared" / "test_labels.npy")
    keep = subset_indices(len(test_labels), 8, 0, CORRUPT_STREAM)
    np.testing.assert_array_equal(data.labels, test_labels[keep])
    test_images = np.load(tmp_path / "prepared" / "test_images.npy")
    np.testing.assert_array_equal(data.clean, test_images[keep])


def test_the_writer_and_the_reader_do_not_import_torch():
    """Worker processes import mfm.corrupt, so it must start fast: torch stays out."""
    script = (
        "import sys, mfm.corrupt, mfm.corrupted_set\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
