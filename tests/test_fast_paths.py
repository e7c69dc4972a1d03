"""The speed options of the training stages: worker sizing, fused AdamW, channels-last, compile
and the MFU the pretrain stage reports on GPUs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import mfm.data.workers as workers_module
import mfm.optim
from mfm.config import Params
from mfm.data.datasets import ArrayImages
from mfm.data.loaders import PREFETCH_BATCHES, make_loader
from mfm.data.workers import MAX_AUTO_WORKERS, auto_workers, resolve_workers, usable_cpus
from mfm.distributed import World, wrap
from mfm.flops import training_utilisation
from mfm.models import channels_last, load_encoder
from mfm.optim import build_optimizer
from mfm.pretrain import step_flops

TINY = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 4,
    "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
}


# -- runtime.workers: auto -------------------------------------------------------------------
def test_auto_workers_share_the_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        workers_module.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False
    )
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cpus() == 32
    assert auto_workers() == MAX_AUTO_WORKERS  # 31 capped
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")  # the job's share of the node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun processes on this node
    assert usable_cpus() == 12
    assert auto_workers() == 2  # 12 / 4 - 1 for each process itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert auto_workers() == 0


def arrays(folder: Path) -> ArrayImages:
    np.save(folder / "images.npy", np.zeros((4, 8, 8, 1), np.uint8))
    np.save(folder / "labels.npy", np.zeros(4, np.int64))
    return ArrayImages(folder / "images.npy", folder / "labels.npy")


def test_resolve_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(workers_module, "auto_workers", lambda: 5)
    images = arrays(tmp_path)
    assert resolve_workers(3, images) == 3
    assert resolve_workers("auto", images) == 0  # arrays are sliced fastest in-process
    assert resolve_workers("auto", object()) == 5


def test_loaders_prefetch_more_with_workers(tmp_path: Path) -> None:
    images = arrays(tmp_path)
    loader = make_loader(images, 2, shuffle=False, seed=0, workers=1, drop_last=False)
    assert loader.num_workers == 1 and loader.prefetch_factor == PREFETCH_BATCHES
    assert len(list(loader)) == 2
    assert make_loader(images, 2, False, 0, "auto", drop_last=False).num_workers == 0


def test_runtime_workers_accepts_auto_and_counts_only() -> None:
    assert Params.model_validate({"runtime": {"workers": "auto"}}).runtime.workers == "auto"
    for bad in (-1, "many"):
        with pytest.raises(ValueError):
            Params.model_validate({"runtime": {"workers": bad}})


# -- fused AdamW, channels-last ----------------------------------------------------------------
def test_adamw_is_fused_only_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(4, 2)
    assert not mfm.optim.fused_adamw(model)
    assert not build_optimizer(model, 1e-3, 0.05, (0.9, 0.95)).defaults.get("fused")
    monkeypatch.setattr(mfm.optim, "fused_adamw", lambda model: True)
    optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95))  # torch fuses on CPUs too
    assert optimizer.defaults["fused"] is True
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # timm passes the option through to a working optimiser


def test_channels_last_for_conv_nets_on_cuda_only() -> None:
    cnn = timm.create_model("resnet18", num_classes=0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1)
    assert channels_last(cnn, torch.device("cuda"))
    assert not channels_last(cnn, torch.device("cpu"))
    assert not channels_last(vit, torch.device("cuda"))


# -- compile ----------------------------------------------------------------------------------
def test_wrap_compiles_the_call_but_not_the_model() -> None:
    model = torch.nn.Linear(4, 2)
    compiled = wrap(model, World(), torch.device("cpu"), compile=True)
    assert compiled is not model and hasattr(compiled, "_orig_mod")
    assert set(model.state_dict()) == {"weight", "bias"}


@pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler"
)
def test_pretrain_compiled_saves_a_plain_encoder(tmp_path: Path) -> None:
    from mfm.prepare import run as prepare
    from mfm.pretrain import run as pretrain

    params = Params.model_validate(
        {
            "data": {"dataset": "digits", "img_size": 16, "train_limit": 64, "test_limit": 16},
            "model": TINY,
            "pretrain": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0.0},
            "runtime": {"device": "cpu", "compile": True},
        }
    )
    prepare(params, tmp_path / "prepared")
    metrics = pretrain(params, tmp_path / "prepared", tmp_path / "pretrain")
    assert np.isfinite(metrics["final_loss"])
    encoder = load_encoder(tmp_path / "pretrain" / "encoder.pt")  # no _orig_mod. keys
    assert not any("_orig_mod" in key for key in encoder.backbone.state_dict())
    ckpt = torch.load(tmp_path / "pretrain" / "checkpoint.pt", weights_only=True)
    assert not any("_orig_mod" in key for key in ckpt["model"])


# -- MFU ---------------------------------------------------------------------------------------
def test_training_utilisation_on_a_known_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    figures = training_utilisation(2e12, 256.0, 512, torch.device("cuda"), amp_on=True)
    assert figures["achieved_tflops"] == pytest.approx(1.0)  # 2 TFLOP x 0.5 steps/s
    assert figures["peak_tflops"] == 989.0 and figures["peak_precision"] == "bf16"
    assert figures["mfu"] == pytest.approx(1.0 / 989.0)
    on_cpu = training_utilisation(2e12, 256.0, 512, torch.device("cpu"), amp_on=True)
    assert on_cpu["mfu"] is None and on_cpu["achieved_tflops"] == pytest.approx(1.0)


def test_step_flops_leave_the_run_untouched() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    inputs = torch.randn(4, 8)
    state = torch.get_rng_state()

    def loss() -> torch.Tensor:
        return model(inputs + torch.rand_like(inputs)).sum()  # draws from the global stream

    flops = step_flops(loss, model, torch.device("cpu"))
    assert flops == 3 * 2 * 4 * (8 * 16 + 16 * 1) - 2 * 4 * 8 * 16  # fwd + bwd, no input grad
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
