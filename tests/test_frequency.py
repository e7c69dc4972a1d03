"""The corruptions: analytic mask properties, randomness under seed, and the restorations."""

from __future__ import annotations

import pytest
import torch
from kornia.filters import gaussian_blur2d
from torch import nn

from mfm.config import PretrainParams
from mfm.frequency import (
    PRETEXTS,
    RandomFrequencyMask,
    RandomGaussianDeblur,
    RandomGaussianNoise,
    RandomSuperResolution,
    build_corruption,
    filter_spectrum,
    frequency_mask,
    uses_mask,
)

SIZES = [(8, 8), (7, 7), (9, 6), (5, 12)]
SPATIAL = (-2, -1)


def shifted_fft(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x), dim=SPATIAL)


def high_frequency_energy(x: torch.Tensor, radius: float = 4.0) -> torch.Tensor:
    high = 1.0 - frequency_mask(*x.shape[-2:], radius)
    return ((shifted_fft(x).abs() ** 2) * high).sum()


def low_high_pair(radius: float, inner: float = 0.0) -> tuple[RandomFrequencyMask, ...]:
    low = RandomFrequencyMask(radius, inner_radius=inner, p_low=1.0, clamp=False)
    high = RandomFrequencyMask(radius, inner_radius=inner, p_low=0.0, clamp=False)
    return low, high


# --- frequency_mask ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("radius", "inner"), [(2.0, 0.0), (3.5, 1.0)])
def test_low_and_high_pass_masks_and_images_add_up(size, radius, inner):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    low, high = low_high_pair(radius, inner)
    low_out, low_mask = low.corrupt(x)
    high_out, high_mask = high.corrupt(x)
    assert torch.equal(low_mask + high_mask, torch.ones_like(low_mask))
    assert low_mask.sum() > 0 and high_mask.sum() > 0
    torch.testing.assert_close(low_out + high_out, x)


def test_band_is_outer_disc_minus_inner_disc():
    band = frequency_mask(11, 10, 4.0, inner_radius=2.0)
    expected = frequency_mask(11, 10, 4.0) - frequency_mask(11, 10, 2.0)
    assert torch.equal(band, expected)
    assert band[11 // 2, 10 // 2] == 0  # DC sits inside the inner disc


def test_mask_is_centred_on_dc_and_binary():
    mask = frequency_mask(7, 8, 1.0)
    assert mask.shape == (7, 8) and mask.dtype == torch.float32
    assert mask.sum() == 1 and mask[3, 4] == 1
    assert set(frequency_mask(9, 9, 3.3).unique().tolist()) == {0.0, 1.0}


def test_batched_radii_stack_the_scalar_masks():
    radii = torch.tensor([1.0, 2.5, 4.0])
    stacked = frequency_mask(9, 8, radii, inner_radius=0.5)
    assert stacked.shape == (3, 9, 8)
    for i, r in enumerate(radii.tolist()):
        assert torch.equal(stacked[i], frequency_mask(9, 8, r, inner_radius=0.5))


def test_released_config_keeps_793_bins_and_fraction_unit_matches():
    mask = frequency_mask(224, 224, 16.0)
    assert int(mask.sum()) == 793
    x = torch.rand(1, 1, 224, 224)
    _, bins_mask = RandomFrequencyMask(16.0, p_low=1.0).corrupt(x)
    _, frac_mask = RandomFrequencyMask(16 / 224, radius_unit="fraction", p_low=1.0).corrupt(x)
    assert torch.equal(bins_mask[0, 0], mask)
    assert torch.equal(frac_mask, bins_mask)


@pytest.mark.parametrize(("side", "radius"), [(25, 7), (50, 14), (47, 3), (44, 15)])
def test_fraction_unit_is_exact_despite_float_rounding(side, radius):
    # radius / side * side is not exactly radius here; the bins on the circle must stay out
    assert radius / side * side != radius
    x = torch.rand(1, 1, side, side)
    aug = RandomFrequencyMask(radius / side, inner_radius=1 / side, radius_unit="fraction")
    _, mask = RandomFrequencyMask(radius / side, radius_unit="fraction", p_low=1.0).corrupt(x)
    assert torch.equal(mask[0, 0], frequency_mask(side, side, float(radius)))
    torch.manual_seed(0)
    _, band = aug.corrupt(x)
    expected = frequency_mask(side, side, float(radius), inner_radius=1.0)
    assert torch.equal(band[0, 0], expected if aug._params["low"][0] else 1.0 - expected)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("radius", "inner"), [(2.0, 0.0), (2.9, 1.5), (4.2, 0.0)])
def test_masks_are_point_symmetric_so_real_images_stay_real(size, radius, inner):
    torch.manual_seed(1)
    x = torch.rand(3, 2, *size)
    disc = frequency_mask(*size, radius, inner_radius=inner)
    for mask in (disc, 1.0 - disc):
        unshifted = torch.fft.ifftshift(mask, dim=SPATIAL)
        mirrored = unshifted.flip(SPATIAL).roll((1, 1), dims=SPATIAL)  # index k -> -k mod N
        assert torch.equal(unshifted, mirrored)
        complex_out = torch.fft.ifft2(torch.fft.ifftshift(shifted_fft(x) * mask, dim=SPATIAL))
        assert complex_out.imag.abs().max() < 1e-5


# --- RandomFrequencyMask ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (15, 13)])
def test_low_passed_image_has_no_energy_outside_the_disc(size):
    torch.manual_seed(2)
    x = torch.rand(4, 3, *size)
    out, mask = RandomFrequencyMask(3.0, p_low=1.0, clamp=False).corrupt(x)
    leaked = (shifted_fft(out) * (1.0 - mask)).abs().max()
    kept = (shifted_fft(out) * mask).abs().max()
    assert leaked < 1e-4 and kept > 1.0


def test_mask_of_last_call_is_the_one_applied():
    torch.manual_seed(3)
    aug = RandomFrequencyMask((1.0, 3.0), clamp=False)
    x = torch.rand(6, 3, 12, 12)
    out = aug(x)
    assert aug.last_mask.shape == (6, 1, 12, 12)
    torch.testing.assert_close(out, filter_spectrum(x, aug.last_mask))


def test_same_seed_same_masks_and_outputs_other_seed_differs():
    aug = RandomFrequencyMask((1.0, 5.0), p_low=0.5)
    x = torch.rand(16, 3, 16, 16)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        return aug.corrupt(x)

    out_a, mask_a = run(7)
    out_b, mask_b = run(7)
    out_c, mask_c = run(8)
    assert torch.equal(mask_a, mask_b) and torch.equal(out_a, out_b)
    assert not torch.equal(mask_a, mask_c) and not torch.equal(out_a, out_c)


@pytest.mark.parametrize("p_low", [0.0, 0.3, 0.5, 1.0])
def test_low_pass_share_matches_p_low(p_low):
    torch.manual_seed(4)
    _, mask = RandomFrequencyMask(2.0, p_low=p_low).corrupt(torch.rand(4000, 1, 8, 8))
    share = mask[:, 0, 4, 4].mean().item()  # a low-pass disc keeps DC, a high-pass drops it
    assert abs(share - p_low) < 0.03


def test_radius_range_is_sampled_within_bounds_and_varies():
    torch.manual_seed(5)
    size = 32
    _, mask = RandomFrequencyMask((2.0, 6.0), p_low=1.0).corrupt(torch.rand(64, 1, size, size))
    kept = mask.sum(dim=(1, 2, 3))
    smallest = frequency_mask(size, size, 2.0).sum()
    largest = frequency_mask(size, size, 6.0).sum()
    assert (kept >= smallest).all() and (kept <= largest).all()
    assert kept.unique().numel() >= 5


def test_clamp_keeps_unit_range_and_unclamped_high_pass_goes_negative():
    torch.manual_seed(6)
    x = torch.rand(8, 3, 16, 16)
    clamped, _ = RandomFrequencyMask(2.0, p_low=0.5).corrupt(x)
    assert clamped.min() >= 0 and clamped.max() <= 1
    raw, _ = RandomFrequencyMask(2.0, p_low=0.0, clamp=False).corrupt(x)
    assert raw.min() < 0


def test_invalid_mask_settings_are_rejected():
    for kwargs in ({"radius": 0.0}, {"radius": (3.0, 2.0)}, {"radius": 2.0, "p_low": 1.5}):
        with pytest.raises(ValueError):
            RandomFrequencyMask(**kwargs)


# --- restoration pretexts ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (20, 18), (5, 7)])
def test_super_resolution_shape_range_and_constant_image(size):
    torch.manual_seed(7)
    sr = RandomSuperResolution(scale=8)
    x = torch.rand(2, 3, *size)
    out, mask = sr.corrupt(x)
    assert mask is None and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, sr(x))
    constant = torch.full((1, 3, *size), 0.37)
    torch.testing.assert_close(sr(constant), constant)


def test_super_resolution_removes_detail():
    torch.manual_seed(8)
    x = torch.rand(2, 1, 32, 32)
    out = RandomSuperResolution(scale=4)(x)
    assert (out - x).abs().mean() > 0.1
    # what survives is mostly below the small image's Nyquist radius (32 / 4 / 2 bins)
    assert high_frequency_energy(out, radius=4.0) < 0.3 * high_frequency_energy(x, radius=4.0)


def test_deblur_blurs_each_image_with_its_drawn_kernel():
    torch.manual_seed(9)
    deblur = RandomGaussianDeblur(sigma=2.0, kernel_sizes=(3, 7, 11))
    x = torch.rand(12, 3, 24, 24)
    out, mask = deblur.corrupt(x)
    sizes = deblur._params["kernel_size"]
    assert mask is None and out.shape == x.shape and sizes.unique().numel() > 1
    for i, k in enumerate(sizes.tolist()):
        expected = gaussian_blur2d(x[i : i + 1], (k, k), (2.0, 2.0), "reflect")
        torch.testing.assert_close(out[i : i + 1], expected)


def test_deblur_keeps_constants_and_cuts_high_frequencies():
    torch.manual_seed(10)
    deblur = RandomGaussianDeblur()
    constant = torch.full((4, 3, 32, 32), 0.6)
    torch.testing.assert_close(deblur(constant), constant)
    noise = torch.rand(4, 3, 32, 32)
    assert high_frequency_energy(deblur(noise)) < 0.01 * high_frequency_energy(noise)


def test_deblur_is_seeded_and_handles_kernels_larger_than_the_image():
    deblur = RandomGaussianDeblur()
    x = torch.rand(16, 3, 32, 32)
    torch.manual_seed(11)
    first = deblur(x)
    torch.manual_seed(11)
    assert torch.equal(first, deblur(x))
    torch.manual_seed(12)
    assert not torch.equal(first, deblur(x))
    tiny = RandomGaussianDeblur(kernel_sizes=(21,))(torch.rand(2, 3, 5, 4))
    assert tiny.shape == (2, 3, 5, 4) and torch.isfinite(tiny).all()


def test_denoise_adds_unclipped_noise_of_the_right_std():
    sigma = 75 / 255
    x = torch.full((4, 3, 32, 32), 0.5)
    torch.manual_seed(13)
    out, mask = RandomGaussianNoise(sigma).corrupt(x)
    noise = out - x
    assert mask is None and out.shape == x.shape
    assert abs(noise.std().item() - sigma) < 0.03 * sigma
    assert abs(noise.mean().item()) < 0.02
    assert out.min() < 0 and out.max() > 1
    # per-channel: the channels get different noise
    assert not torch.equal(noise[:, 0], noise[:, 1])


def test_denoise_is_seeded():
    denoise = RandomGaussianNoise()
    x = torch.rand(2, 3, 8, 8)
    torch.manual_seed(14)
    first = denoise(x)
    torch.manual_seed(14)
    assert torch.equal(first, denoise(x))
    torch.manual_seed(15)
    assert not torch.equal(first, denoise(x))


# --- registry ---------------------------------------------------------------------------------

EXPECTED = {
    "mfm": RandomFrequencyMask,
    "sr": RandomSuperResolution,
    "deblur": RandomGaussianDeblur,
    "denoise": RandomGaussianNoise,
}


@pytest.mark.parametrize("pretext", sorted(EXPECTED))
def test_build_corruption_picks_the_pretext(pretext):
    pretrain = PretrainParams(pretext=pretext)
    corruption = build_corruption(pretrain).to("cpu")
    assert type(corruption) is EXPECTED[pretext] and PRETEXTS[pretext] is EXPECTED[pretext]
    assert isinstance(corruption, nn.Module)
    out, mask = corruption.corrupt(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, 3, 16, 16)
    assert (mask is not None) == uses_mask(pretext)


def test_build_corruption_passes_each_section_through():
    pretrain = PretrainParams(pretext="mfm")
    pretrain.mask.radius = (2.0, 3.0)
    pretrain.mask.p_low = 0.3
    mask_aug = build_corruption(pretrain)
    assert mask_aug.radius_range == (2.0, 3.0) and mask_aug.p_low == 0.3
    pretrain.pretext = "sr"
    pretrain.sr.scale = 4
    assert build_corruption(pretrain).scale == 4
    pretrain.pretext = "deblur"
    pretrain.deblur.kernel_sizes = [3, 5]
    assert build_corruption(pretrain).kernel_sizes == (3, 5)
    pretrain.pretext = "denoise"
    pretrain.denoise.sigma = 0.1
    assert build_corruption(pretrain).sigma == 0.1


def test_uses_mask_only_for_mfm():
    assert uses_mask("mfm")
    assert not any(uses_mask(name) for name in ("sr", "deblur", "denoise"))
    with pytest.raises(ValueError):
        uses_mask("jigsaw")


@pytest.mark.parametrize("pretext", ["mfm", "sr", "deblur", "denoise"])
def test_corruptions_stay_float32_inside_autocast(pretext):
    # The training step runs under autocast; a bf16 conv inside deblur once broke index_put.
    params = PretrainParams(pretext=pretext)
    corruption = build_corruption(params)
    x = torch.rand(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = corruption.corrupt(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
