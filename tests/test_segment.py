"""The segment stage on tiny scenes: both inits, the encoder loaded, outputs and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mfm.cli import build_parser, main
from mfm.config import Params
from mfm.errors import UserError
from mfm.models import build_encoder, save_encoder
from mfm.optim import optimizer_and_schedule
from mfm.segment import run
from mfm.segmentation_model import load_segmenter

TINY = {
    "data": {"dataset": "digits", "img_size": 16},
    "model": {
        "name": "vit_tiny_patch16_224",
        "patch_size": 4,
        "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    },
    "segment": {
        "epochs": 2,
        "batch_size": 8,
        "crop_size": 32,
        "resize": [32, 32],
        "channels": 16,
        "lr": 0.02,
        "overlay_images": 3,
        "scenes": {"size": 32, "train": 48, "test": 8, "scale": [1.5, 2.5]},
    },
    "runtime": {"device": "cpu", "workers": 0},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path]:
    """Digits prepared, and scenes built from them, once for the module."""
    from mfm.prepare import run as prepare
    from mfm.scenes import run as scenes

    root = tmp_path_factory.mktemp("segment")
    params = Params.model_validate(TINY)
    prepare(params, root / "prepared")
    scenes(params, root / "prepared", root / "scenes")
    return params, root


def _run(params: Params, root: Path, init: str) -> dict:
    return run(
        params, init, root / "prepared", root / "pretrain", root / "segment", root / "scenes"
    )


def test_scratch_run_writes_model_overlay_metrics(project: tuple[Params, Path]) -> None:
    params, root = project
    metrics = _run(params, root, "scratch")
    json.dumps(metrics)  # JSON-safe, as the CLI writes it
    classes = (root / "scenes" / "classes.txt").read_text().split("\n")[:11]
    assert classes[0] == "background" and metrics["recipe"]["classes"] == 11
    assert set(metrics["per_class_iou"]) == set(classes)
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["pixel_accuracy"] <= 100
    # Two epochs of 6 steps on a 32 px canvas: the background is learnt first, so pixel
    # accuracy clears the share of the most common class it would get by always guessing it.
    assert metrics["pixel_accuracy"] > 50
    assert metrics["recipe"]["iterations"] == 2 * (48 // 8)
    out = root / "segment" / "scratch"
    assert {"model.pt", "checkpoint.pt", "overlay.png"} <= {p.name for p in out.iterdir()}
    model, info = load_segmenter(out / "model.pt")
    assert info["classes"][:2] == ["background", "0"] and info["init"] == "scratch"
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 11, 32, 32)


def test_mfm_init_loads_the_pretrained_encoder(project: tuple[Params, Path]) -> None:
    params, root = project
    encoder = build_encoder(params.model, params.data.img_size, 1)
    with torch.no_grad():
        encoder.backbone.cls_token.fill_(0.5)
        encoder.backbone.blocks[0].attn.qkv.weight.fill_(0.01)
    save_encoder(encoder, root / "pretrain" / "encoder.pt")
    tiny_lr = params.model_copy(deep=True)
    tiny_lr.segment.lr = 1e-12  # weights barely move: what was loaded is what is saved
    tiny_lr.segment.epochs = 1
    _run(tiny_lr, root, "mfm")
    model, info = load_segmenter(root / "segment" / "mfm" / "model.pt")
    assert info["init"] == "mfm"
    qkv = model.backbone.blocks[0].attn.qkv.weight
    assert torch.allclose(qkv, torch.full_like(qkv, 0.01), atol=1e-6)


def test_vit_layers_get_decayed_learning_rates(project: tuple[Params, Path]) -> None:
    from mfm.segmentation_model import build_segmenter

    params, _ = project
    model, _ = build_segmenter(params.model, 32, 1, 11, params.segment)
    optimizer, scheduler, lr, steps = optimizer_and_schedule(model, params.segment, 48, "segment")
    assert steps == 6 and lr == pytest.approx(0.02 * 8 / 512)
    # per-step poly schedule: warmup to the peak, then (1 - t/T)^1 down to min_lr = 0
    scheduler.step_update(round(params.segment.warmup_epochs * steps))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        lr * optimizer.param_groups[0].get("lr_scale", 1.0)
    )
    scheduler.step_update(2 * steps)
    assert max(group["lr"] for group in optimizer.param_groups) == pytest.approx(0.0, abs=1e-12)


def test_a_missing_encoder_is_one_clear_error(project: tuple[Params, Path], tmp_path: Path) -> None:
    params, root = project
    with pytest.raises(UserError, match="run the pretrain stage first"):
        run(params, "mfm", root / "prepared", tmp_path / "none", tmp_path / "seg", root / "scenes")
    assert not (tmp_path / "seg").exists()


def test_missing_scenes_fail_before_training(project: tuple[Params, Path], tmp_path: Path) -> None:
    params, root = project
    with pytest.raises(UserError, match="scenes"):
        run(params, "scratch", root / "prepared", root / "pretrain", tmp_path / "seg", tmp_path)
    assert not (tmp_path / "seg").exists()


def test_cli_takes_an_init_and_reports_bad_params(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment"])
    assert build_parser().parse_args(["segment", "--init", "mfm"]).init == "mfm"
    capsys.readouterr()
    assert main(["segment", "--init", "mfm", "-S", "segment.eval_stride=999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval_stride" in err


def test_a_bad_mask_stops_before_training_and_keeps_earlier_results(
    project: tuple[Params, Path], tmp_path: Path
) -> None:
    import shutil

    import numpy as np
    from PIL import Image

    params, root = project
    scenes = tmp_path / "scenes"
    shutil.copytree(root / "scenes", scenes)
    bad = sorted((scenes / "masks" / "test").iterdir())[3]
    labels = np.array(Image.open(bad))
    labels[0, 0] = 77  # neither one of the 11 classes nor the ignore index
    Image.fromarray(labels).save(bad)
    out = tmp_path / "segment" / "scratch"
    out.mkdir(parents=True)
    (out / "model.pt").write_bytes(b"an earlier run's model")
    with pytest.raises(UserError, match=rf"{bad.name}.*77") as caught:
        run(params, "scratch", root / "prepared", root / "pretrain", tmp_path / "segment", scenes)
    assert "\n" not in str(caught.value)
    assert (out / "model.pt").read_bytes() == b"an earlier run's model"
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]  # no checkpoint, no curves
