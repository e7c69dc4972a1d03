"""The one training loop every training stage shares.

It owns what is easy to get subtly wrong: per-step warmup + cosine lr (timm scheduler),
AdamW without weight decay on 1-D params and biases (timm optimiser factory), gradient
clipping, bf16 autocast on CUDA, a stop on a non-finite loss that keeps the last good
checkpoint, atomic checkpoints every N epochs, and automatic resume of an interrupted run.
Each epoch reseeds torch with ``seed + epoch`` so a resumed run replays the exact batches
and augmentations an uninterrupted one would have seen. SIGTERM (a cluster's time limit,
``scancel``) finishes the current step, writes a mid-epoch checkpoint with the RNG state and
stops; the rerun continues from that step. Under torchrun, only rank 0 writes or logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
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

from mfm.distributed import World, barrier, sum_over_ranks
from mfm.errors import Interrupted, UserError
from mfm.io import save_torch
from mfm.seeding import rng_state, seed_everything, set_rng_state
from mfm.tracking import open_live, publish_live

log = logging.getLogger("mfm")

StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
# epoch -> first global batch -> the batches of that epoch from there on
EpochBatches = Callable[[int, int], Iterable[Any]]
CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "global_step", "history", "fingerprint"}
STOP_SIGNALS = (signal.SIGTERM,)


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before the latest one is kept, the fallback if that is torn."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


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


@dataclass
class EpochTally:
    """Running sums of one epoch, kept in a mid-epoch checkpoint so a resumed epoch reports
    the same mean loss as an uninterrupted one."""

    steps: int = 0
    loss_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0


class TrainLoop:
    """Runs ``step_fn`` over epochs with schedule, clipping, AMP, checkpoints and resume.

    ``model`` is the bare module (its state is what checkpoints hold); ``step_fn`` may call a
    DDP wrapper of it. ``here`` says which torchrun rank this is.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: CosineLRScheduler,
        step_fn: StepFn,
        cfg: LoopConfig,
        here: World | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step_fn = step_fn
        self.cfg = cfg
        self.here = here or World()
        self.live: Any | None = None
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.stop_requested = False
        self._resume_tally: EpochTally | None = None
        self._resume_rng: dict[str, Any] | None = None

    # -- checkpoints -------------------------------------------------------------------
    def state(self, epoch: int, complete: bool, tally: EpochTally | None = None) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "history": self.history,
            "fingerprint": fingerprint(self.cfg.config),
            "complete": complete,
        }
        if tally is not None:  # stopped inside an epoch: how far, and the RNG to go on with
            state["partial"] = vars(tally).copy()
            state["rng"] = rng_state()
        return state

    def save_checkpoint(
        self, epoch: int, complete: bool = False, tally: EpochTally | None = None
    ) -> None:
        """Rank 0 writes; the checkpoint it replaces becomes the fallback copy."""
        if not self.here.is_main:
            return
        path = self.cfg.checkpoint_path
        state = self.state(epoch, complete, tally)
        if path.is_file():
            os.replace(path, previous_checkpoint(path))
        save_torch(state, path)
        if complete:
            previous_checkpoint(path).unlink(missing_ok=True)

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint: the latest, else the one before it (a kill while
        writing, a full disk). None if there is none; a UserError if none is readable."""
        path = self.cfg.checkpoint_path
        candidates = [p for p in (path, previous_checkpoint(path)) if p.is_file()]
        problems = []
        for candidate in candidates:
            try:
                ckpt = torch.load(candidate, map_location="cpu", weights_only=True)
                if not isinstance(ckpt, dict) or not set(ckpt) >= CHECKPOINT_KEYS:
                    raise ValueError("not a training checkpoint")
            except Exception as err:  # noqa: BLE001 - a torn, truncated or foreign file
                problems.append(f"{candidate} ({err.__class__.__name__})")
                log.warning("%s: checkpoint %s is unreadable", self.cfg.desc, candidate)
                continue
            if problems:
                log.warning("%s: falling back to the previous checkpoint", self.cfg.desc)
            return ckpt
        if problems:
            raise UserError(
                f"{self.cfg.desc}: no readable checkpoint: {'; '.join(problems)}; delete "
                f"{' and '.join(p.split(' (')[0] for p in problems)} to train from scratch"
            )
        return None

    def try_resume(self) -> tuple[int, int]:
        """Resume an interrupted run with the same settings; return (epoch, global batch of
        that epoch) to start from.

        A finished run's checkpoint, or one made with other settings, is ignored: a stage is
        rerun because something changed, and then it must train from scratch.
        """
        ckpt = self._read_checkpoint()
        if ckpt is None:
            return 0, 0
        if ckpt.get("complete") or ckpt.get("fingerprint") != fingerprint(self.cfg.config):
            log.info("%s: ignoring the checkpoint (finished run or other settings)", self.cfg.desc)
            return 0, 0
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.global_step = int(ckpt["global_step"])
        self.history = list(ckpt["history"])
        epoch, skip = int(ckpt["epoch"]), 0
        if "partial" in ckpt:
            self._resume_tally = EpochTally(**ckpt["partial"])
            self._resume_rng = ckpt["rng"]
            skip = self._resume_tally.steps
        log.info(
            "%s: resuming from epoch %d%s (checkpoint %s)",
            self.cfg.desc,
            epoch,
            f", step {skip} of epoch {epoch + 1}" if skip else "",
            self.cfg.checkpoint_path,
        )
        return epoch, skip

    # -- signals -----------------------------------------------------------------------
    @contextlib.contextmanager
    def stop_on_signals(self) -> Any:
        """SIGTERM asks the loop to checkpoint after the current step and stop."""

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True
            log.warning("%s: got signal %d; stopping after this step", self.cfg.desc, signum)

        try:
            previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- training ----------------------------------------------------------------------
    def _check_finite(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            kept = self.cfg.checkpoint_path
            raise UserError(
                f"{self.cfg.desc}: loss is {loss} at epoch {epoch + 1}, step "
                f"{self.global_step}; lower the learning rate or set clip_grad "
                f"(last good checkpoint kept: {kept if kept.is_file() else 'none yet'})"
            )

    def train_step(self, batch: Any, epoch: int) -> tuple[float, dict[str, float]]:
        self.scheduler.step_update(self.global_step)
        with autocast(self.cfg.device, self.cfg.amp):
            loss, logs = self.step_fn(batch)
        # One all-reduce gives every rank the global batch's loss and whether any rank was
        # asked to stop, so all ranks raise, stop or go on together.
        total, stops = sum_over_ranks(
            [float(loss.detach()), float(self.stop_requested)], self.here, self.cfg.device
        )
        mean_loss = total / self.here.size
        self.stop_requested = stops > 0
        self._check_finite(mean_loss, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.global_step += 1
        return mean_loss, logs

    def log_step(self, loss: float, logs: dict[str, float]) -> None:
        if self.live is None or self.global_step % self.cfg.log_every:
            return
        self.live.step = self.global_step
        self.live.log_metric("train/loss", loss)
        self.live.log_metric("train/lr", self.optimizer.param_groups[0]["lr"])
        for name, value in logs.items():
            self.live.log_metric(f"train/{name}", value)

    def run_epoch(
        self, batches: Iterable[Any], epoch: int, tally: EpochTally | None = None
    ) -> dict[str, float]:
        """Train one epoch (or its rest, after a mid-epoch resume); stops on a signal."""
        self.model.train()
        tally = tally or EpochTally()
        bar = tqdm(
            batches,
            desc=f"{self.cfg.desc} {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            # a terminal gets a bar; a log file (Snakemake, SLURM) or rank > 0 does not
            disable=None if self.here.is_main else True,
        )
        left = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        last = time.perf_counter()
        for batch in bar:
            loss, logs = self.train_step(batch, epoch)
            now = time.perf_counter()  # loading included: the wall time of the epoch
            tally.steps += 1
            tally.loss_sum += loss
            tally.images += _batch_size(batch) * self.here.size
            tally.seconds, last = tally.seconds + now - last, now
            bar.set_postfix(loss=f"{loss:.4f}")
            self.log_step(loss, logs)
            left = None if left is None else left - 1
            if self.stop_requested and left != 0:  # on the last batch, let the epoch end
                bar.close()
                self.save_checkpoint(epoch, tally=tally)
                barrier(self.here)
                raise Interrupted(
                    f"{self.cfg.desc}: stopped by a signal at epoch {epoch + 1}, step "
                    f"{tally.steps}; checkpoint {self.cfg.checkpoint_path} written, rerun "
                    "to resume"
                )
        return {
            "epoch": epoch + 1,
            "loss": tally.loss_sum / max(1, tally.steps),
            "images_per_second": tally.images / max(tally.seconds, 1e-9),
            "seconds": tally.seconds,
        }

    def fit(
        self,
        epoch_batches: EpochBatches,
        on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    ) -> LoopResult:
        """Train from the resume point to ``cfg.epochs``; ``epoch_batches(e, k)`` feeds
        epoch e from its k-th global batch on."""
        first, skip = self.try_resume()
        if self.cfg.live_dir is not None and self.here.is_main:
            self.live = open_live(self.cfg.live_dir, self.global_step if first or skip else None)
        with self.stop_on_signals():
            for epoch in range(first, self.cfg.epochs):
                seed_everything(self.cfg.seed + epoch)
                tally = None
                if epoch == first and self._resume_rng is not None:
                    set_rng_state(self._resume_rng)
                    tally = self._resume_tally
                batches = epoch_batches(epoch, skip if epoch == first else 0)
                record = self.run_epoch(batches, epoch, tally)
                if on_epoch_end is not None:
                    record.update(on_epoch_end(epoch))
                self.history.append(record)
                self.log_epoch(record)
                done = epoch + 1 == self.cfg.epochs
                if done or (epoch + 1) % self.cfg.checkpoint_every == 0 or self.stop_requested:
                    self.save_checkpoint(epoch + 1, complete=done)
                if self.stop_requested and not done:
                    barrier(self.here)
                    raise Interrupted(
                        f"{self.cfg.desc}: stopped by a signal after epoch {epoch + 1}; "
                        f"checkpoint {self.cfg.checkpoint_path} written, rerun to resume"
                    )
        if self.live is not None and self.cfg.live_dir is not None:
            publish_live(self.live, self.cfg.live_dir)
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
