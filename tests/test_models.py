"""Encoders, the pixel-shuffle head, and saving/loading encoders with weights_only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mfm.config import ModelParams
from mfm.errors import UserError
from mfm.models import MFMModel, build_encoder, load_encoder, save_encoder

TINY_VIT = ModelParams(
    name="vit_tiny_patch16_224", patch_size=4, kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}
)


def test_vit_feature_map_and_full_resolution_prediction() -> None:
    encoder = build_encoder(TINY_VIT, img_size=16, in_chans=1)
    assert encoder.is_vit and encoder.stride == 4
    model = MFMModel(encoder, in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    assert model.forward_encoder(x).shape == (2, 32, 4, 4)
    assert model(x).shape == x.shape


def test_cnn_on_small_images_keeps_a_usable_feature_map() -> None:
    encoder = build_encoder(ModelParams(name="resnet18", patch_size=None), img_size=32, in_chans=3)
    assert not encoder.is_vit
    assert encoder.spec["output_stride"] == 8
    fmap = encoder.feature_map(torch.randn(2, 3, 32, 32))
    assert fmap.shape[-2:] == (4, 4)
    assert MFMModel(encoder, 3)(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_cnn_at_imagenet_size_keeps_its_own_stride() -> None:
    encoder = build_encoder(ModelParams(name="resnet18"), img_size=224, in_chans=3)
    assert encoder.spec["output_stride"] is None and encoder.stride == 32


def test_gradients_reach_the_encoder() -> None:
    model = MFMModel(build_encoder(TINY_VIT, img_size=16, in_chans=1), in_chans=1)
    model(torch.randn(2, 1, 16, 16)).square().mean().backward()
    first = model.encoder.backbone.patch_embed.proj.weight.grad
    assert first is not None and first.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    encoder = build_encoder(TINY_VIT, img_size=16, in_chans=1)
    save_encoder(encoder, tmp_path / "encoder.pt")
    loaded = load_encoder(tmp_path / "encoder.pt")
    x = torch.randn(1, 1, 16, 16)
    encoder.eval(), loaded.eval()
    assert torch.equal(encoder.feature_map(x), loaded.feature_map(x))
    blob = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert blob["spec"]["patch_size"] == 4


def test_unknown_model_and_bad_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a timm model"):
        build_encoder(ModelParams(name="vit_gigantic_nonsense"), img_size=32, in_chans=3)
    with pytest.raises(UserError, match="not found"):
        load_encoder(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable encoder"):
        load_encoder(bad)
