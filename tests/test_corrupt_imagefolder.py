"""The corrupt and robustness stages on an image folder (the user's own photos): the stored
clean images are evaluation's crops, the set is reproducible for any worker count, a bad
photo is named, and both classifiers get a finite mCE."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import mfm.clean_subset
import mfm.corrupt
from mfm.config import ModelParams, Params
from mfm.corrupt import run as corrupt
from mfm.corrupted_set import load_corrupted
from mfm.data.datasets import image_dataset
from mfm.data.meta import load_meta, save_meta
from mfm.data.subsets import CORRUPT_STREAM, subset_indices
from mfm.errors import UserError
from mfm.evaluation import evaluate
from mfm.models import build_classifier, save_classifier
from mfm.prepare import run as prepare
from mfm.robustness import run as robustness
from tests.photos import write_photos

NAMES = ["gaussian_noise", "contrast"]
SEVERITIES = [1, 3]
IMG_SIZE = 16
NUM_IMAGES = 8  # of 15 test photos
TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 4,
    "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
}


def _params(root: Path, workers: int = 1, **robustness: object) -> Params:
    return Params.model_validate(
        {
            "data": {"dataset": "imagefolder", "root": str(root), "img_size": IMG_SIZE},
            "model": TINY_VIT,
            "robustness": {"num_images": NUM_IMAGES, "severities": SEVERITIES, **robustness},
            "runtime": {"workers": workers, "device": "cpu", "seed": 3},
        }
    )


def _prepare(base: Path, channels: int) -> tuple[Params, Path]:
    """A colour or grey photo folder, prepared; grey folders get a one-channel meta."""
    photos = write_photos(
        base / "photos", {"train": 2, "val": 5}, mode="RGB" if channels == 3 else "L"
    )
    params = _params(photos)
    prepared = base / "prepared"
    prepare(params, prepared)
    if channels == 1:  # prepare reads every folder as RGB; a grey manifest is also valid
        meta = load_meta(prepared)
        save_meta(meta.model_copy(update={"channels": 1, "mean": [0.5], "std": [0.25]}), prepared)
    return params, prepared


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module", params=[3, 1], ids=["colour", "grey"])
def corrupted(request, tmp_path_factory) -> tuple[Params, Path, Path, int]:
    """(params, prepared folder, corrupted folder, channels) for each kind of folder."""
    base = tmp_path_factory.mktemp("grey" if request.param == 1 else "colour")
    params, prepared = _prepare(base, request.param)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mfm.corrupt, "corruption_names", lambda which: NAMES)
        corrupt(params, prepared, base / "corrupted")
    return params, prepared, base / "corrupted", request.param


def test_clean_images_are_the_evaluation_crops(corrupted) -> None:
    params, prepared, out, channels = corrupted
    data = load_corrupted(out)
    dataset = image_dataset(prepared, "test", IMG_SIZE, train=False)
    keep = subset_indices(len(dataset), NUM_IMAGES, params.runtime.seed, CORRUPT_STREAM)
    assert keep is not None and len(keep) == NUM_IMAGES
    for position, index in enumerate(keep):
        crop, label = dataset[int(index)]
        np.testing.assert_array_equal(data.clean[position], crop.permute(1, 2, 0).numpy())
        assert data.labels[position] == label
    assert data.clean.shape == (NUM_IMAGES, IMG_SIZE, IMG_SIZE, channels)
    assert data.info["image_size"] == [IMG_SIZE, IMG_SIZE] and data.info["channels"] == channels
    for name in NAMES:
        stored = data.arrays[name]
        assert stored.shape == (len(SEVERITIES) * NUM_IMAGES, IMG_SIZE, IMG_SIZE, channels)
        assert stored.dtype == np.uint8
        assert not np.array_equal(data.images(name, 3), data.clean), name


def test_same_bytes_with_one_or_two_workers(corrupted, tmp_path, monkeypatch) -> None:
    params, prepared, out, _ = corrupted
    monkeypatch.setattr(mfm.clean_subset, "DECODE_BATCH", 3)  # 3 batches: 2 decoding workers
    monkeypatch.setattr(mfm.corrupt, "corruption_names", lambda which: NAMES)
    two = params.model_copy(update={"runtime": params.runtime.model_copy(update={"workers": 2})})
    metrics = corrupt(two, prepared, tmp_path / "two")
    assert metrics["workers"] == 2 and metrics["images_written"] == 2 * 2 * NUM_IMAGES
    assert _files(tmp_path / "two") == _files(out)


def test_stored_crops_score_as_the_evaluation_pipeline(corrupted) -> None:
    """Robustness feeds the stored crops through evaluation as they are: the predictions
    match those of the image Dataset itself, so nothing is resized or cropped twice."""
    params, prepared, out, channels = corrupted
    data = load_corrupted(out)
    meta = load_meta(prepared)
    torch.manual_seed(0)
    model, _ = build_classifier(ModelParams(**TINY_VIT), IMG_SIZE, channels, 3, 0.0)
    keep = subset_indices(meta.num_test, NUM_IMAGES, params.runtime.seed, CORRUPT_STREAM)
    folder = Subset(image_dataset(prepared, "test", IMG_SIZE, train=False), keep.tolist())
    stored = TensorDataset(
        torch.from_numpy(np.array(data.clean)).permute(0, 3, 1, 2),
        torch.from_numpy(np.array(data.labels)),
    )
    cpu = torch.device("cpu")
    by_folder = evaluate(model, folder, meta, IMG_SIZE, 4, cpu)
    by_stored = evaluate(model, stored, meta, IMG_SIZE, 4, cpu)
    assert by_stored[0]["loss"] == pytest.approx(by_folder[0]["loss"], rel=1e-6)
    np.testing.assert_array_equal(by_stored[2], by_folder[2])


def test_robustness_scores_both_classifiers(corrupted, tmp_path) -> None:
    params, prepared, out, channels = corrupted
    meta = load_meta(prepared)
    info = {"classes": meta.classes, "dataset": "imagefolder", "img_size": IMG_SIZE}
    for seed, init in enumerate(("mfm", "scratch")):
        torch.manual_seed(seed)
        model, spec = build_classifier(ModelParams(**TINY_VIT), IMG_SIZE, channels, 3, 0.0)
        save_classifier(model, spec, info, tmp_path / f"finetune/{init}/classifier.pt")
    reports = robustness(params, prepared, out, tmp_path / "finetune", tmp_path / "robustness")
    assert set(reports) == {"mfm", "scratch"}
    for init, report in reports.items():
        assert report["num_images"] == NUM_IMAGES
        assert math.isfinite(report["mce"]) and math.isfinite(report["clean_error"]), init
        assert set(report["errors"]) == set(NAMES)
        png = tmp_path / "robustness" / init / "heatmap.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert reports["scratch"]["mce"] == pytest.approx(100.0)


def test_crops_of_another_size_are_refused(corrupted, tmp_path) -> None:
    params, prepared, out, _ = corrupted
    bigger = params.model_copy(update={"data": params.data.model_copy(update={"img_size": 24})})
    with pytest.raises(UserError, match=r"16x16 crops but data.img_size is 24; run `dvc repro"):
        robustness(bigger, prepared, out, tmp_path / "finetune", tmp_path / "robustness")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreadable_photo_is_named(tmp_path, monkeypatch, workers) -> None:
    params, prepared = _prepare(tmp_path, channels=3)
    monkeypatch.setattr(mfm.clean_subset, "DECODE_BATCH", 4)  # workers 2: decoded in a worker
    monkeypatch.setattr(mfm.corrupt, "corruption_names", lambda which: NAMES)
    victim = Path(image_dataset(prepared, "test", IMG_SIZE, train=False).paths[-1])
    shutil.copy(victim, tmp_path / "backup")
    victim.write_bytes(victim.read_bytes()[:60])  # the header survives, the pixels do not
    everything = params.model_copy(
        update={
            "robustness": params.robustness.model_copy(update={"num_images": None}),
            "runtime": params.runtime.model_copy(update={"workers": workers}),
        }
    )
    with pytest.raises(UserError) as caught:
        corrupt(everything, prepared, tmp_path / "corrupted")
    message = str(caught.value)
    assert message.startswith(f"cannot read image {victim} (") and "\n" not in message
    assert message.endswith("remove or replace it, then rerun prepare")
    assert not (tmp_path / "corrupted").exists()
