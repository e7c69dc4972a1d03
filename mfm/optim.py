"""A training stage's optimiser and per-step schedule, built the same way for every stage.

timm does the work: AdamW without weight decay on 1-D params and biases (optionally with
layer-wise lr decay) and a per-step warmup + cosine schedule (poly decay for segmentation, as
the UPerNet recipes do). Base learning rates are given
per 512 images and scaled linearly with the global batch, as the paper does.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from mfm.errors import UserError


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: ``base_lr`` is the lr for 512 images per step."""
    return base_lr * batch_size / 512


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW through timm: no decay on 1-D params and biases, optional layer-wise lr decay;
    fused into one kernel per step when the model is on a GPU."""
    extra = {"fused": True} if fused_adamw(model) else {}
    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        layer_decay=layer_decay,
        **extra,
    )


def fused_adamw(model: nn.Module) -> bool:
    """Whether every param is on a CUDA device, where fused AdamW saves the per-tensor kernel
    launches. CPU runs keep torch's default AdamW, whose rounding the committed results have."""
    params = list(model.parameters())
    return bool(params) and all(p.is_cuda for p in params)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr: float,
    poly_power: float | None = None,
) -> Scheduler:
    """Per-step linear warmup then cosine decay to ``min_lr`` (timm honours ``lr_scale``);
    with ``poly_power``, poly decay ``(1 - t / T) ** power`` instead."""
    common = {
        "t_initial": max(1, total_steps - warmup_steps),
        "lr_min": min_lr,
        "warmup_t": warmup_steps,
        "warmup_lr_init": min_lr,
        "warmup_prefix": True,
        "t_in_epochs": False,
    }
    if poly_power is not None:
        return PolyLRScheduler(optimizer, power=poly_power, **common)
    return CosineLRScheduler(optimizer, **common)


def optimizer_and_schedule(
    model: nn.Module,
    recipe: Any,
    num_images: int,
    stage: str,
    layer_decay: float | None = None,
) -> tuple[torch.optim.Optimizer, Scheduler, float, int]:
    """AdamW and its per-step schedule from a stage's params section (``batch_size``, ``lr``
    and ``min_lr`` per 512 images, ``epochs``, ``warmup_epochs``, ``weight_decay``,
    ``betas``, and ``poly_power`` where the section has one); returns them with the scaled lr
    and the steps per epoch."""
    if num_images < recipe.batch_size:
        raise UserError(
            f"{stage}.batch_size = {recipe.batch_size} exceeds the {num_images} training "
            f"images; lower {stage}.batch_size"
        )
    steps_per_epoch = num_images // recipe.batch_size
    lr = scaled_lr(recipe.lr, recipe.batch_size)
    optimizer = build_optimizer(model, lr, recipe.weight_decay, recipe.betas, layer_decay)
    scheduler = build_scheduler(
        optimizer,
        total_steps=recipe.epochs * steps_per_epoch,
        warmup_steps=round(recipe.warmup_epochs * steps_per_epoch),
        min_lr=scaled_lr(recipe.min_lr, recipe.batch_size),
        poly_power=getattr(recipe, "poly_power", None),
    )
    return optimizer, scheduler, lr, steps_per_epoch
