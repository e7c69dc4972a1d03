"""Encoders, the pixel-shuffle head, and saving/loading encoders with weights_only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mfm.config import ModelParams
from mfm.errors import UserError
from mfm.models import MFMModel, build_encoder, load_encoder, save_encoder

TINY_VIT = ModelParams(
    name="vit_tiny_patch16_224", patch_size=4, kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}
)
# Two stages: a 4x4 last map at 32 px, so channels and space can be told apart.
TINY_SWIN = ModelParams(
    name="swin_tiny_patch4_window7_224",
    patch_size=4,
    kwargs={"window_size": 2, "embed_dim": 24, "depths": [1, 1], "num_heads": [1, 1]},
)
TINY_CONVNEXT = ModelParams(
    name="convnext_atto", kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
)


def vit_patch_grid(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ViT tokens without the prefix, row-major patches folded into (B, D, h, w)."""
    tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens :]
    side = x.shape[-1] // backbone.patch_embed.patch_size[0]
    return tokens.reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2)


def nhwc_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Swin's ``forward_features`` is (B, H, W, D)."""
    return backbone.forward_features(x).permute(0, 3, 1, 2)


def nchw_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return backbone.forward_features(x)


@pytest.mark.parametrize(
    ("model", "expected"),
    [(TINY_VIT, vit_patch_grid), (TINY_SWIN, nhwc_map), (TINY_CONVNEXT, nchw_map)],
    ids=["vit", "swin", "convnext"],
)
def test_head_sees_the_map_timm_returns(
    model: ModelParams, expected: Callable[[nn.Module, torch.Tensor], torch.Tensor]
) -> None:
    torch.manual_seed(0)
    mfm_model = MFMModel(build_encoder(model, img_size=32, in_chans=1), in_chans=1).eval()
    seen: list[torch.Tensor] = []
    mfm_model.head.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        prediction = mfm_model(x)
        want = expected(mfm_model.encoder.backbone, x)
    assert prediction.shape == x.shape
    assert seen[0].shape == want.shape
    assert want.shape[-1] > 1  # a 1x1 map would hide a channel/space mix-up
    assert torch.allclose(seen[0], want, atol=1e-6)


def test_vit_feature_map_and_full_resolution_prediction() -> None:
    encoder = build_encoder(TINY_VIT, img_size=16, in_chans=1)
    assert encoder.is_vit and encoder.stride == 4
    model = MFMModel(encoder, in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    assert model.forward_encoder(x).shape == (2, 32, 4, 4)
    assert model(x).shape == x.shape


def test_vit_prediction_does_not_depend_on_the_maps_memory_layout() -> None:
    """timm hands over a contiguous NCHW copy; a transposed view of the tokens holds the same
    numbers channels-last. The head rounds both alike, so ViT pretraining runs repeat exactly."""
    torch.manual_seed(0)
    model = MFMModel(build_encoder(TINY_VIT, img_size=32, in_chans=1), in_chans=1).eval()
    x = torch.randn(16, 1, 32, 32)  # at 16 images the two layouts round differently on CPU
    with torch.no_grad():
        tokens = model.encoder.backbone.forward_features(x)[:, 1:]
        view = tokens.transpose(1, 2).reshape(16, -1, 8, 8)
        assert torch.equal(model(x), model.head(view))


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


def test_small_image_stride_only_for_models_that_take_one() -> None:
    convnext = build_encoder(TINY_CONVNEXT, img_size=32, in_chans=1)
    assert convnext.spec["output_stride"] == 8
    assert convnext.feature_map(torch.randn(1, 1, 32, 32)).shape[-2:] == (4, 4)
    # No output_stride argument: a CNN keeps its 1x1 map, a Swin its own stride.
    mobilenet = build_encoder(ModelParams(name="mobilenetv3_small_050"), img_size=32, in_chans=1)
    assert mobilenet.spec["output_stride"] is None and mobilenet.stride == 32
    assert MFMModel(mobilenet, 1)(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    four_stages = {"depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    swin_model = TINY_SWIN.model_copy(update={"kwargs": {**TINY_SWIN.kwargs, **four_stages}})
    swin = build_encoder(swin_model, img_size=32, in_chans=1)
    assert swin.spec["output_stride"] is None and swin.stride == 32


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
