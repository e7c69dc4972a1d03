"""FrequencyLoss: analytic values, masked-bin reduction, focal weight, gradients and bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfm.config import LossParams
from mfm.frequency import frequency_mask
from mfm.losses import FrequencyLoss

N = 8
CENTRE = N // 2
KEPT_RADIUS = 2.0  # the low-pass disc keeps bins closer than this to DC


def bin_perturbation(dy: int, dx: int, amplitude: complex = 40 + 30j) -> torch.Tensor:
    """A real (1, 1, N, N) image whose centred spectrum is non-zero only at +-(dy, dx) from DC."""
    spectrum = torch.zeros(N, N, dtype=torch.complex64)
    spectrum[CENTRE + dy, CENTRE + dx] = amplitude
    spectrum[CENTRE - dy, CENTRE - dx] = complex(amplitude).conjugate()
    image = torch.fft.ifft2(torch.fft.ifftshift(spectrum), norm="ortho")
    assert image.imag.abs().max() < 1e-5
    return image.real[None, None]


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, N, N, generator=gen)
    pred = target + 0.5 * torch.randn(2, 3, N, N, generator=gen)
    return pred, target


@pytest.fixture
def kept_mask() -> torch.Tensor:
    return frequency_mask(N, N, KEPT_RADIUS).expand(2, 1, N, N)


@pytest.mark.parametrize("kwargs", [{}, {"gamma": 2.0}, {"gamma": 0.5}, {"alpha": 1.0}])
def test_zero_on_identical_inputs(pair, kept_mask, kwargs):
    pred, _ = pair
    loss = FrequencyLoss(**kwargs)
    assert loss(pred, pred.clone()) == 0
    assert loss(pred, pred.clone(), kept_mask) == 0


def test_change_in_a_kept_bin_is_ignored_and_a_masked_bin_counts(pair, kept_mask):
    pred, target = pair
    loss = FrequencyLoss()
    kept_change = bin_perturbation(1, 0)  # distance 1 < 2: visible to the encoder
    masked_change = bin_perturbation(2, 1)  # distance sqrt(5) >= 2: hidden, to be predicted
    assert kept_mask[0, 0, CENTRE + 1, CENTRE] == 1 and kept_mask[0, 0, CENTRE + 2, CENTRE + 1] == 0
    base = loss(pred, target, kept_mask)
    torch.testing.assert_close(loss(pred + kept_change, target, kept_mask), base)
    assert loss(pred + masked_change, target, kept_mask) > base + 0.1
    unmasked = loss(pred, target)
    assert loss(pred + kept_change, target) > unmasked + 0.1
    assert loss(pred + masked_change, target) > unmasked + 0.1


def test_masked_reduction_is_the_mean_over_hidden_bins(pair, kept_mask):
    pred, target = pair
    diff = torch.fft.fftshift(torch.fft.fft2(pred - target, norm="ortho"), dim=(-2, -1)).abs()
    hidden = (kept_mask == 0).expand_as(diff)
    expected = diff[hidden].mean()
    loss = FrequencyLoss()
    for mask in (kept_mask, kept_mask[:, 0], kept_mask[0, 0]):  # (B,1,H,W), (B,H,W), (H,W)
        torch.testing.assert_close(loss(pred, target, mask), expected)


def test_nothing_masked_gives_zero_with_grad(pair):
    pred, target = pair
    pred = pred.clone().requires_grad_()
    value = FrequencyLoss()(pred, target, torch.ones(N, N))
    assert value == 0 and value.requires_grad
    value.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_gamma_one_is_mean_spectrum_distance_against_numpy(pair):
    pred, target = pair
    spectra = [np.fft.fftshift(np.fft.fft2(t.numpy(), norm="ortho"), axes=(-2, -1)) for t in pair]
    expected = np.abs(spectra[0] - spectra[1]).mean()
    assert FrequencyLoss()(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_gamma_two_is_mean_squared_magnitude_and_pixel_mse(pair):
    pred, target = pair
    value = FrequencyLoss(gamma=2.0)(pred, target)
    diff = torch.fft.fft2(pred, norm="ortho") - torch.fft.fft2(target, norm="ortho")
    torch.testing.assert_close(value, (diff.abs() ** 2).mean())
    torch.testing.assert_close(value, F.mse_loss(pred, target))  # Parseval, orthonormal FFT


@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_reach_the_prediction(pair, kept_mask, gamma, masked):
    pred, target = pair
    pred = pred.clone().requires_grad_()
    FrequencyLoss(gamma=gamma)(pred, target, kept_mask if masked else None).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_gradient_is_finite_at_zero_distance_for_gamma_below_one():
    pred = torch.rand(1, 1, N, N, requires_grad=True)
    FrequencyLoss(gamma=0.5)(pred, pred.detach().clone()).backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 1.0}, {"alpha": 2.0, "log_weight": True}, {"alpha": 1.0, "batch_weight": True}],
)
def test_focal_weight_changes_the_value_but_never_raises_it(pair, kwargs):
    pred, target = pair
    plain = FrequencyLoss()(pred, target)
    focal = FrequencyLoss(**kwargs)(pred, target)
    assert 0 < focal < plain - 1e-4


def test_focal_weight_is_normalised_per_image_or_per_batch(pair):
    pred, target = pair
    distance = torch.rand(2, 3, N, N)
    distance[1] *= 10
    per_image = FrequencyLoss(alpha=1.0).focal_weight(distance)
    per_batch = FrequencyLoss(alpha=1.0, batch_weight=True).focal_weight(distance)
    assert per_image.amax(dim=(-2, -1)).eq(1).all()
    assert per_batch.max() == 1 and per_batch[0].max() < 0.2
    assert not per_image.requires_grad
    zeros = FrequencyLoss(alpha=1.0).focal_weight(torch.zeros(1, 1, N, N))
    assert torch.equal(zeros, torch.zeros_like(zeros))  # 0 / 0 -> 0, not nan


def test_bf16_autocast_input_gives_float32(pair, kept_mask):
    pred, target = pair
    weight = torch.eye(N, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred_bf16 = pred @ weight
        assert pred_bf16.dtype == torch.bfloat16
        value = FrequencyLoss()(pred_bf16, target, kept_mask)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    reference = FrequencyLoss()(pred_bf16.float(), target, kept_mask)
    torch.testing.assert_close(value, reference)
    value.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_half_precision_input_outside_autocast(pair):
    pred, target = pair
    for dtype in (torch.bfloat16, torch.float16):
        value = FrequencyLoss()(pred.to(dtype), target)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, FrequencyLoss()(pred.to(dtype).float(), target))


def test_from_params():
    loss = FrequencyLoss.from_params(LossParams(gamma=2.0, alpha=1.0, log_weight=True))
    assert (loss.gamma, loss.alpha, loss.log_weight, loss.batch_weight) == (2.0, 1.0, True, False)
    with pytest.raises(ValueError):
        FrequencyLoss(gamma=0.0)
