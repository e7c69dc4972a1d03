"""Image folders decoded on the training device: the same crops as the PIL path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mfm.config import Params
from mfm.data.datasets import image_dataset
from mfm.data.device_decode import EncodedCrops, collate_encoded, decode_crops
from mfm.data.loaders import PerSampleSeeded, training_loader
from mfm.data.meta import load_meta
from tests.photos import write_photos

IMG = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mfm.prepare import run as prepare

    root = tmp_path_factory.mktemp("device_decode")
    photos = write_photos(root / "photos", {"train": 4, "val": 1})  # .png, .jpg, .JPEG mixed
    params = Params.model_validate(
        {"data": {"dataset": "imagefolder", "root": str(photos), "img_size": IMG}}
    )
    prepare(params, root / "prepared")
    return root / "prepared"


def test_same_boxes_and_pixels_as_the_pil_path(folder: Path) -> None:
    pil = PerSampleSeeded(image_dataset(folder, "train", IMG, True, (0.3, 1.0)), seed=3, epoch=1)
    encoded_set = image_dataset(folder, "train", IMG, True, (0.3, 1.0), decode_on_device=True)
    assert isinstance(encoded_set, EncodedCrops)
    encoded = PerSampleSeeded(encoded_set, seed=3, epoch=1)
    meta = load_meta(folder)
    for index in range(len(pil)):
        expected, label = pil[index]
        boxes, data, lengths, labels = collate_encoded([encoded[index]])
        got = decode_crops(boxes, data, lengths, IMG, meta.channels, torch.device("cpu"))[0]
        encoded_label = int(labels[0])
        assert label == encoded_label and got.shape == expected.shape == (3, IMG, IMG)
        # PIL's bicubic and torch's antialiased bicubic differ by rounding, not by the crop
        difference = (got.float() - expected.float()).abs()
        assert difference.mean() < 3.0, (index, difference.mean())
    other_box = PerSampleSeeded(encoded_set, seed=4, epoch=1)[0][1]
    assert not torch.equal(other_box, encoded[0][1])  # the seed decides the box


def test_batches_through_the_training_loader(folder: Path) -> None:
    dataset = image_dataset(folder, "train", IMG, True, (0.3, 1.0), decode_on_device=True)
    loader = training_loader(dataset, 4, seed=0, workers=1, epoch=0, collate=collate_encoded)
    boxes, data, lengths, labels = next(iter(loader))
    assert len(lengths) == 4 and boxes.shape == (4, 4) and labels.shape == (4,)
    assert data.numel() == lengths.sum()
    images = decode_crops(boxes, data, lengths, IMG, 3, torch.device("cpu"))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, IMG, IMG)


def test_grey_decoding(folder: Path) -> None:
    dataset = image_dataset(folder, "train", IMG, True, (0.3, 1.0), decode_on_device=True)
    boxes, data, lengths, _ = collate_encoded([PerSampleSeeded(dataset, 0, 0)[1]])
    grey = decode_crops(boxes, data, lengths, IMG, 1, torch.device("cpu"))
    assert grey.shape == (1, 1, IMG, IMG)


def test_pretrain_runs_with_the_device_loader(folder: Path, tmp_path: Path) -> None:
    from mfm.pretrain import run as pretrain

    params = Params.model_validate(
        {
            "data": {"dataset": "imagefolder", "img_size": IMG},
            "model": {
                "name": "vit_tiny_patch16_224",
                "patch_size": 4,
                "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
            },
            "pretrain": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0},
            "runtime": {"device": "cpu", "loader": "device"},
        }
    )
    metrics = pretrain(params, folder, tmp_path / "pretrain")
    assert np.isfinite(metrics["final_loss"])
    assert (tmp_path / "pretrain" / "encoder.pt").is_file()
