"""The SimMIM-style spatial-masking baseline (``pretrain.pretext: mim``): exact per-image mask
ratios, an L1 loss on hidden pixels only, a mask token that replaces hidden patches before a
ViT's blocks, zeroed pixels for CNNs, and the pretrain stage end to end on both."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

import mfm.prepare
import mfm.pretrain
from mfm.config import MIMParams, ModelParams, Params, PretextName, PretrainParams, validate_params
from mfm.errors import UserError
from mfm.frequency import PRETEXTS, RandomPatchMask, build_corruption
from mfm.losses import FrequencyLoss, MaskedPixelLoss, build_loss
from mfm.models import (
    MaskedImageModel,
    MFMModel,
    build_classifier,
    build_encoder,
    load_encoder,
    load_encoder_weights,
    pretext_model,
)
from mfm.spatial_mask import check_geometry, grid_to_pixels
from tests.conftest import tiny_training_params

TINY_VIT = ModelParams(
    name="vit_tiny_patch16_224", patch_size=4, kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}
)
TINY_RESNET = ModelParams(name="resnet10t", kwargs={"stem_width": 16, "channels": [16, 32, 64, 64]})


def hidden_patches(kept: torch.Tensor, patch: int) -> torch.Tensor:
    """Per image, how many ``patch`` x ``patch`` squares the (B, 1, H, W) mask hides."""
    return (1 - kept).sum(dim=(1, 2, 3)) / patch**2


def patch_mask(
    patch: int = 4, ratio: float = 0.6, size: tuple[int, int] = (16, 16)
) -> torch.Tensor:
    torch.manual_seed(0)
    return RandomPatchMask(patch, ratio).corrupt(torch.rand(2, 1, *size))[1]


# --- the mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "ratio", "size", "hidden"),
    [(4, 0.6, (16, 16), 10), (2, 0.6, (8, 12), 14), (4, 0.75, (8, 16), 6), (1, 0.1, (5, 7), 4)],
)
def test_every_image_hides_exactly_round_ratio_of_its_patches(patch, ratio, size, hidden):
    torch.manual_seed(0)
    x = torch.rand(8, 3, *size)
    corrupted, kept = RandomPatchMask(patch, ratio).corrupt(x)
    assert kept.shape == (8, 1, *size) and set(kept.unique().tolist()) == {0.0, 1.0}
    assert hidden == round(ratio * (size[0] // patch) * (size[1] // patch))
    assert hidden_patches(kept, patch).tolist() == [hidden] * 8
    # Whole patches: the mask is its own patch grid repeated up to pixels.
    grid = kept[:, 0, ::patch, ::patch] == 0
    assert torch.equal(grid_to_pixels(grid, patch), kept == 0)
    assert torch.equal(corrupted, x * kept)
    assert len({tuple(k.flatten().tolist()) for k in kept}) > 1  # drawn per image


def test_masks_repeat_under_the_seed_and_change_without_it():
    torch.manual_seed(3)
    first = RandomPatchMask(4, 0.5).corrupt(torch.rand(4, 1, 16, 16))[1]
    torch.manual_seed(3)
    again = RandomPatchMask(4, 0.5).corrupt(torch.rand(4, 1, 16, 16))[1]
    later = RandomPatchMask(4, 0.5).corrupt(torch.rand(4, 1, 16, 16))[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, later)


def test_every_pretext_has_a_corruption_and_a_loss():
    assert set(get_args(PretextName)) == set(PRETEXTS)
    for name in get_args(PretextName):
        params = PretrainParams(pretext=name)
        assert isinstance(build_corruption(params), PRETEXTS[name])
        loss = build_loss(params)
        assert isinstance(loss, MaskedPixelLoss if name == "mim" else FrequencyLoss)
    params = PretrainParams(pretext="mim", mim=MIMParams(mask_patch_size=8, mask_ratio=0.25))
    corruption = build_corruption(params)
    assert (corruption.mask_patch_size, corruption.mask_ratio) == (8, 0.25)


# --- the loss ---------------------------------------------------------------------------------


def test_loss_is_the_mean_error_over_hidden_pixels_and_channels():
    kept = patch_mask()
    target = torch.randn(2, 3, 16, 16)
    offset = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)  # channel mean 3
    pred = target + offset * (1 - kept)
    assert MaskedPixelLoss()(pred, target, kept).item() == pytest.approx(3.0)


def test_loss_ignores_kept_pixels_and_scores_hidden_ones():
    kept = patch_mask()
    torch.manual_seed(1)
    target, pred = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    loss = MaskedPixelLoss()
    base = loss(pred, target, kept)
    noise = 5 * torch.randn_like(pred)
    assert torch.equal(loss(pred + noise * kept, target, kept), base)
    assert loss(pred + noise * (1 - kept), target, kept) > base + 1


# --- the model --------------------------------------------------------------------------------


def test_nothing_hidden_gives_the_map_timm_returns():
    """The token path re-assembles timm's forward: with no patch hidden it is timm's map."""
    torch.manual_seed(0)
    model = MaskedImageModel(build_encoder(TINY_VIT, 16, 1), 1).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ours = model.forward_encoder(x, torch.ones(2, 1, 16, 16))
        timm_map = model.encoder.feature_map(x)
    assert torch.equal(ours, timm_map)


def test_the_mask_token_stands_in_for_a_patch_before_its_position_is_added():
    """SimMIM: a hidden patch enters the blocks as mask token + its own position embedding."""
    torch.manual_seed(0)
    model = MaskedImageModel(build_encoder(TINY_VIT, 16, 1), 1).eval()
    vit = model.encoder.backbone
    seen: list[torch.Tensor] = []
    vit.blocks.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    x, kept = torch.randn(2, 1, 16, 16), patch_mask()
    with torch.no_grad():
        model(x, kept)
        embedded = vit.patch_embed(x)
    hidden = (kept[:, 0, ::4, ::4] == 0).flatten(1)[..., None]  # (B, 16, 1), row-major
    position = vit.pos_embed[:, vit.num_prefix_tokens :]
    expected = torch.where(hidden, model.mask_token, embedded) + position
    tokens = seen[0][:, vit.num_prefix_tokens :]
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
    assert torch.equal(seen[0][:, 0], (vit.cls_token + vit.pos_embed[:, :1])[0].expand(2, -1))


@pytest.mark.parametrize("model_params", [TINY_VIT, TINY_RESNET], ids=["vit", "cnn"])
def test_hidden_pixels_never_reach_the_encoder(model_params):
    torch.manual_seed(0)
    model = MaskedImageModel(build_encoder(model_params, 16, 1), 1).eval()
    assert (model.mask_token is not None) == (model_params is TINY_VIT)
    kept = patch_mask()
    x = torch.randn(2, 1, 16, 16)
    other = torch.randn_like(x)
    with torch.no_grad():
        out = model(x, kept)
        assert torch.equal(model(x * kept + other * (1 - kept), kept), out)
        assert not torch.allclose(model(x * (1 - kept) + other * kept, kept), out)
        assert not torch.allclose(model(x), out)  # no mask: the whole image is seen


def test_gradients_reach_the_mask_token_only_through_hidden_patches():
    torch.manual_seed(0)
    model = MaskedImageModel(build_encoder(TINY_VIT, 16, 1), 1)
    assert model.mask_token is not None and model.mask_token.shape == (1, 1, 32)
    assert 0 < model.mask_token.abs().max() < 0.1  # trunc_normal(std=0.02)
    assert model.no_weight_decay() == {"mask_token"}
    x, target = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    kept = patch_mask()
    MaskedPixelLoss()(model(x, kept), target, kept).backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    model.zero_grad()
    model(x, torch.ones_like(kept)).square().mean().backward()
    assert model.mask_token.grad is None or model.mask_token.grad.abs().sum() == 0


def test_only_the_spatial_pretext_gets_the_masking_wrapper():
    encoder = build_encoder(TINY_VIT, 16, 1)
    assert isinstance(pretext_model(encoder, 1, "mim"), MaskedImageModel)
    for name in ("mfm", "sr", "deblur", "denoise"):
        model = pretext_model(encoder, 1, name)
        assert type(model) is MFMModel and "mask_token" not in dict(model.named_parameters())


# --- bad params -------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_a_ratio_outside_zero_one_is_a_validation_error(ratio):
    with pytest.raises(UserError, match=r"pretrain\.mim\.mask_ratio"):
        validate_params({"pretrain": {"pretext": "mim", "mim": {"mask_ratio": ratio}}})


@pytest.mark.parametrize(
    ("mim", "img_size", "encoder_patch", "message"),
    [
        (MIMParams(mask_patch_size=6), 32, 4, r"mask_patch_size = 6 does not divide .* 32"),
        (MIMParams(mask_patch_size=2), 32, 4, r"mask_patch_size = 2 is not a multiple .* 4"),
        (
            MIMParams(mask_patch_size=12),
            48,
            8,
            r"mask_patch_size = 12 is not a multiple of the ViT's patch size 8.*e\.g\. 8",
        ),
        (
            MIMParams(mask_patch_size=4, mask_ratio=0.005),
            32,
            None,
            r"mask_ratio = 0.005 hides 0 of",
        ),
        (
            MIMParams(mask_patch_size=16, mask_ratio=0.9),
            32,
            None,
            r"mask_ratio = 0.9 hides 4 of the 4",
        ),
    ],
)
def test_a_mask_grid_that_does_not_fit_names_the_key_and_the_fix(
    mim, img_size, encoder_patch, message
):
    with pytest.raises(UserError, match=r"^pretrain\.mim\." + message):
        check_geometry(mim, img_size, encoder_patch)


def test_cnns_take_any_mask_patch_that_divides_the_image():
    check_geometry(MIMParams(mask_patch_size=2), 32, None)
    check_geometry(MIMParams(mask_patch_size=8), 32, 4)


# --- the pretrain stage -----------------------------------------------------------------------


def mim_params(model: ModelParams, **pretrain: Any) -> Params:
    """The tiny training job on 64 digits at 16 px: two steps of 32 images."""
    raw = tiny_training_params(1, 1, 32)
    raw["data"].update(train_limit=64, test_limit=8)
    raw["model"] = model.model_dump()
    raw["pretrain"].update(pretext="mim", **pretrain)
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mim") / "prepared"
    mfm.prepare.run(mim_params(TINY_VIT), out)
    return out


@pytest.mark.parametrize("model_params", [TINY_VIT, TINY_RESNET], ids=["vit", "cnn"])
def test_pretrain_runs_mim_and_saves_a_plain_encoder(model_params, prepared, tmp_path):
    params = mim_params(model_params)
    metrics = mfm.pretrain.run(params, prepared, tmp_path)
    assert metrics["pretext"] == "mim" and math.isfinite(metrics["final_loss"])
    assert metrics["final_loss"] > 0
    assert (tmp_path / "reconstruction.png").is_file()
    # The token trained with the model (it is in the resumable checkpoint) ...
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert ("mask_token" in ckpt["model"]) == (model_params is TINY_VIT)
    # ... but the encoder file is the plain timm backbone, as linprobe and finetune load it.
    encoder = load_encoder(tmp_path / "encoder.pt")
    fresh = build_encoder(model_params, 16, 1).backbone.state_dict()
    assert set(encoder.backbone.state_dict()) == set(fresh)
    classifier, _ = build_classifier(model_params, 16, 1, 10, 0.0)
    report = load_encoder_weights(classifier, tmp_path / "encoder.pt")
    assert not any("mask" in key for key in report["missing"] + report["unexpected"])


def test_reconstruction_figure_shows_the_masked_input(prepared, tmp_path, monkeypatch):
    drawn: dict[str, Any] = {}

    def capture(images, masks, corrupted, predictions, path, title, mask_title):
        drawn.update(images=images, masks=masks, corrupted=corrupted, predictions=predictions)
        drawn.update(title=title, mask_title=mask_title)

    monkeypatch.setattr(mfm.pretrain, "reconstruction_figure", capture)
    mfm.pretrain.run(mim_params(TINY_VIT), prepared, tmp_path)
    images, kept = drawn["images"], drawn["masks"]
    assert drawn["mask_title"] == "kept pixels" and drawn["title"].startswith("mim")
    assert hidden_patches(kept, 4).tolist() == [10] * images.shape[0]
    assert torch.equal(drawn["corrupted"], images * kept)
    # The prediction fills the hidden patches; the kept pixels are the input's own.
    assert torch.equal(drawn["predictions"] * kept, images * kept)
    assert not torch.allclose(drawn["predictions"] * (1 - kept), images * (1 - kept))


def test_a_vit_mask_patch_off_its_patch_grid_stops_before_anything_is_written(prepared, tmp_path):
    params = mim_params(TINY_VIT, mim={"mask_patch_size": 2})
    with pytest.raises(UserError, match=r"pretrain\.mim\.mask_patch_size = 2 .* multiple of 4"):
        mfm.pretrain.run(params, prepared, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_throughput_benchmark_times_the_spatial_baseline_step(monkeypatch):
    """``python -m mfm bench`` with pretext mim times the masking model and the pixel loss."""
    from mfm import throughput

    seen: list[torch.Tensor | None] = []
    forward = MaskedImageModel.forward

    def spy(self: MaskedImageModel, x: torch.Tensor, kept: torch.Tensor | None = None):
        seen.append(kept)
        return forward(self, x, kept)

    monkeypatch.setattr(MaskedImageModel, "forward", spy)
    params = mim_params(TINY_VIT)
    params.runtime.amp = False
    out = throughput.run(params, 4, steps=1, warmup=1, channels=1)
    assert seen and all(kept is not None and (kept == 0).any() for kept in seen)
    assert out["pretext"] == "mim" and out["images_per_second"] > 0
    assert out["corruption_loop_ms"] is None  # the per-image loop is MFM's only
