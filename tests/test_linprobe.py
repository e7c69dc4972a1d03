"""The linprobe stage: both probes on synthetic features, pooling, raw-pixel features, and tiny
runs on digits and on a synthetic separable set."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mfm.prepare
from mfm.config import ModelParams, Params
from mfm.data.augment import device_augment, normalizer
from mfm.data.meta import DatasetMeta
from mfm.data.prepared import write_prepared
from mfm.data.sources.common import ArrayData
from mfm.errors import UserError
from mfm.linprobe import (
    PixelFeatures,
    extract_features,
    fit_logistic,
    knn_top1,
    run,
    select_pool,
    split_held_out,
    train_subset,
)
from mfm.models import Encoder, build_encoder, save_encoder

TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}
DIGITS_SIZE = 16
CHANCE = 10.0


def clusters(
    n_per_class: int, classes: int = 4, dim: int = 16, spread: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent means far apart (10 * one-hot) plus small Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    means = 10.0 * np.eye(classes, dim)
    features = means[labels] + spread * rng.standard_normal((len(labels), dim))
    return features.astype(np.float32), labels.astype(np.int64)


def tiny_vit(img_size: int = 16, in_chans: int = 1, **kwargs: Any) -> Encoder:
    model = ModelParams(patch_size=4, kwargs={**TINY_VIT, **kwargs})
    return build_encoder(model, img_size=img_size, in_chans=in_chans).eval()


# --------------------------------------------------------------------------- logistic probe


def test_logistic_separates_separable_features() -> None:
    train_x, train_y = clusters(30, seed=0)
    test_x, test_y = clusters(10, seed=1)
    grid = [0.01, 0.1, 1.0]
    result = fit_logistic(train_x, train_y, test_x, test_y, grid, 0.25, 200, seed=0)
    assert result["top1"] >= 99.0
    assert result["C"] in grid
    assert set(result["val_top1"]) == {str(c) for c in grid}


def test_logistic_ties_pick_the_smallest_c() -> None:
    train_x, train_y = clusters(20, seed=0)
    test_x, test_y = clusters(5, seed=1)
    result = fit_logistic(train_x, train_y, test_x, test_y, [10.0, 1.0, 0.1], 0.25, 200, 0)
    assert all(score == 100.0 for score in result["val_top1"].values())
    assert result["C"] == 0.1


def test_held_out_split_is_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(5), 20)
    fit_idx, val_idx = split_held_out(labels, 0.2, seed=3)
    assert np.bincount(labels[val_idx]).tolist() == [4] * 5
    assert sorted([*fit_idx, *val_idx]) == list(range(100))
    again = split_held_out(labels, 0.2, seed=3)
    assert np.array_equal(again[1], val_idx)


def test_logistic_single_class_is_a_user_error() -> None:
    x, y = clusters(10, classes=1)
    with pytest.raises(UserError, match="linprobe.train_limit"):
        fit_logistic(x, y, x, y, [1.0], 0.2, 100, 0)


def test_logistic_non_convergence_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    train_x, train_y = clusters(20, spread=20.0, seed=0)  # heavy overlap: lbfgs needs many steps
    test_x, test_y = clusters(5, spread=20.0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning escaping would fail the test
        with caplog.at_level(logging.WARNING, logger="mfm.linprobe"):
            fit_logistic(train_x, train_y, test_x, test_y, [10.0, 100.0], 0.25, 1, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "linprobe.max_iter" in messages[0]


# --------------------------------------------------------------------------- k-NN probe


def test_knn_separates_clusters() -> None:
    train_x, train_y = clusters(25, seed=0)
    test_x, test_y = clusters(10, seed=1)
    top1 = knn_top1(train_x, train_y, test_x, test_y, 5, 0.07, num_classes=4, chunk=7)
    assert top1 == pytest.approx(100.0)


def test_knn_temperature_weighs_near_against_many() -> None:
    # One neighbour of class 0 at cosine 1, two of class 1 at cosine 0.5.
    angle = math.pi / 3
    far = [math.cos(angle), math.sin(angle)]
    train_x = np.array([[1.0, 0.0], far, far], dtype=np.float32)
    train_y = np.array([0, 1, 1])
    test_x, test_y = np.array([[2.0, 0.0]], dtype=np.float32), np.array([0])
    # exp(1/T) vs 2 exp(0.5/T): the near one wins when T < 0.5 / ln 2, the pair above it.
    assert knn_top1(train_x, train_y, test_x, test_y, 3, 0.05, num_classes=2) == 100.0
    assert knn_top1(train_x, train_y, test_x, test_y, 3, 100.0, num_classes=2) == 0.0
    assert knn_top1(train_x, train_y, test_x, test_y, 3, 1e-4, num_classes=2) == 100.0


def test_knn_k_larger_than_train_set() -> None:
    train_x, train_y = clusters(2, classes=3, seed=0)
    test_x, test_y = clusters(3, classes=3, seed=1)
    assert knn_top1(train_x, train_y, test_x, test_y, 50, 0.01, num_classes=3) == 100.0


# --------------------------------------------------------------------------- pooling


def pooled(encoder: Encoder, images: torch.Tensor, pool: str) -> torch.Tensor:
    select_pool(encoder, pool)
    with torch.no_grad():
        return encoder.pooled_features(images)


def test_pool_vit_mean_and_cls() -> None:
    torch.manual_seed(0)
    encoder = tiny_vit()
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        tokens = encoder.backbone.forward_features(images)
    mean, cls = pooled(encoder, images, "mean"), pooled(encoder, images, "cls")
    assert mean.shape == cls.shape == (3, 32)
    assert encoder.backbone.num_prefix_tokens == 1
    assert torch.allclose(mean, tokens[:, 1:].mean(dim=1))
    assert torch.allclose(cls, tokens[:, 0])
    assert not torch.allclose(mean, cls)


def test_pool_vit_without_class_token() -> None:
    torch.manual_seed(0)
    encoder = tiny_vit(class_token=False, global_pool="avg")
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens = encoder.backbone.forward_features(images)
        by_hand = encoder.backbone.fc_norm(tokens.mean(dim=1))  # no prefix tokens to drop
    mean = pooled(encoder, images, "mean")
    assert mean.shape == (2, 32)
    assert not isinstance(encoder.backbone.fc_norm, torch.nn.Identity)
    assert torch.allclose(mean, by_hand, atol=1e-6)
    with pytest.raises(UserError, match="linprobe.pool"):
        select_pool(encoder, "cls")


SWIN = {"window_size": 2, "embed_dim": 24, "depths": [1, 1], "num_heads": [1, 1]}


@pytest.mark.parametrize(
    "model",
    [
        ModelParams(patch_size=4, kwargs=TINY_VIT),
        ModelParams(name="resnet10t"),
        ModelParams(name="swin_tiny_patch4_window7_224", kwargs=SWIN),
    ],
    ids=["vit", "resnet", "swin"],
)
def test_pooled_features_average_the_map_the_head_sees(model: ModelParams) -> None:
    torch.manual_seed(0)
    encoder = build_encoder(model, img_size=32, in_chans=1).eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        feature_map = encoder.feature_map(images)
    features = pooled(encoder, images, "mean")
    assert feature_map.shape[-1] > 1
    assert features.shape == (2, encoder.num_features)
    assert torch.allclose(features, feature_map.mean(dim=(2, 3)), atol=1e-5)


def test_cnns_keep_their_own_pooling_whatever_the_pool() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(ModelParams(name="resnet10t"), img_size=32, in_chans=3).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(pooled(encoder, images, "cls"), pooled(encoder, images, "mean"))


# --------------------------------------------------------------------------- raw pixels


def array_meta(channels: int, side: int, mean: list[float], std: list[float]) -> DatasetMeta:
    return DatasetMeta(
        dataset="digits",
        kind="arrays",
        classes=["a", "b"],
        num_classes=2,
        channels=channels,
        image_size=(side, side),
        mean=mean,
        std=std,
        num_train=0,
        num_test=0,
        source="synthetic",
    )


def uint8_images(n: int, channels: int, side: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """(uint8 (C, side, side), label) pairs, as the prepared datasets yield them."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, channels, side, side), dtype=np.uint8)
    return [(torch.from_numpy(pixels[i]), i % 2) for i in range(n)]


MEAN, STD = [0.2, 0.5, 0.7], [0.1, 0.25, 0.4]


def test_pixel_features_are_the_standardised_images_flattened() -> None:
    data = uint8_images(5, channels=3, side=4)
    meta = array_meta(3, 4, MEAN, STD)
    features, labels = extract_features(
        PixelFeatures(3, img_size=4, size=None), data, meta, 4, batch_size=2, device="cpu"
    )
    images = np.stack([image.numpy() for image, _ in data]).astype(np.float64) / 255
    by_hand = (images - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))
    assert features.shape == (5, 3 * 4 * 4) and features.dtype == np.float32
    np.testing.assert_allclose(features, by_hand.reshape(5, -1), rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [0, 1, 0, 1, 0]
    # pixel_size 2: each output pixel is the mean of a 2 x 2 block of the standardised image
    halved, _ = extract_features(
        PixelFeatures(3, img_size=4, size=2), data, meta, 4, batch_size=4, device="cpu"
    )
    blocks = by_hand.reshape(5, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(halved, blocks.reshape(5, -1), rtol=1e-5, atol=1e-5)


def test_pixel_features_follow_the_evaluation_resize() -> None:
    # stored at 6 px, evaluated at 12 px: the pixels are the evaluation images, not the stored
    data = uint8_images(3, channels=1, side=6, seed=1)
    meta = array_meta(1, 6, [0.4], [0.3])
    features, _ = extract_features(
        PixelFeatures(1, img_size=12, size=None), data, meta, 12, batch_size=8, device="cpu"
    )
    batch = torch.stack([image for image, _ in data])
    with torch.no_grad():
        evaluated = normalizer(meta)(device_augment(meta, 12, train=False)(batch))
    assert evaluated.shape == (3, 1, 12, 12)
    np.testing.assert_allclose(features, evaluated.flatten(1).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("channels", "img_size", "size", "side"),
    [(3, 224, 32, 32), (3, 64, None, 64), (1, 16, 32, 16), (1, 28, 12, 12)],
    ids=["downsized", "null-keeps-img-size", "never-upsized", "non-integer-factor"],
)
def test_pixel_size_shapes(channels: int, img_size: int, size: int | None, side: int) -> None:
    features = PixelFeatures(channels, img_size, size)
    images = torch.rand(2, channels, img_size, img_size)
    flat = features(images)
    assert flat.shape == (2, channels * side * side) == (2, features.num_features)
    # a box filter averages: the mean is kept and no value leaves the input's range
    assert torch.allclose(flat.mean(), images.mean(), atol=1e-2)
    assert flat.min() >= images.min() and flat.max() <= images.max()


def test_pixel_size_averages_instead_of_aliasing() -> None:
    # one lit pixel in every 4 x 4 block: area-averaged to 2 px it is 1/16 everywhere, where
    # point sampling (nearest, or bilinear without antialiasing) would see 1 or 0
    dots = ((torch.arange(8)[:, None] % 4 == 0) & (torch.arange(8)[None, :] % 4 == 0)).float()
    flat = PixelFeatures(1, img_size=8, size=2)(dots[None, None])
    assert torch.allclose(flat, torch.full((1, 4), 1 / 16))


# --------------------------------------------------------------------------- the stage


def digits_params(**linprobe: Any) -> Params:
    settings = {"train_limit": 300, "c_grid": [0.1, 1.0], "max_iter": 300, "knn_k": 10}
    return Params.model_validate(
        {
            "data": {"dataset": "digits", "img_size": DIGITS_SIZE},
            "linprobe": {**settings, **linprobe},
            "runtime": {"device": "cpu", "seed": 0},
        }
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("linprobe") / "prepared"
    mfm.prepare.run(digits_params(), out)
    return out


def save_tiny_vit(pretrain_dir: Path, in_chans: int = 1) -> None:
    torch.manual_seed(1)
    save_encoder(tiny_vit(DIGITS_SIZE, in_chans), pretrain_dir / "encoder.pt")


def test_run_on_digits(prepared: Path, tmp_path: Path) -> None:
    save_tiny_vit(tmp_path)
    metrics = run(digits_params(), prepared, tmp_path)
    json.dumps(metrics)  # what the CLI writes to metrics/linprobe.json
    assert metrics["pool"] == "mean"
    assert metrics["train_images"] == 300
    assert metrics["test_images"] == 360
    assert metrics["feature_dim"] == TINY_VIT["embed_dim"]
    assert metrics["pixel_dim"] == DIGITS_SIZE**2  # pixel_size 32 > 16: kept at 16 px
    for name in ("pretrained", "random", "pixels"):
        scores = metrics[name]
        assert set(scores) == {"logreg_top1", "logreg_C", "knn_top1"}
        assert scores["logreg_C"] in (0.1, 1.0)
        assert CHANCE < scores["logreg_top1"] <= 100.0
        assert CHANCE < scores["knn_top1"] <= 100.0
    for key in ("logreg_top1", "knn_top1"):
        expected = metrics["pretrained"][key] - metrics["random"][key]
        assert metrics["gain"][key] == pytest.approx(expected)


def test_train_subset_is_seeded_and_capped() -> None:
    data = list(range(50))
    assert train_subset(data, None, 0) is data
    assert train_subset(data, 80, 0) is data
    subset = train_subset(data, 10, seed=4)
    picked = [subset[i] for i in range(len(subset))]
    assert len(picked) == 10 == len(set(picked))
    again = train_subset(data, 10, seed=4)
    assert picked == [again[i] for i in range(10)]


def test_run_with_cls_pool(prepared: Path, tmp_path: Path) -> None:
    save_tiny_vit(tmp_path)
    metrics = run(digits_params(pool="cls", train_limit=200, c_grid=[1.0]), prepared, tmp_path)
    assert metrics["pool"] == "cls"
    assert metrics["train_images"] == 200
    assert metrics["pretrained"]["knn_top1"] > CHANCE


def test_run_channel_mismatch(prepared: Path, tmp_path: Path) -> None:
    save_tiny_vit(tmp_path, in_chans=3)
    with pytest.raises(UserError, match="rerun the pretrain"):
        run(digits_params(), prepared, tmp_path)


def test_run_without_encoder(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pretrain"):
        run(digits_params(), prepared, tmp_path)


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8 x 8 grey images, class 0 bright on the left half, class 1 on the right, plus noise:
    linearly separable in pixel space."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, size=(n, 8, 8, 1))
    for i, label in enumerate(labels):
        images[i, :, 4 * label : 4 * label + 4] += 150
    return images.astype(np.uint8), labels.astype(np.int64)


def test_run_pixels_probe_on_a_separable_set(tmp_path: Path) -> None:
    train_images, train_labels = halves(40, seed=0)
    test_images, test_labels = halves(20, seed=1)
    data = ArrayData(
        train_images, train_labels, test_images, test_labels, ["left", "right"], "synthetic"
    )
    meta = array_meta(1, 8, [train_images.mean() / 255], [train_images.std() / 255])
    meta = meta.model_copy(update={"num_train": 40, "num_test": 20})
    write_prepared(data, meta, tmp_path / "prepared")
    torch.manual_seed(1)
    save_encoder(tiny_vit(img_size=8), tmp_path / "pretrain" / "encoder.pt")
    params = Params.model_validate(
        {
            "data": {"dataset": "digits", "img_size": 8},
            "linprobe": {
                "train_limit": None,
                "c_grid": [1.0],
                "val_fraction": 0.25,
                "knn_k": 5,
                "pixel_size": 4,
            },
            "runtime": {"device": "cpu", "seed": 0},
        }
    )
    metrics = run(params, tmp_path / "prepared", tmp_path / "pretrain")
    assert metrics["pixel_dim"] == 4 * 4
    pixels = metrics["pixels"]
    assert set(pixels) == set(metrics["pretrained"]) == set(metrics["random"])
    assert pixels["logreg_top1"] == 100.0
    assert pixels["knn_top1"] == 100.0
    assert pixels["logreg_C"] == 1.0
