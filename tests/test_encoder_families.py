"""One tiny model of each encoder family (ViT, ResNet, ConvNeXt, Swin) through every stage.

Each family lays its features out differently (tokens, NCHW maps, NHWC maps); pretrain,
linprobe and finetune must all run on each and agree on the encoder's weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import mfm.finetune
import mfm.linprobe
import mfm.prepare
import mfm.pretrain
from mfm.config import Params
from mfm.models import load_classifier, load_encoder

IMG_SIZE = 32
CHANCE = 10.0
FAMILIES: dict[str, dict[str, Any]] = {
    "vit": {
        "name": "vit_tiny_patch16_224",
        "patch_size": 4,
        "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    },
    "resnet": {"name": "resnet10t", "kwargs": {"stem_width": 16, "channels": [16, 32, 64, 64]}},
    "convnext": {
        "name": "convnext_atto",
        "kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
    },
    "swin": {
        "name": "swin_tiny_patch4_window7_224",
        "patch_size": 4,
        "kwargs": {"window_size": 2, "embed_dim": 24, "depths": [1, 1], "num_heads": [1, 1]},
    },
}


def family_params(model: dict[str, Any]) -> Params:
    """A second or so per stage on 2 cores: 256 train / 100 test digits, one epoch each."""
    return Params.model_validate(
        {
            "data": {
                "dataset": "digits",
                "img_size": IMG_SIZE,
                "train_limit": 256,
                "test_limit": 100,
            },
            "model": model,
            "pretrain": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0.0},
            "linprobe": {"train_limit": 200, "c_grid": [1.0], "max_iter": 200, "knn_k": 10},
            "finetune": {
                "epochs": 1,
                "batch_size": 32,
                "lr": 1e-12,
                "min_lr": 0.0,
                "drop_path_rate": 0.0,
            },
            "runtime": {"device": "cpu", "workers": 0, "seed": 0},
        }
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("families") / "prepared"
    mfm.prepare.run(family_params(FAMILIES["vit"]), out)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_runs_on_each_family(family: str, prepared: Path, tmp_path: Path) -> None:
    params = family_params(FAMILIES[family])
    pretrain_dir, finetune_dir = tmp_path / "pretrain", tmp_path / "finetune"

    pretrained = mfm.pretrain.run(params, prepared, pretrain_dir)
    assert math.isfinite(pretrained["final_loss"])
    assert (pretrain_dir / "reconstruction.png").is_file()
    encoder = load_encoder(pretrain_dir / "encoder.pt").eval()
    side = IMG_SIZE // encoder.stride
    assert side >= 4  # ResNet and ConvNeXt dilated, ViT and Swin by their patch grid
    with torch.no_grad():
        feature_map = encoder.feature_map(torch.zeros(1, 1, IMG_SIZE, IMG_SIZE))
    assert feature_map.shape == (1, encoder.num_features, side, side)
    # the stage's timm folder is the same encoder for anyone with timm alone
    shared = timm.create_model(f"local-dir:{pretrain_dir / 'timm'}", pretrained=True).eval()
    images = torch.randn(2, 1, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            shared.forward_features(images), encoder.backbone.forward_features(images)
        )
    assert "final_loss" in (pretrain_dir / "timm" / "README.md").read_text()

    probed = mfm.linprobe.run(params, prepared, pretrain_dir)
    json.dumps(probed)
    assert probed["feature_dim"] == encoder.num_features
    for name in ("pretrained", "random"):
        assert CHANCE < probed[name]["knn_top1"] <= 100.0

    tuned = mfm.finetune.run(params, "mfm", prepared, pretrain_dir, finetune_dir)
    json.dumps(tuned)
    assert 0.0 <= tuned["top1"] <= 100.0
    assert not {"best_top1", "best_epoch"} & set(tuned)
    out = finetune_dir / "mfm"
    assert not (out / "best.pt").exists()
    classifier, _ = load_classifier(out / "classifier.pt")
    assert classifier(torch.zeros(2, 1, IMG_SIZE, IMG_SIZE)).shape == (2, 10)
    # lr 1e-12 (min_lr 0): the fine-tuned backbone still holds the pretrained encoder's weights.
    tuned_state = classifier.state_dict()
    for key, weight in encoder.backbone.named_parameters():  # not BatchNorm's running stats
        if key in tuned_state:
            assert torch.allclose(tuned_state[key], weight, atol=1e-6), key
