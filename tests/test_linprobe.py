"""The linprobe stage: both probes on synthetic features, pooling, and a tiny run on digits."""

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
from mfm.errors import UserError
from mfm.linprobe import (
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
    for name in ("pretrained", "random"):
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
