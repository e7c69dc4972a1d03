"""The one training loop every training stage shares.

It owns what is easy to get subtly wrong: per-step warmup + cosine lr (timm scheduler),
AdamW without weight decay on 1-D params and biases (timm optimiser factory), gradient
clipping, bf16 autocast on CUDA, a stop on a non-finite loss that keeps the last good
checkpoint, atomic checkpoints every N epochs, and automatic resume of an interrupted run.
Each epoch reseeds torch with ``seed + epoch`` so a resumed run replays the exact batches
and augmentations an uninterrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm import tqdm

from mfm.errors import UserError
from mfm.io import save_torch
from mfm.tracking import open_live

log = logging.getLogger("mfm")

StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; asking for a missing device is a user error."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        # TF32 matmuls for the fp32 parts (AMP off, or ops autocast keeps in fp32).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device = 'cuda' but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("runtime.device = 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when AMP is on; full precision elsewhere (CPU bf16 is slower)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    """AdamW through timm: no decay on 1-D params and biases, optional layer-wise lr decay."""
    return create_optimizer_v2(
        model, opt="adamw", lr=lr, weight_decay=weight_decay, betas=betas, layer_decay=layer_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr: float,
) -> CosineLRScheduler:
    """Per-step linear warmup then cosine decay to ``min_lr`` (timm honours ``lr_scale``)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=min_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def optimizer_and_schedule(
    model: nn.Module,
    recipe: Any,
    num_images: int,
    stage: str,
    layer_decay: float | None = None,
) -> tuple[torch.optim.Optimizer, CosineLRScheduler, float, int]:
    """AdamW and its per-step schedule from a stage's params section (``batch_size``, ``lr``
    and ``min_lr`` per 512 images, ``epochs``, ``warmup_epochs``, ``weight_decay``,
    ``betas``); returns them with the scaled lr and the steps per epoch."""
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
    )
    return optimizer, scheduler, lr, steps_per_epoch


def fingerprint(config: dict[str, Any]) -> str:
    """Short stable hash of the settings a checkpoint was trained with."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LoopConfig:
    """How to run the loop; the stage decides what a step computes."""

    epochs: int
    device: torch.device
    amp: bool
    clip_grad: float | None
    seed: int
    checkpoint_path: Path
    checkpoint_every: int
    log_every: int
    live_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    desc: str = "train"


def stage_loop_config(
    recipe: Any,
    runtime: Any,
    device: torch.device,
    out_dir: Path,
    config: dict[str, Any],
    desc: str,
) -> LoopConfig:
    """The loop settings every training stage derives the same way from its params section
    (``epochs``, ``clip_grad``, ``checkpoint_every``, ``log_every``) and ``runtime``; the
    checkpoint and dvclive curves live in the stage's ``out_dir``."""
    return LoopConfig(
        epochs=recipe.epochs,
        device=device,
        amp=runtime.amp,
        clip_grad=recipe.clip_grad,
        seed=runtime.seed,
        checkpoint_path=out_dir / "checkpoint.pt",
        checkpoint_every=recipe.checkpoint_every,
        log_every=recipe.log_every,
        live_dir=out_dir / "live",
        config=config,
        desc=desc,
    )


@dataclass
class LoopResult:
    epochs_run: int
    resumed_from: int
    last_loss: float
    images_per_second: float
    history: list[dict[str, float]]


class TrainLoop:
    """Runs ``step_fn`` over epochs with schedule, clipping, AMP, checkpoints and resume."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: CosineLRScheduler,
        step_fn: StepFn,
        cfg: LoopConfig,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step_fn = step_fn
        self.cfg = cfg
        self.live: Any | None = None
        self.global_step = 0
        self.history: list[dict[str, float]] = []

    # -- checkpoints -------------------------------------------------------------------
    def state(self, epoch: int, complete: bool) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "history": self.history,
            "fingerprint": fingerprint(self.cfg.config),
            "complete": complete,
        }

    def save_checkpoint(self, epoch: int, complete: bool = False) -> None:
        save_torch(self.state(epoch, complete), self.cfg.checkpoint_path)

    def try_resume(self) -> int:
        """Resume an interrupted run with the same settings; return the first epoch to run.

        A finished run's checkpoint, or one made with other settings, is ignored: a stage is
        rerun because something changed, and then it must train from scratch.
        """
        path = self.cfg.checkpoint_path
        if not path.is_file():
            return 0
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a torn or foreign file
            raise UserError(
                f"checkpoint {path} is unreadable ({err.__class__.__name__}); "
                "delete it to train from scratch"
            ) from None
        if ckpt.get("complete") or ckpt.get("fingerprint") != fingerprint(self.cfg.config):
            log.info("%s: ignoring %s (finished run or other settings)", self.cfg.desc, path)
            return 0
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.global_step = int(ckpt["global_step"])
        self.history = list(ckpt["history"])
        epoch = int(ckpt["epoch"])
        log.info("%s: resuming from epoch %d (checkpoint %s)", self.cfg.desc, epoch, path)
        return epoch

    # -- training ----------------------------------------------------------------------
    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        if not torch.isfinite(loss):
            kept = self.cfg.checkpoint_path
            raise UserError(
                f"{self.cfg.desc}: loss is {loss.item()} at epoch {epoch + 1}, step "
                f"{self.global_step}; lower the learning rate or set clip_grad "
                f"(last good checkpoint kept: {kept if kept.is_file() else 'none yet'})"
            )

    def train_step(self, batch: Any, epoch: int) -> tuple[float, dict[str, float]]:
        self.scheduler.step_update(self.global_step)
        with autocast(self.cfg.device, self.cfg.amp):
            loss, logs = self.step_fn(batch)
        self._check_finite(loss, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.global_step += 1
        return float(loss.detach()), logs

    def log_step(self, loss: float, logs: dict[str, float]) -> None:
        if self.live is None or self.global_step % self.cfg.log_every:
            return
        self.live.step = self.global_step
        self.live.log_metric("train/loss", loss)
        self.live.log_metric("train/lr", self.optimizer.param_groups[0]["lr"])
        for name, value in logs.items():
            self.live.log_metric(f"train/{name}", value)

    def run_epoch(self, batches: Iterable[Any], epoch: int) -> dict[str, float]:
        self.model.train()
        total, count, images = 0.0, 0, 0
        start = time.perf_counter()
        bar = tqdm(
            batches,
            desc=f"{self.cfg.desc} {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            disable=None,  # a terminal gets a bar; a log file (Snakemake, SLURM) does not
        )
        for batch in bar:
            loss, logs = self.train_step(batch, epoch)
            total, count = total + loss, count + 1
            images += _batch_size(batch)
            bar.set_postfix(loss=f"{loss:.4f}")
            self.log_step(loss, logs)
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "loss": total / max(1, count),
            "images_per_second": images / max(seconds, 1e-9),
            "seconds": seconds,
        }

    def fit(
        self,
        epoch_batches: Callable[[int], Iterable[Any]],
        on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    ) -> LoopResult:
        """Train from the resume point to ``cfg.epochs``; ``epoch_batches(e)`` feeds epoch e."""
        first = self.try_resume()
        if self.cfg.live_dir is not None:
            self.live = open_live(self.cfg.live_dir, self.global_step if first else None)
        for epoch in range(first, self.cfg.epochs):
            torch.manual_seed(self.cfg.seed + epoch)
            record = self.run_epoch(epoch_batches(epoch), epoch)
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch))
            self.history.append(record)
            self.log_epoch(record)
            done = epoch + 1 == self.cfg.epochs
            if done or (epoch + 1) % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(epoch + 1, complete=done)
        if self.live is not None:
            self.live.end()
        last = self.history[-1] if self.history else {}
        speeds = [h["images_per_second"] for h in self.history[first:]] or [math.nan]
        return LoopResult(
            epochs_run=self.cfg.epochs - first,
            resumed_from=first,
            last_loss=float(last.get("loss", math.nan)),
            images_per_second=sum(speeds) / len(speeds),
            history=self.history,
        )

    def log_epoch(self, record: dict[str, float]) -> None:
        log.info(
            "%s: epoch %d/%d loss %.4f (%.1f img/s)",
            self.cfg.desc,
            int(record["epoch"]),
            self.cfg.epochs,
            record["loss"],
            record["images_per_second"],
        )
        if self.live is None:
            return
        self.live.step = self.global_step
        for name, value in record.items():
            if name != "epoch":
                self.live.log_metric(f"epoch/{name}", value)


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0])
