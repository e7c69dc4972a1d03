"""Data parallelism: N processes see the one-process batches, and train the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from mfm.config import Params
from mfm.data.loaders import GlobalBatchShard, training_loader
from mfm.distributed import World, per_rank_batch, wrap
from mfm.engine import TrainLoop
from mfm.errors import UserError
from mfm.optim import build_optimizer, build_scheduler
from mfm.prepare import run as prepare
from mfm.scenes import run as scenes
from mfm.segmentation_model import load_segmenter
from tests.conftest import cpu_loop_config, tiny_training_params

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, GLOBAL_BATCH = 2, 8


def test_ranks_split_each_global_batch_of_the_one_process_order() -> None:
    one = list(GlobalBatchShard(37, 8, World(), seed=3))
    ranks = [list(GlobalBatchShard(37, 8, World(r, 2), seed=3)) for r in range(2)]
    assert len(one) == 32 and all(len(part) == 16 for part in ranks)
    for step in range(4):
        halves = ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4]
        assert halves == one[8 * step : 8 * step + 8]
    resumed = list(GlobalBatchShard(37, 8, World(1, 2), seed=3, start_batch=2))
    assert resumed == ranks[1][8:]


def test_a_global_batch_must_split_evenly() -> None:
    assert per_rank_batch(12, World(0, 4), "pretrain.batch_size") == 3
    with pytest.raises(UserError, match="pretrain.batch_size = 10 does not split over 4"):
        per_rank_batch(10, World(0, 4), "pretrain.batch_size")


def _toy_data() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(40, 6, generator=g), torch.randn(40, generator=g))


def _train(here: World, out: Path) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    trained = wrap(model, here, torch.device("cpu"))
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, EPOCHS * 5, 2, min_lr=1e-4)

    def step(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        return nn.functional.mse_loss(trained(x).squeeze(1), y), {}

    cfg = cpu_loop_config(out, EPOCHS, live_dir=out / "live")
    loop = TrainLoop(model, optimizer, scheduler, step, cfg, here)
    data = _toy_data()
    result = loop.fit(lambda e, k: training_loader(data, GLOBAL_BATCH, 0, 0, e, here, k))
    return [h["loss"] for h in result.history], [p.detach() for p in model.parameters()]


def _rank(rank: int, size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        losses, params = _train(World(rank, size), Path(out) / f"rank{rank}")
        torch.save({"losses": losses, "params": params}, Path(out) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_what_one_process_trains(tmp_path: Path) -> None:
    single_losses, single_params = _train(World(), tmp_path / "single")
    mp.spawn(_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"result{rank}.pt", weights_only=True)
        assert got["losses"] == pytest.approx(single_losses, rel=1e-5)
        for a, b in zip(got["params"], single_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "rank0/checkpoint.pt").is_file()
    assert (tmp_path / "rank0/live").is_dir()
    assert not (tmp_path / "rank1").exists()  # rank 1 writes nothing


TINY = tiny_training_params(1, 1, 64)


def _stage(project: Path, *launcher: str, stage: str = "pretrain") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [*launcher, "-m", "mfm", *stage.split()],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = stage.replace(" --init ", "_")
    return json.loads((project / f"metrics/{name}.json").read_text())


@pytest.mark.e2e
def test_pretrain_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    projects = {}
    for name in ("single", "ddp"):
        project = tmp_path / name
        project.mkdir()
        (project / "params.yaml").write_text(yaml.safe_dump(TINY))
        prepare(Params.model_validate(TINY), project / "data/prepared")
        projects[name] = project
    single = _stage(projects["single"], sys.executable)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone")
    ddp = _stage(projects["ddp"], *torchrun, "--nproc-per-node", "2")
    assert single["processes"] == 1 and ddp["processes"] == 2
    # Same global batches and init; only the two halves' random crops and masks differ.
    assert ddp["final_loss"] == pytest.approx(single["final_loss"], rel=0.05)
    assert (projects["ddp"] / "results/pretrain/encoder.pt").is_file()
    print(f"pretrain loss: 1 process {single['final_loss']:.5f}, 2 gloo {ddp['final_loss']:.5f}")
    # finetune: rank 0 evaluates and shares the scores; one classifier is written
    tuned = _stage(projects["ddp"], *torchrun, "--nproc-per-node", "2", stage="finetune --init mfm")
    assert 0 <= tuned["top1"] <= 100 and tuned["epochs"] == 1
    assert (projects["ddp"] / "results/finetune/mfm/classifier.pt").is_file()
    # segment: rank 0 scores, one model is written and loads without DDP (BatchNorm is synced
    # across ranks on GPUs only, where torch supports it)
    scenes(
        Params.model_validate(TINY),
        projects["ddp"] / "data/prepared",
        projects["ddp"] / "data/scenes",
    )
    seg = _stage(projects["ddp"], *torchrun, "--nproc-per-node", "2", stage="segment --init mfm")
    assert 0 <= seg["miou"] <= 100 and seg["recipe"]["epochs"] == 1
    model, info = load_segmenter(projects["ddp"] / "results/segment/mfm/model.pt")
    assert info["init"] == "mfm" and not any(
        isinstance(m, nn.SyncBatchNorm) for m in model.modules()
    )
