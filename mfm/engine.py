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
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.scheduler.scheduler import Scheduler
from torch import nn
from tqdm import tqdm

from mfm.checkpoints import fingerprint, read_checkpoint, write_checkpoint
from mfm.device import autocast
from mfm.distributed import World, barrier, sum_over_ranks
from mfm.errors import Interrupted, UserError
from mfm.seeding import rng_state, seed_everything, set_rng_state
from mfm.tracking import open_live, publish_live

log = logging.getLogger("mfm")

StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
# epoch -> first global batch -> the batches of that epoch from there on
EpochBatches = Callable[[int, int], Iterable[Any]]
STOP_SIGNALS = (signal.SIGTERM,)


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
        scheduler: Scheduler,
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
        write_checkpoint(self.state(epoch, complete, tally), self.cfg.checkpoint_path, complete)

    def try_resume(self) -> tuple[int, int]:
        """Resume an interrupted run with the same settings; return (epoch, global batch of
        that epoch) to start from.

        A finished run's checkpoint, or one made with other settings, is ignored: a stage is
        rerun because something changed, and then it must train from scratch.
        """
        ckpt = read_checkpoint(self.cfg.checkpoint_path, self.cfg.desc)
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
