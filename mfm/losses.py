"""The pretraining losses: MFM's focal-frequency-loss variant on the centred spectrum, and the
L1 on hidden pixels that the spatial-masking baseline (SimMIM) trains with."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfm.config import LossParams, PretrainParams
from mfm.frequency import SPATIAL_DIMS


def spectrum_difference(pred: Tensor, target: Tensor) -> Tensor:
    """``fft2(pred) - fft2(target)`` (orthonormal, float32) as one FFT of the difference.

    The FFT is linear, so this halves the loss's FFT work. Bins stay in the unshifted layout;
    masks from ``mfm.frequency`` are centred, so they are ``ifftshift``-ed instead (cheaper
    than shifting a complex spectrum of every channel).
    """
    return torch.fft.fft2(pred.float() - target.float(), norm="ortho")


def _safe_pow(magnitude: Tensor, gamma: float) -> Tensor:
    """``magnitude ** gamma`` whose gradient stays finite (zero) where the magnitude is zero."""
    if gamma == 1.0:
        return magnitude
    nonzero = magnitude > 0
    return torch.where(nonzero, torch.where(nonzero, magnitude, 1.0) ** gamma, 0.0)


def _as_4d(mask: Tensor) -> Tensor:
    """Accept (H, W), (B, H, W) or (B, 1, H, W) masks; return one that broadcasts over channels."""
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    return mask


class FrequencyLoss(nn.Module):
    """Mean ``w * |F(pred) - F(target)| ** gamma`` over masked bins (MFM) or all bins.

    ``w`` is the focal spectrum weight (Jiang et al. 2021) when ``alpha > 0``, else 1.
    """

    def __init__(
        self,
        gamma: float = 1.0,
        alpha: float = 0.0,
        log_weight: bool = False,
        batch_weight: bool = False,
    ) -> None:
        super().__init__()
        if gamma <= 0 or alpha < 0:
            raise ValueError(f"need gamma > 0 and alpha >= 0, got gamma={gamma}, alpha={alpha}")
        self.gamma = gamma
        self.alpha = alpha
        self.log_weight = log_weight
        self.batch_weight = batch_weight

    @classmethod
    def from_params(cls, loss: LossParams) -> FrequencyLoss:
        return cls(loss.gamma, loss.alpha, loss.log_weight, loss.batch_weight)

    def focal_weight(self, distance: Tensor) -> Tensor:
        """Harder bins weigh more: distance ** alpha scaled to [0, 1], with no gradient.

        Normalised by the max over each image's bins per channel (as the focal frequency loss
        does), or by the max over the whole batch when ``batch_weight``.
        """
        with torch.no_grad():
            weight = distance.detach() ** self.alpha
            if self.log_weight:
                weight = torch.log1p(weight)
            peak = (
                weight.max() if self.batch_weight else weight.amax(dim=SPATIAL_DIMS, keepdim=True)
            )
            weight = torch.nan_to_num(weight / peak, nan=0.0)
            return weight.clamp(0.0, 1.0)

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Float32 scalar; a ``mask`` (1 = bin kept by the corruption) limits it to the rest."""
        diff = spectrum_difference(pred, target)
        loss = _safe_pow(diff.abs(), self.gamma)
        if self.alpha > 0:
            loss = self.focal_weight(loss) * loss
        if mask is None:
            return loss.mean()
        centred = torch.fft.ifftshift(_as_4d(mask).to(loss), dim=SPATIAL_DIMS)
        hidden = (1.0 - centred).expand_as(loss)
        # Nothing hidden means a zero numerator: the clamp returns 0 and keeps the graph.
        return (loss * hidden).sum() / hidden.sum().clamp_min(1e-12)


class MaskedPixelLoss(nn.Module):
    """SimMIM's loss: mean ``|pred - target|`` over the hidden pixels and every channel.

    Scoring only what the input hid is what makes masking a pretext; the visible pixels
    would be copied for free. The ``mask`` is the corruption's (1 = kept pixel).
    """

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Float32 scalar; a mask that hides nothing gives 0 (and keeps the graph)."""
        error = (pred.float() - target.float()).abs()
        hidden = (1.0 - _as_4d(mask).to(error)).expand_as(error)
        return (error * hidden).sum() / hidden.sum().clamp_min(1e-12)


def build_loss(pretrain: PretrainParams) -> nn.Module:
    """The loss for ``pretrain.pretext``: pixels for the spatial baseline, else frequencies."""
    if pretrain.pretext == "mim":
        return MaskedPixelLoss()
    return FrequencyLoss.from_params(pretrain.loss)
