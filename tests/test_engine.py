"""The shared training loop: optimiser groups, schedule, checkpoints, resume, NaN stop."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mfm.checkpoints import previous_checkpoint
from mfm.data.loaders import training_loader
from mfm.device import resolve_device
from mfm.engine import TrainLoop
from mfm.errors import Interrupted, UserError
from mfm.optim import build_optimizer, build_scheduler, scaled_lr
from mfm.tracking import trim_history
from tests.conftest import cpu_loop_config

STEPS_PER_EPOCH = 4


class Interrupt(Exception):
    """Stands in for a kill in the middle of an epoch."""


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 1))


def make_loop(
    path: Path,
    epochs: int = 4,
    config: dict | None = None,
    fail_at: int | None = None,
    sigterm_at: int | None = None,
) -> TrainLoop:
    model = tiny_model()
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, epochs * STEPS_PER_EPOCH, 2, min_lr=1e-4)
    calls = {"n": 0}

    def step(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise Interrupt
        if sigterm_at is not None and calls["n"] == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's time limit would
        x, y = batch
        noisy = x + 0.1 * torch.randn_like(x)  # seeded per epoch by the loop
        return nn.functional.mse_loss(model(noisy).squeeze(1), y), {}

    cfg = cpu_loop_config(
        path, epochs, clip_grad=1.0, live_dir=path / "live", config=config or {"lr": 0.05}
    )
    return TrainLoop(model, optimizer, scheduler, step, cfg)


def toy_data() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, generator=g))


def batches(epoch: int, start_batch: int = 0) -> torch.utils.data.DataLoader:
    return training_loader(toy_data(), 8, seed=0, workers=0, epoch=epoch, start_batch=start_batch)


def weights(loop: TrainLoop) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loop.model.parameters()]


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = tiny_model()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 0.05 if param.ndim > 1 else 0.0
        assert decay_of[id(param)] == expected, name
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_warmup_then_cosine_per_step() -> None:
    optimizer = build_optimizer(tiny_model(), lr=0.1, weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = build_scheduler(optimizer, total_steps=100, warmup_steps=10, min_lr=0.001)
    lrs = []
    for step in range(100):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[10] == pytest.approx(0.1, rel=1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] < 0.002
    assert scaled_lr(1.5e-3, 128) == pytest.approx(3.75e-4)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = make_loop(tmp_path / "straight")
    result = straight.fit(batches)
    assert result.resumed_from == 0 and len(result.history) == 4

    # Killed in the middle of epoch 3 (steps 1-8 are epochs 1-2): checkpoint says epoch 2.
    interrupted = make_loop(tmp_path / "resumed", fail_at=2 * STEPS_PER_EPOCH + 2)
    with pytest.raises(Interrupt):
        interrupted.fit(batches)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and not state["complete"]

    resumed = make_loop(tmp_path / "resumed")
    again = resumed.fit(batches)
    assert again.resumed_from == 2 and again.epochs_run == 2
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)
    assert [h["loss"] for h in again.history] == [h["loss"] for h in result.history]
    loss_rows = (tmp_path / "resumed/live/plots/metrics/train/loss.tsv").read_text().splitlines()
    column = loss_rows[0].split("\t").index("step")
    steps = [int(row.split("\t")[column]) for row in loss_rows[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 4 * STEPS_PER_EPOCH


def test_finished_or_foreign_checkpoints_start_fresh(tmp_path: Path) -> None:
    make_loop(tmp_path).fit(batches)
    assert make_loop(tmp_path).fit(batches).resumed_from == 0  # finished run

    with pytest.raises(Interrupt):
        make_loop(tmp_path, fail_at=STEPS_PER_EPOCH + 1).fit(batches)
    other = make_loop(tmp_path, config={"lr": 0.1})
    assert other.fit(batches).resumed_from == 0  # other settings


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    loop.fit(batches)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    broken = make_loop(tmp_path, epochs=5)
    original = broken.step_fn
    broken.step_fn = lambda batch: (original(batch)[0] * float("nan"), {})
    with pytest.raises(UserError, match=r"loss is nan .*last good checkpoint kept"):
        broken.fit(batches)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_unreadable_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00torn")
    with pytest.raises(UserError, match="no readable checkpoint.*delete .*checkpoint.pt"):
        make_loop(tmp_path).fit(batches)


def test_trim_history_drops_rows_past_the_checkpoint(tmp_path: Path) -> None:
    tsv = tmp_path / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("timestamp\tstep\tloss\n1\t1\t0.5\n2\t2\t0.4\n3\t3\t0.3\n")
    trim_history(tmp_path, last_step=2)
    assert tsv.read_text().splitlines() == ["timestamp\tstep\tloss", "1\t1\t0.5", "2\t2\t0.4"]


def test_missing_devices_are_user_errors() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("step", [2 * STEPS_PER_EPOCH + 2, 3 * STEPS_PER_EPOCH])
def test_sigterm_checkpoints_mid_epoch_and_the_rerun_ends_identical(
    tmp_path: Path, step: int
) -> None:
    straight = make_loop(tmp_path / "straight")
    result = straight.fit(batches)

    stopped = make_loop(tmp_path / "stopped", sigterm_at=step)
    with pytest.raises(Interrupted, match="stopped by a signal.*rerun to resume"):
        stopped.fit(batches)
    state = torch.load(tmp_path / "stopped/checkpoint.pt", weights_only=True)
    epoch, done = divmod(step, STEPS_PER_EPOCH)
    if done:  # inside an epoch: how far it got, and the RNG to go on with
        assert state["epoch"] == epoch and state["partial"]["steps"] == done
    else:  # on an epoch's last step: an ordinary epoch-end checkpoint
        assert state["epoch"] == epoch and "partial" not in state
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored

    resumed = make_loop(tmp_path / "stopped")
    again = resumed.fit(batches)
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)
    assert [h["loss"] for h in again.history] == [h["loss"] for h in result.history]


def test_a_torn_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    straight = make_loop(tmp_path / "straight")
    straight.fit(batches)
    with pytest.raises(Interrupt):  # killed in epoch 3: checkpoints of epochs 1 and 2 exist
        make_loop(tmp_path, fail_at=2 * STEPS_PER_EPOCH + 1).fit(batches)
    latest = tmp_path / "checkpoint.pt"
    assert torch.load(previous_checkpoint(latest), weights_only=True)["epoch"] == 1
    latest.write_bytes(latest.read_bytes()[:300])  # truncated, as by a full disk

    resumed = make_loop(tmp_path)
    with caplog.at_level("WARNING", logger="mfm"):
        result = resumed.fit(batches)
    assert result.resumed_from == 1
    assert "falling back to the previous checkpoint" in caplog.text
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)
    assert not previous_checkpoint(latest).exists()  # a finished run needs no fallback


def test_no_readable_checkpoint_stops_instead_of_training_from_scratch(tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        make_loop(tmp_path, fail_at=2 * STEPS_PER_EPOCH + 1).fit(batches)
    for path in (tmp_path / "checkpoint.pt", previous_checkpoint(tmp_path / "checkpoint.pt")):
        path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(UserError, match=r"checkpoint.pt .*checkpoint.prev.pt.*train from scratch"):
        make_loop(tmp_path).fit(batches)
