"""Pretraining throughput on synthetic images: img/s and what the frequency work costs.

The same step the pretrain stage runs (device-side crop and flip, corruption, forward,
frequency loss, backward, AdamW), timed after a warm-up, next to the corruption alone and
the loss (forward and backward) alone. Their share of the step is MFM's overhead over plain
pixel regression.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from mfm.config import Params
from mfm.data import DatasetMeta, device_augment, normalizer
from mfm.engine import autocast, build_optimizer, resolve_device, scaled_lr
from mfm.frequency import build_corruption
from mfm.losses import FrequencyLoss
from mfm.models import MFMModel, build_encoder


def synthetic_meta(channels: int, img_size: int) -> DatasetMeta:
    """Stand-in dataset description: the bench needs shapes and statistics, not data."""
    return DatasetMeta(
        dataset="synthetic",
        kind="arrays",
        classes=["0"],
        num_classes=1,
        channels=channels,
        image_size=(img_size, img_size),
        mean=[0.5] * channels,
        std=[0.25] * channels,
        num_train=0,
        num_test=0,
        source="synthetic",
    )


def _timed(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run(params: Params, batch_size: int, steps: int, warmup: int, channels: int) -> dict[str, Any]:
    """Time one pretraining step and its frequency parts; returns the figures as a dict."""
    torch.manual_seed(params.runtime.seed)
    device = resolve_device(params.runtime.device)
    img_size = params.data.img_size
    meta = synthetic_meta(channels, img_size)
    model = MFMModel(build_encoder(params.model, img_size, channels), channels).to(device)
    optimizer = build_optimizer(
        model, scaled_lr(params.pretrain.lr, batch_size), 0.05, params.pretrain.betas
    )
    corruption = build_corruption(params.pretrain).to(device)
    loss_fn = FrequencyLoss.from_params(params.pretrain.loss)
    augment = device_augment(meta, img_size, train=True).to(device)
    normalize = normalizer(meta).to(device)
    images = torch.randint(0, 256, (batch_size, channels, img_size, img_size), dtype=torch.uint8)
    images = images.to(device)
    amp = params.runtime.amp

    def train_step() -> None:
        with autocast(device, amp):
            clean = augment(images)
            corrupted, mask = corruption.corrupt(clean)
            loss = loss_fn(model(normalize(corrupted)), normalize(clean), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    clean = augment(images)
    _, fixed_mask = corruption.corrupt(clean)
    target = normalize(clean)
    prediction = torch.randn_like(target)

    def corrupt_only() -> None:
        with autocast(device, amp):
            corruption.corrupt(clean)

    def loss_only() -> None:
        pred = prediction.clone().requires_grad_(True)
        with autocast(device, amp):
            loss = loss_fn(pred, target, fixed_mask)
        loss.backward()

    model.train()
    step_s = _timed(train_step, device, steps, warmup)
    corrupt_s = _timed(corrupt_only, device, steps, warmup)
    loss_s = _timed(loss_only, device, steps, warmup)
    return {
        "model": params.model.name,
        "pretext": params.pretrain.pretext,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "amp": bool(amp and device.type == "cuda"),
        "img_size": img_size,
        "channels": channels,
        "batch_size": batch_size,
        "timed_steps": steps,
        "images_per_second": batch_size / step_s,
        "step_ms": 1000 * step_s,
        "corruption_ms": 1000 * corrupt_s,
        "loss_ms": 1000 * loss_s,
        "frequency_share": (corrupt_s + loss_s) / step_s,
    }
