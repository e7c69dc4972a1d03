"""Fine-tuning: timm's layer decay and Mixup wiring, evaluation, and a tiny real run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mfm.config import ModelParams, Params
from mfm.errors import UserError
from mfm.finetune import _mixer, evaluate, mix_batch, run, write_predictions
from mfm.models import build_classifier, build_encoder, load_classifier, save_encoder
from mfm.optim import build_optimizer

TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 4,
    "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
}


def test_layer_decay_scales_each_block() -> None:
    model, _ = build_classifier(ModelParams(**TINY_VIT), 16, 1, 10, 0.0)
    optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.999), layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # depth 2 -> layers: embeddings 0, blocks 1-2, head 3; scale = 0.5 ** (3 - layer)
    assert scale_of[id(named["patch_embed.proj.weight"])] == pytest.approx(0.125)
    assert scale_of[id(named["blocks.0.mlp.fc1.weight"])] == pytest.approx(0.25)
    assert scale_of[id(named["blocks.1.mlp.fc1.weight"])] == pytest.approx(0.5)
    assert scale_of[id(named["head.weight"])] == pytest.approx(1.0)


def test_odd_batch_with_mixup_drops_one_image() -> None:
    params = Params().finetune
    mixer = _mixer(params, num_classes=10)
    images, labels = torch.rand(7, 1, 16, 16), torch.arange(7) % 10
    mixed, targets = mix_batch(mixer, images, labels)
    assert mixed.shape[0] == 6 and targets.shape == (6, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(6))
    off = _mixer(params.model_copy(update={"mixup": 0.0, "cutmix": 0.0}), 10)
    assert off is None and mix_batch(off, images, labels)[0].shape[0] == 7


class ConstantLogits(nn.Module):
    """Always ranks class 2 first, class 0 second: the expected scores follow from labels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.tensor([9.0, 0.0, 10.0] + [0.0] * 7)
        return logits.expand(x.shape[0], -1)


def test_evaluate_counts_top1_and_top5(tmp_path: Path) -> None:
    from mfm.throughput import synthetic_meta

    meta = synthetic_meta(1, 8).model_copy(
        update={"num_classes": 10, "classes": list("abcdefghij")}
    )
    labels = torch.tensor([2, 2, 0, 5, 9, 7, 2, 0])
    data = TensorDataset(torch.zeros(8, 1, 8, 8, dtype=torch.uint8), labels)
    scores, actual, predicted = evaluate(ConstantLogits(), data, meta, 8, 3, torch.device("cpu"))
    assert scores["top1"] == pytest.approx(100 * 3 / 8)  # the three 2s
    # top-5 = classes {2, 0, then three of the zero-logit ones}: at least the 2s and 0s
    assert scores["top5"] >= 100 * 5 / 8
    assert list(actual) == labels.tolist() and set(predicted) == {2}
    write_predictions(tmp_path / "p.csv", actual, predicted, meta.classes)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows[0] == {"actual": "c", "predicted": "c"} and len(rows) == 8


@pytest.fixture
def digits(tmp_path: Path) -> tuple[Params, Path]:
    from mfm.prepare import run as prepare

    params = Params.model_validate(
        {
            "data": {"dataset": "digits", "img_size": 16},
            "model": TINY_VIT,
            "finetune": {
                "epochs": 1,
                "batch_size": 16,
                "lr": 0.08,
                "crop_scale": [0.8, 1.0],
                "warmup_epochs": 0.1,
                "mixup": 0.0,
                "cutmix": 0.0,
                "drop_path_rate": 0.0,
                "label_smoothing": 0.0,
            },
            "runtime": {"device": "cpu"},
        }
    )
    prepare(params, tmp_path / "prepared")
    return params, tmp_path


def test_finetune_from_scratch_beats_chance_in_one_epoch(digits: tuple[Params, Path]) -> None:
    params, root = digits
    metrics = run(params, "scratch", root / "prepared", root / "pretrain", root / "finetune")
    json.dumps(metrics)
    # One epoch of a 2-block, 32-wide ViT on 1,437 8x8 digits: well above chance (10 %,
    # about +-1.6 points on the 360 test images), nowhere near converged.
    assert metrics["top1"] > 15
    # The last epoch is the result: nothing is picked on the test split.
    assert not {"best_top1", "best_epoch"} & set(metrics)
    out = root / "finetune" / "scratch"
    written = {p.name for p in out.iterdir()}
    assert {"classifier.pt", "checkpoint.pt", "predictions.csv"} <= written
    assert "best.pt" not in written
    model, info = load_classifier(out / "classifier.pt")
    assert info["classes"][0] == "0" and info["img_size"] == 16
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


def test_finetune_from_mfm_loads_the_encoder(digits: tuple[Params, Path]) -> None:
    params, root = digits
    encoder = build_encoder(params.model, 16, 1)
    with torch.no_grad():
        encoder.backbone.cls_token.fill_(0.5)
    save_encoder(encoder, root / "pretrain" / "encoder.pt")
    params.finetune.lr = 1e-12  # weights barely move: what was loaded is what is saved
    run(params, "mfm", root / "prepared", root / "pretrain", root / "finetune")
    model, _ = load_classifier(root / "finetune" / "mfm" / "classifier.pt")
    assert torch.allclose(model.cls_token, torch.full_like(model.cls_token, 0.5), atol=1e-6)


def test_wrong_architecture_checkpoint_fails_cleanly(digits: tuple[Params, Path]) -> None:
    params, root = digits
    other = ModelParams(**{**TINY_VIT, "kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2}})
    save_encoder(build_encoder(other, 16, 1), root / "pretrain" / "encoder.pt")
    with pytest.raises(UserError, match="another architecture.*rerun pretrain"):
        run(params, "mfm", root / "prepared", root / "pretrain", root / "finetune")
    assert not (root / "finetune" / "mfm" / "classifier.pt").exists()


def test_cli_requires_an_init() -> None:
    from mfm.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune"])
    assert build_parser().parse_args(["finetune", "--init", "scratch"]).init == "scratch"
