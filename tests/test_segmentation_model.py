"""UPerNet on the encoder's pyramid: shapes, layer decay, pretrained weights, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer_v2
from torch import nn

from mfm.config import ModelParams
from mfm.errors import UserError
from mfm.models import build_encoder, save_encoder
from mfm.segment_params import SegmentParams
from mfm.segmentation_model import (
    SegmentationModel,
    build_segmenter,
    default_vit_blocks,
    load_pretrained_encoder,
    load_segmenter,
    save_segmenter,
)

DEFAULT_VIT = ModelParams(kwargs={"depth": 6})  # params.yaml's: patch 4, 192 wide
SMALL_VIT = ModelParams(kwargs={"depth": 6, "embed_dim": 32, "num_heads": 2})
SMALL_CONVNEXT = ModelParams(
    name="convnext_atto", kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
)
SEG = SegmentParams(channels=16)
CROP, CLASSES = 64, 5


def segmenter(model: ModelParams, seg: SegmentParams = SEG) -> SegmentationModel:
    torch.manual_seed(0)
    return build_segmenter(model, CROP, 1, CLASSES, seg)[0]


def sizes(maps: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(level.shape[1:]) for level in maps]


def block_maps(model: SegmentationModel, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """The backbone's raw (B, D, h, w) output of each block in ``blocks``."""
    return model.backbone.forward_intermediates(
        x, indices=blocks, norm=False, output_fmt="NCHW", intermediates_only=True
    )


def test_default_vit_blocks_are_evenly_spaced() -> None:
    assert default_vit_blocks(12) == [2, 5, 8, 11]
    assert default_vit_blocks(6) == [0, 2, 3, 5]


def test_vit_patch4_pyramid_pools_block_maps_to_strides_4_to_32() -> None:
    model = segmenter(DEFAULT_VIT).eval()
    x = torch.randn(2, 1, CROP, CROP)
    with torch.no_grad():
        maps = model.pyramid(x)
        raw = block_maps(model, x, [0, 2, 3, 5])
    assert sizes(maps) == [(192, 16, 16), (192, 8, 8), (192, 4, 4), (192, 2, 2)]
    # Patch 4 is already stride 4: block 0 as it is, deeper blocks max-pooled 2x, 4x, 8x.
    torch.testing.assert_close(maps[0], raw[0])
    for level, block in enumerate(raw[1:], start=1):
        torch.testing.assert_close(maps[level], F.max_pool2d(block, 2**level))


def test_vit_patch16_pyramid_is_beits_4x_2x_1x_half() -> None:
    model = segmenter(SMALL_VIT.model_copy(update={"patch_size": 16})).eval()
    x = torch.randn(2, 1, CROP, CROP)
    with torch.no_grad():
        maps = model.pyramid(x)
        raw = block_maps(model, x, [0, 2, 3, 5])
    assert sizes(maps) == [(32, 16, 16), (32, 8, 8), (32, 4, 4), (32, 2, 2)]
    transposed = [
        sum(isinstance(m, nn.ConvTranspose2d) for m in neck.modules()) for neck in model.necks
    ]
    assert transposed == [2, 1, 0, 0]
    assert isinstance(model.necks[0][1], nn.BatchNorm2d)
    torch.testing.assert_close(maps[2], raw[2])
    torch.testing.assert_close(maps[3], F.max_pool2d(raw[3], 2))


def test_cnn_pyramid_is_its_last_four_levels() -> None:
    model = segmenter(ModelParams(name="resnet18"))
    x = torch.randn(2, 1, CROP, CROP)
    # Dilated to output stride 16 at 64 px (so its last map stays 4x4): strides 4/8/16/16.
    assert model.spec["encoder"]["output_stride"] == 16
    assert sizes(model.pyramid(x)) == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4)]
    assert model(x).shape == (2, CLASSES, CROP, CROP)


@pytest.mark.parametrize("model", [DEFAULT_VIT, SMALL_CONVNEXT], ids=["vit", "convnext"])
def test_every_parameter_trains(model: ModelParams) -> None:
    """What the pyramid never reads is pruned, so DDP finds no parameter without a gradient."""
    net = segmenter(model)
    net(torch.randn(2, 1, CROP, CROP)).logsumexp(dim=1).mean().backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def test_vit_logits_at_crop_and_at_whole_images_of_other_sizes() -> None:
    model = segmenter(DEFAULT_VIT)
    assert model(torch.randn(2, 1, CROP, CROP)).shape == (2, CLASSES, CROP, CROP)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 48, 80)).shape == (1, CLASSES, 48, 80)
        assert model(torch.randn(1, 1, 50, 70)).shape == (1, CLASSES, 50, 70)  # not whole patches


def test_padding_to_whole_patches_keeps_the_patch_grid_aligned() -> None:
    """Logits of an image padded by hand and cropped equal those of the unpadded image."""
    model = segmenter(SMALL_VIT).eval()
    x = torch.randn(1, 1, 50, 70)
    with torch.no_grad():
        padded = model(F.pad(x, (0, 2, 0, 2)))[..., :50, :70]
        torch.testing.assert_close(model(x), padded)


def test_vit_blocks_outside_the_depth_are_refused() -> None:
    with pytest.raises(UserError, match=r"segment\.vit_blocks"):
        segmenter(SMALL_VIT, SEG.model_copy(update={"vit_blocks": [1, 3, 5, 6]}))


def test_chosen_vit_blocks_prune_the_deeper_ones() -> None:
    model = segmenter(SMALL_VIT, SEG.model_copy(update={"vit_blocks": [0, 1, 2, 3]}))
    assert len(model.backbone.blocks) == 4
    assert any(key.startswith("blocks.5.") for key in model.unused_keys)


def lr_scales(model: nn.Module) -> dict[str, float]:
    """Each parameter's lr scale in timm's AdamW with layer decay 0.65; checks the groups
    partition the parameters."""
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, layer_decay=0.65)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(names), "every parameter in exactly one group"
    return {
        names[id(p)]: group["lr_scale"] for group in optimizer.param_groups for p in group["params"]
    }


def test_layer_decay_over_vit_blocks_with_the_head_at_full_lr() -> None:
    model = segmenter(SMALL_VIT.model_copy(update={"patch_size": 16}))
    scales = lr_scales(model)
    first = scales["backbone.blocks.0.attn.qkv.weight"]
    last = scales["backbone.blocks.5.attn.qkv.weight"]
    assert scales["backbone.pos_embed"] < first < last < 1.0
    assert last == pytest.approx(0.65)
    new = [n for n in scales if not n.startswith("backbone.")]
    assert any(n.startswith("necks.") for n in new) and any(n.startswith("decoder.") for n in new)
    assert {scales[n] for n in new} == {1.0}
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65
    )
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert decay[id(params["backbone.pos_embed"])] == 0.0
    assert decay[id(params["backbone.cls_token"])] == 0.0
    assert decay[id(params["backbone.blocks.0.attn.qkv.weight"])] > 0.0


def test_layer_decay_over_cnn_stages() -> None:
    scales = lr_scales(segmenter(ModelParams(name="resnet18")))
    assert scales["backbone.conv1.weight"] < scales["backbone.layer4.1.conv2.weight"] < 1.0
    assert scales["classifier.weight"] == 1.0


def test_pretrained_vit_loads_with_its_position_embedding_resampled(tmp_path: Path) -> None:
    torch.manual_seed(1)
    encoder = build_encoder(SMALL_VIT, img_size=32, in_chans=1)
    save_encoder(encoder, tmp_path / "encoder.pt")
    model = segmenter(SMALL_VIT)
    report = load_pretrained_encoder(model, tmp_path / "encoder.pt")
    saved = encoder.backbone.state_dict()
    loaded = model.backbone.state_dict()
    torch.testing.assert_close(loaded["blocks.3.mlp.fc1.weight"], saved["blocks.3.mlp.fc1.weight"])
    torch.testing.assert_close(loaded["patch_embed.proj.weight"], saved["patch_embed.proj.weight"])
    expected = resample_abs_pos_embed(saved["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    assert loaded["pos_embed"].shape == (1, 1 + 16 * 16, 32)
    torch.testing.assert_close(loaded["pos_embed"], expected)
    torch.testing.assert_close(loaded["cls_token"], saved["cls_token"])
    assert report == {
        "missing": [],
        "unexpected": ["norm.bias", "norm.weight"],
        "resampled": ["pos_embed"],
    }


def test_pretrained_cnn_loads_although_dilated_differently(tmp_path: Path) -> None:
    encoder = build_encoder(SMALL_CONVNEXT, img_size=32, in_chans=1)
    save_encoder(encoder, tmp_path / "encoder.pt")
    model = segmenter(SMALL_CONVNEXT)
    assert encoder.spec["output_stride"] != model.spec["encoder"]["output_stride"]
    report = load_pretrained_encoder(model, tmp_path / "encoder.pt")
    saved = encoder.backbone.state_dict()
    for key, tensor in model.backbone.state_dict().items():
        torch.testing.assert_close(tensor, saved[key])
    assert report["unexpected"] == ["head.norm.bias", "head.norm.weight"]


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (ModelParams(name="resnet18"), "name"),
        (SMALL_VIT.model_copy(update={"kwargs": {**SMALL_VIT.kwargs, "depth": 4}}), "kwargs"),
        (SMALL_VIT.model_copy(update={"patch_size": 8}), "patch_size"),
    ],
    ids=["cnn", "depth", "patch"],
)
def test_another_architecture_is_refused(tmp_path: Path, other: ModelParams, named: str) -> None:
    save_encoder(build_encoder(other, img_size=32, in_chans=1), tmp_path / "encoder.pt")
    model = segmenter(SMALL_VIT)
    before = model.backbone.state_dict()["blocks.0.attn.qkv.weight"].clone()
    with pytest.raises(UserError, match=rf"another architecture .*: {named} is .*; rerun pretrain"):
        load_pretrained_encoder(model, tmp_path / "encoder.pt")
    torch.testing.assert_close(model.backbone.state_dict()["blocks.0.attn.qkv.weight"], before)


def test_segmenter_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model, spec = build_segmenter(SMALL_VIT, CROP, 1, CLASSES, SEG)
    model(torch.randn(4, 1, CROP, CROP))  # move the BatchNorm statistics off their defaults
    model.eval()
    save_segmenter(model, spec, {"classes": list("abcde")}, tmp_path / "segmenter.pt")
    loaded, info = load_segmenter(tmp_path / "segmenter.pt")
    loaded.eval()
    assert info == {"classes": list("abcde")}
    assert loaded.spec == spec
    x = torch.randn(2, 1, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_missing_or_broken_segmenter_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run the segment stage first"):
        load_segmenter(tmp_path / "nothing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="rerun segment"):
        load_segmenter(tmp_path / "broken.pt")


def test_an_encoder_for_other_channels_is_refused(tmp_path: Path) -> None:
    save_encoder(build_encoder(SMALL_VIT, img_size=32, in_chans=3), tmp_path / "encoder.pt")
    with pytest.raises(UserError, match="in_chans is 3 there but 1 here; pretrain on images"):
        load_pretrained_encoder(segmenter(SMALL_VIT), tmp_path / "encoder.pt")


@pytest.mark.parametrize("tamper", ["extra", "missing"])
def test_a_checkpoint_with_other_keys_is_refused(tmp_path: Path, tamper: str) -> None:
    encoder = build_encoder(SMALL_VIT, img_size=32, in_chans=1)
    state = encoder.backbone.state_dict()
    if tamper == "extra":
        state["blocks.6.norm1.weight"] = torch.ones(32)
    else:
        del state["blocks.0.norm1.weight"]
    torch.save({"spec": encoder.spec, "state_dict": state}, tmp_path / "encoder.pt")
    with pytest.raises(UserError, match=r"keys \['blocks\.[06]\.norm1\.weight'\] do not match"):
        load_pretrained_encoder(segmenter(SMALL_VIT), tmp_path / "encoder.pt")
