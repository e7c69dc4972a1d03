"""The linprobe stage: are the pretrained encoder's frozen features better than random ones?

Both the pretrained encoder and a fresh init of the same architecture (seeded with
runtime.seed) embed a seeded subset of the training images and the whole test split once;
two probes then score those features: a logistic regression whose C is picked on held-out
training images, and the weighted k-NN used in SSL papers. The difference between the two
encoders is what pretraining bought. Features are what the model's own timm head pools; for
the ViT family ``linprobe.pool`` picks timm's pool type (mean: 'avg', cls: 'token').

The same probes also run on raw pixels (the evaluation-preprocessed images, area-resized to
at most ``linprobe.pixel_size`` and flattened): where "no encoder at all" stands.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from mfm.config import LinprobeParams, Params
from mfm.data.augment import device_augment, normalizer
from mfm.data.datasets import image_dataset
from mfm.data.loaders import make_loader
from mfm.data.meta import DatasetMeta, load_meta
from mfm.data.workers import Workers
from mfm.device import resolve_device
from mfm.errors import UserError
from mfm.models import Encoder, encoder_from_spec, load_encoder, token_pooling
from mfm.paths import PREPARED_DIR, PRETRAIN_DIR

log = logging.getLogger("mfm.linprobe")

ENCODER_FILE = "encoder.pt"
RERUN_PRETRAIN = "rerun the pretrain stage (dvc repro pretrain) for the current data"


# --------------------------------------------------------------------------- features


TIMM_POOL = {"mean": "avg", "cls": "token"}


def select_pool(encoder: Encoder, pool: str) -> None:
    """Point a ViT-family head at ``pool``: timm's 'avg' over the patch tokens or 'token',
    each followed by the model's ``fc_norm``. CNNs and Swin have no tokens to choose from and
    keep their own pooling."""
    backbone = encoder.backbone
    if not token_pooling(backbone):
        return
    if pool not in TIMM_POOL:
        raise ValueError(f"pool must be 'mean' or 'cls', not {pool!r}")
    if pool == "cls" and getattr(backbone, "cls_token", None) is None:
        raise UserError(
            f"linprobe.pool = 'cls' but {encoder.spec['name']} has no class token; "
            "set linprobe.pool: mean"
        )
    backbone.reset_classifier(0, TIMM_POOL[pool])


class EncoderFeatures(nn.Module):
    """An encoder's pooled features: what its timm head pools (``pool`` picks it for ViTs)."""

    def __init__(self, encoder: Encoder, pool: str) -> None:
        super().__init__()
        select_pool(encoder, pool)
        self.encoder = encoder
        self.num_features = encoder.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.pooled_features(images)


class PixelFeatures(nn.Module):
    """Raw pixels: the preprocessed images, area-averaged down to ``size`` px when they are
    larger (box filter, so no aliasing; never upsampled), flattened to C * side**2 values.

    ``size`` None keeps ``img_size``. Area resizing is linear with weights summing to one, so
    it commutes with the per-channel standardisation that comes before it.
    """

    def __init__(self, channels: int, img_size: int, size: int | None) -> None:
        super().__init__()
        self.side = img_size if size is None else min(size, img_size)
        self.num_features = channels * self.side**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.side, self.side):
            images = nn.functional.interpolate(images, size=(self.side, self.side), mode="area")
        return images.flatten(1)


def extract_features(
    features: EncoderFeatures | PixelFeatures,
    dataset: Dataset,
    meta: DatasetMeta,
    img_size: int,
    batch_size: int,
    device: torch.device | str,
    workers: Workers = 0,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """``features`` (N, D) float32 of ``dataset``'s images as evaluation preprocesses them
    (resized to ``img_size``, standardised), and labels (N,) int64, in its order."""
    features = features.to(device).eval()  # outside inference mode: weights stay normal tensors
    prepare = nn.Sequential(device_augment(meta, img_size, train=False), normalizer(meta))
    loader = make_loader(
        dataset, batch_size, shuffle=False, seed=0, workers=workers, drop_last=False
    )
    batches = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)
    return _embed(features, prepare.to(device), batches, device)


@torch.inference_mode()
def _embed(
    features: EncoderFeatures | PixelFeatures,
    prepare: nn.Module,
    batches: Any,
    device: torch.device | str,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every (uint8 images, labels) batch, gathered on the CPU."""
    vectors, labels = [], []
    for images, targets in batches:
        batch = features(prepare(images.to(device, non_blocking=True)))
        vectors.append(batch.float().cpu().numpy())
        labels.append(np.asarray(targets, dtype=np.int64))
    if not vectors:
        return np.zeros((0, features.num_features), np.float32), np.zeros(0, np.int64)
    return np.concatenate(vectors).astype(np.float32), np.concatenate(labels)


# --------------------------------------------------------------------------- logistic probe


def _fit_counting_convergence(model: Any, x: np.ndarray, y: np.ndarray) -> bool:
    """Fit; return False if it stopped at max_iter.

    sklearn warns once per fit, which floods a C sweep; the caller logs one line instead.
    Every other warning is passed on untouched.
    """
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y)
    converged = True
    for item in caught:
        if issubclass(item.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return converged


def _logistic(c: float, max_iter: int) -> Any:
    """Standardised features into a multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _can_stratify(labels: np.ndarray, n_val: int) -> bool:
    """A stratified split needs >= 2 images per class and room for every class on both sides."""
    counts = np.unique(labels, return_counts=True)[1]
    classes = len(counts)
    return bool(counts.min() >= 2) and classes <= n_val <= len(labels) - classes


def split_held_out(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded fit/held-out indices, stratified whenever the class counts allow it."""
    from sklearn.model_selection import train_test_split

    n_val = max(1, math.ceil(val_fraction * len(labels)))
    stratify = labels if _can_stratify(labels, n_val) else None
    fit_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=n_val, stratify=stratify, random_state=seed
    )
    return fit_idx, val_idx


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(model.predict(x) == y))


def _check_classes(labels: np.ndarray, what: str) -> None:
    """A classifier needs two classes; a tiny subset may not have them."""
    if len(np.unique(labels)) < 2:
        raise UserError(
            f"the linprobe {what} holds a single class; raise linprobe.train_limit "
            "(or lower linprobe.val_fraction)"
        )


def fit_logistic(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    c_grid: list[float],
    val_fraction: float,
    max_iter: int,
    seed: int,
) -> dict[str, Any]:
    """Pick C on held-out training images, refit on all of them, score the test set."""
    _check_classes(train_y, "training subset")
    fit_idx, val_idx = split_held_out(train_y, val_fraction, seed)
    _check_classes(train_y[fit_idx], "fit part of the training subset")
    val_top1: dict[str, float] = {}
    unconverged: list[float] = []
    best_c, best_score = None, -1.0
    for c in sorted(set(c_grid)):  # ascending, and only a strictly better score moves on
        model = _logistic(c, max_iter)
        if not _fit_counting_convergence(model, train_x[fit_idx], train_y[fit_idx]):
            unconverged.append(c)
        score = _accuracy(model, train_x[val_idx], train_y[val_idx])
        val_top1[str(c)] = score
        if score > best_score:
            best_c, best_score = c, score
    assert best_c is not None  # c_grid is validated non-empty
    model = _logistic(best_c, max_iter)
    if not _fit_counting_convergence(model, train_x, train_y):
        unconverged.append(best_c)
    if unconverged:
        log.warning(
            "logistic regression stopped at max_iter = %d for C in %s; "
            "raise linprobe.max_iter if the accuracies look low",
            max_iter,
            sorted(set(unconverged)),
        )
    return {"top1": _accuracy(model, test_x, test_y), "C": float(best_c), "val_top1": val_top1}


# --------------------------------------------------------------------------- k-NN probe


def _knn_votes(
    sims: torch.Tensor, train_y: torch.Tensor, k: int, temperature: float, num_classes: int
) -> torch.Tensor:
    """Per-class sums of exp(sim / T) over the k most similar training images."""
    top_sims, top_idx = sims.topk(k, dim=1)
    # Shifting by the row maximum scales a row's weights alike: same argmax, no overflow.
    weights = ((top_sims - top_sims[:, :1]) / temperature).exp()
    votes = weights.new_zeros(sims.shape[0], num_classes)
    return votes.scatter_add_(1, train_y[top_idx], weights)


def knn_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN top-1 in percent on cosine similarity (InstDisc / DINO evaluation)."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("k-NN needs at least one training and one test sample")
    train = nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    test = nn.functional.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.int64)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        sims = test[start : start + chunk] @ train.T
        predicted = _knn_votes(sims, labels, k, temperature, num_classes).argmax(dim=1)
        truth = torch.as_tensor(test_y[start : start + chunk], dtype=torch.int64)
        correct += int((predicted == truth).sum())
    return 100.0 * correct / len(test)


# --------------------------------------------------------------------------- stage


def _check_encoder_fits(encoder: Encoder, meta: DatasetMeta, img_size: int) -> None:
    """An encoder pretrained on other data would fail deep inside timm; say so up front."""
    spec = encoder.spec
    if spec["in_chans"] != meta.channels:
        raise UserError(
            f"the pretrained encoder takes {spec['in_chans']}-channel images but "
            f"{meta.dataset} has {meta.channels}; {RERUN_PRETRAIN}"
        )
    if spec.get("img_size") is not None and spec["img_size"] != img_size:
        raise UserError(
            f"the pretrained encoder was built for {spec['img_size']} px images but "
            f"data.img_size is {img_size}; {RERUN_PRETRAIN}"
        )


def train_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``limit`` images (kept in dataset order); all if None or more."""
    total = len(dataset)
    if limit is None or limit >= total:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(total, generator=generator)[:limit].sort().values
    return Subset(dataset, keep.tolist())


def probe(
    features: EncoderFeatures | PixelFeatures,
    name: str,
    train_set: Dataset,
    test_set: Dataset,
    meta: DatasetMeta,
    params: Params,
    device: torch.device,
) -> tuple[dict[str, float], int]:
    """Both probes on one feature function's output; returns its metrics and feature size."""
    cfg: LinprobeParams = params.linprobe
    common = {
        "meta": meta,
        "img_size": params.data.img_size,
        "batch_size": cfg.batch_size,
        "device": device,
        "workers": params.runtime.workers,
    }
    train_x, train_y = extract_features(features, train_set, desc=f"{name} train", **common)
    test_x, test_y = extract_features(features, test_set, desc=f"{name} test", **common)
    logistic = fit_logistic(
        train_x,
        train_y,
        test_x,
        test_y,
        cfg.c_grid,
        cfg.val_fraction,
        cfg.max_iter,
        params.runtime.seed,
    )
    knn = knn_top1(
        train_x, train_y, test_x, test_y, cfg.knn_k, cfg.knn_temperature, meta.num_classes
    )
    metrics = {"logreg_top1": logistic["top1"], "logreg_C": logistic["C"], "knn_top1": knn}
    log.info(
        "linprobe[%s]: logreg %.2f%% (C=%g), %d-NN %.2f%%",
        name,
        metrics["logreg_top1"],
        metrics["logreg_C"],
        cfg.knn_k,
        knn,
    )
    return metrics, int(train_x.shape[1])


def run(
    params: Params,
    prepared_dir: str | Path = PREPARED_DIR,
    pretrain_dir: str | Path = PRETRAIN_DIR,
) -> dict[str, Any]:
    """Probe the pretrained and a random encoder, and raw pixels as the no-encoder reference;
    returns ``metrics/linprobe.json``."""
    prepared_dir, pretrain_dir = Path(prepared_dir), Path(pretrain_dir)
    seed, img_size = params.runtime.seed, params.data.img_size
    torch.manual_seed(seed)
    device = resolve_device(params.runtime.device)
    meta = load_meta(prepared_dir, params.data.dataset)
    pretrained = load_encoder(pretrain_dir / ENCODER_FILE)
    _check_encoder_fits(pretrained, meta, img_size)
    torch.manual_seed(seed)  # a fresh init of the same architecture, seeded with runtime.seed
    random_init = encoder_from_spec(pretrained.spec)

    draft = params.runtime.jpeg_draft
    full_train = image_dataset(prepared_dir, "train", img_size, False, jpeg_draft=draft)
    train_set = train_subset(full_train, params.linprobe.train_limit, seed)
    test_set = image_dataset(prepared_dir, "test", img_size, False, jpeg_draft=draft)
    log.info(
        "linprobe: %s on %s, %d train / %d test images, pool %s, device %s",
        pretrained.spec["name"],
        meta.dataset,
        len(train_set),
        len(test_set),
        params.linprobe.pool,
        device,
    )
    pool = params.linprobe.pool
    runs: dict[str, EncoderFeatures | PixelFeatures] = {
        "pretrained": EncoderFeatures(pretrained, pool),
        "random": EncoderFeatures(random_init, pool),
        "pixels": PixelFeatures(meta.channels, img_size, params.linprobe.pixel_size),
    }
    scores: dict[str, dict[str, float]] = {}
    dims: dict[str, int] = {}
    for name, features in runs.items():
        scores[name], dims[name] = probe(features, name, train_set, test_set, meta, params, device)
    gain = {
        key: scores["pretrained"][key] - scores["random"][key]
        for key in ("logreg_top1", "knn_top1")
    }
    return {
        "pool": params.linprobe.pool,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "feature_dim": dims["pretrained"],
        "pixel_dim": dims["pixels"],
        **scores,
        "gain": gain,
    }
