"""The corruptions (pretexts) as kornia augmentations: MFM's frequency mask, three restorations
and SimMIM's spatial patch mask (the baseline that hides pixels instead of frequencies).

Every corruption works on batched un-normalised images in [0, 1], always fires (``p=1``), draws
its random choices from torch's global RNG (so ``torch.manual_seed`` reproduces a batch) and
offers the same ``corrupt(x) -> (x', mask | None)`` call, where ``mask`` is 1 where the input
kept the content: the centred-spectrum mask the loss needs for MFM, the pixel mask for the
spatial baseline, and ``None`` (loss over all bins) for the restoration pretexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from kornia.augmentation import IntensityAugmentationBase2D
from kornia.filters import gaussian_blur2d
from torch import Tensor

from mfm.config import (
    DeblurParams,
    DenoiseParams,
    MaskParams,
    MIMParams,
    PretrainParams,
    SRParams,
)
from mfm.spatial_mask import grid_to_pixels, random_patch_grid

RadiusUnit = Literal["bins", "fraction"]
SPATIAL_DIMS = (-2, -1)  # the (H, W) axes every FFT, shift and mask here works on


def _squared_threshold(radius: float | Tensor) -> Tensor:
    """Smallest integer >= radius**2, in float64 on the CPU.

    Squared bin distances are integers, so ``d2 < r**2`` is exactly ``d2 < ceil(r**2)``. Working
    with that integer keeps the mask exact on any device and dtype, and the tiny relative slack
    absorbs rounding such as ``16 / 224 * 224`` landing just above 16.
    """
    if isinstance(radius, Tensor):
        radius = radius.detach().cpu()
    r2 = torch.as_tensor(radius, dtype=torch.float64) ** 2
    return torch.ceil(r2 * (1.0 - 1e-9))


def frequency_mask(
    height: int,
    width: int,
    outer_radius: float | Tensor,
    inner_radius: float | Tensor = 0.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Disc (or band) of the fftshift-centred spectrum: 1 where inner <= distance to DC < outer.

    DC sits at ``[H // 2, W // 2]``. A 1-D ``outer_radius`` (or ``inner_radius``) of size B gives a
    (B, H, W) stack; scalars give (H, W). The high-pass mask is ``1 - frequency_mask(...)``.
    """
    if device is None and isinstance(outer_radius, Tensor):
        device = outer_radius.device
    ys = torch.arange(height, device=device) - height // 2
    xs = torch.arange(width, device=device) - width // 2
    dist2 = ys[:, None] ** 2 + xs[None, :] ** 2
    outer = _squared_threshold(outer_radius).to(device=device, dtype=torch.int64)
    inner = _squared_threshold(inner_radius).to(device=device, dtype=torch.int64)
    if outer.dim() > 0 or inner.dim() > 0:
        outer, inner = outer.reshape(-1, 1, 1), inner.reshape(-1, 1, 1)
    return ((dist2 >= inner) & (dist2 < outer)).float()


def filter_spectrum(x: Tensor, mask: Tensor) -> Tensor:
    """Keep the centred-spectrum bins where ``mask`` is 1 (same mask for every channel).

    Equal to ``ifft2(ifftshift(fftshift(fft2(x)) * M)).real`` but cheaper: the mask is moved
    to the unshifted layout instead of the spectrum, and since every mask here is real and
    point-symmetric, the real FFT's half spectrum carries all the information. Half-precision
    input is filtered in float32.
    """
    height, width = x.shape[-2:]
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    half_mask = torch.fft.ifftshift(mask, dim=SPATIAL_DIMS)[..., : width // 2 + 1]
    filtered = torch.fft.irfft2(torch.fft.rfft2(xf) * half_mask, s=(height, width))
    return filtered.to(x.dtype)


class Corruption(IntensityAugmentationBase2D):
    """Base for the pretexts: always applied, and a uniform ``corrupt`` call for the trainer."""

    def __init__(self) -> None:
        super().__init__(p=1.0)
        self.last_mask: Tensor | None = None  # set by masking pretexts in apply_transform

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Nothing random by default."""
        return {}

    def corrupt(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Corrupt a batch; return it with the (B, 1, H, W) mask that was applied (1 = kept
        bin or pixel), or None for restoration pretexts, whose loss covers all bins."""
        out = self.full_precision(x)
        return out, self.last_mask

    def full_precision(self, x: Tensor) -> Tensor:
        """Apply in float32 even inside an autocast region: the corruption defines the target
        problem, so bf16 rounding must not leak into it."""
        with torch.autocast(x.device.type, enabled=False):
            return self(x if x.dtype in (torch.float32, torch.float64) else x.float())


class RandomFrequencyMask(Corruption):
    """MFM: per image, keep a low-pass disc (prob ``p_low``) or its high-pass complement."""

    def __init__(
        self,
        radius: float | tuple[float, float],
        inner_radius: float = 0.0,
        radius_unit: RadiusUnit = "bins",
        p_low: float = 0.5,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        low, high = (radius, radius) if isinstance(radius, float | int) else radius
        if not 0 < low <= high:
            raise ValueError(f"radius must be > 0 or a range 0 < low <= high, got {radius!r}")
        if radius_unit not in ("bins", "fraction"):
            raise ValueError(f"radius_unit must be 'bins' or 'fraction', got {radius_unit!r}")
        if not 0.0 <= p_low <= 1.0 or inner_radius < 0:
            raise ValueError("p_low must lie in [0, 1] and inner_radius must be >= 0")
        self.radius_range = (float(low), float(high))
        self.inner_radius = float(inner_radius)
        self.radius_unit = radius_unit
        self.p_low = p_low
        self.clamp = clamp

    @classmethod
    def from_params(cls, params: MaskParams) -> RandomFrequencyMask:
        return cls(
            params.radius, params.inner_radius, params.radius_unit, params.p_low, params.clamp
        )

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Size-free draws (the radius is resolved in pixels only once the image size is known)."""
        batch = batch_shape[0]
        return {"low": torch.rand(batch) < self.p_low, "radius_draw": torch.rand(batch)}

    def masks(self, params: dict[str, Tensor], height: int, width: int, device: Any) -> Tensor:
        """Per-image (B, 1, H, W) masks for the drawn params at this image size."""
        low, high = self.radius_range
        scale = min(height, width) if self.radius_unit == "fraction" else 1.0
        draw = params["radius_draw"].detach().cpu().double()
        outer = (low + draw * (high - low)) * scale
        disc = frequency_mask(height, width, outer, self.inner_radius * scale, device)
        keep_low = params["low"].to(device).reshape(-1, 1, 1)
        return torch.where(keep_low, disc, 1.0 - disc).unsqueeze(1)

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        mask = self.masks(params, input.shape[-2], input.shape[-1], input.device)
        self.last_mask = mask
        out = filter_spectrum(input, mask)
        return out.clamp(0.0, 1.0) if self.clamp else out


class RandomSuperResolution(Corruption):
    """SR pretext: bicubic down by ``scale`` (no antialias), bicubic back up, clamping each step."""

    def __init__(self, scale: int = 8) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.scale = scale

    @classmethod
    def from_params(cls, params: SRParams) -> RandomSuperResolution:
        return cls(params.scale)

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        height, width = input.shape[-2:]
        small_size = (max(1, height // self.scale), max(1, width // self.scale))
        small = F.interpolate(input, size=small_size, mode="bicubic", align_corners=False)
        up = F.interpolate(
            small.clamp(0.0, 1.0), size=(height, width), mode="bicubic", align_corners=False
        )
        return up.clamp(0.0, 1.0)


class RandomGaussianDeblur(Corruption):
    """Deblur pretext: isotropic Gaussian blur with a kernel size drawn per image."""

    def __init__(self, sigma: float = 5.0, kernel_sizes: Sequence[int] = tuple(range(7, 22, 2))):
        super().__init__()
        if sigma <= 0 or not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError("sigma must be > 0 and kernel_sizes a non-empty list of odd sizes")
        self.sigma = float(sigma)
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)

    @classmethod
    def from_params(cls, params: DeblurParams) -> RandomGaussianDeblur:
        return cls(params.sigma, params.kernel_sizes)

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        index = torch.randint(len(self.kernel_sizes), (batch_shape[0],))
        return {"kernel_size": torch.tensor(self.kernel_sizes)[index]}

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        # Reflect padding needs k // 2 < side, so the largest usable odd kernel is 2 * side - 1.
        largest = 2 * min(input.shape[-2:]) - 1
        sizes = params["kernel_size"].cpu()
        out = torch.empty_like(input)
        for size in sizes.unique().tolist():
            chosen = (sizes == size).to(input.device)
            k = min(size, largest)
            blurred = gaussian_blur2d(input[chosen], (k, k), (self.sigma, self.sigma), "reflect")
            out[chosen] = blurred.to(out.dtype)
        return out


class RandomGaussianNoise(Corruption):
    """Denoise pretext: additive per-pixel, per-channel Gaussian noise, deliberately not clipped."""

    def __init__(self, sigma: float = 75 / 255) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    @classmethod
    def from_params(cls, params: DenoiseParams) -> RandomGaussianNoise:
        return cls(params.sigma)

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        # Drawn on the input's device: shipping a batch-sized CPU draw to the GPU costs more.
        return input + self.sigma * torch.randn_like(input)


class RandomPatchMask(Corruption):
    """SimMIM's baseline: per image, exactly ``round(ratio * patches)`` square patches set to 0.

    The zeros only show what was hidden: the model gets the kept-pixel mask too and hides
    those patches from its encoder itself (a ViT's mask token, a CNN's zeroed input).
    """

    def __init__(self, mask_patch_size: int = 4, mask_ratio: float = 0.6) -> None:
        super().__init__()
        if mask_patch_size < 1 or not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"need mask_patch_size >= 1 and 0 < mask_ratio < 1, got {mask_patch_size}, "
                f"{mask_ratio}"
            )
        self.mask_patch_size = int(mask_patch_size)
        self.mask_ratio = float(mask_ratio)

    @classmethod
    def from_params(cls, params: MIMParams) -> RandomPatchMask:
        return cls(params.mask_patch_size, params.mask_ratio)

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        """The hidden patches of each image, (B, H / patch, W / patch) bool."""
        height, width = batch_shape[-2:]
        size = self.mask_patch_size
        if height % size or width % size:
            raise ValueError(f"a {height}x{width} image does not split into {size} px patches")
        return {
            "hidden": random_patch_grid(
                batch_shape[0], (height // size, width // size), self.mask_ratio
            )
        }

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        hidden = grid_to_pixels(params["hidden"].to(input.device), self.mask_patch_size)
        kept = (~hidden).to(input.dtype)
        self.last_mask = kept
        return input * kept


PRETEXTS: dict[str, type[Corruption]] = {
    "mfm": RandomFrequencyMask,
    "sr": RandomSuperResolution,
    "deblur": RandomGaussianDeblur,
    "denoise": RandomGaussianNoise,
    "mim": RandomPatchMask,
}
_SECTIONS = {"mfm": "mask", "sr": "sr", "deblur": "deblur", "denoise": "denoise", "mim": "mim"}


def uses_mask(pretext: str) -> bool:
    """Whether the frequency loss is restricted to masked bins (MFM) rather than all bins (the
    spatial baseline scores masked pixels instead, with ``mfm.losses.MaskedPixelLoss``)."""
    if pretext not in PRETEXTS:
        raise ValueError(f"unknown pretext {pretext!r}; choose one of {sorted(PRETEXTS)}")
    return pretext == "mfm"


def build_corruption(pretrain: PretrainParams) -> Corruption:
    """The corruption for ``pretrain.pretext``, configured from its own params section."""
    cls = PRETEXTS[pretrain.pretext]
    return cls.from_params(getattr(pretrain, _SECTIONS[pretrain.pretext]))
