"""Spatial masks for the SimMIM-style baseline: which square patches of an image are hidden.

MFM hides frequencies; this baseline hides pixels, so the two can be compared through the
same encoder, head and data. Masks are drawn per image on a grid of ``mask_patch_size``
squares with exactly ``round(ratio * patches)`` of them hidden, then repeated up to pixels.
Like every corruption's draws, the scores come from torch's global CPU RNG, so
``torch.manual_seed`` reproduces a batch on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mfm.config import MIMParams
from mfm.errors import UserError


def hidden_count(ratio: float, patches: int) -> int:
    """How many of ``patches`` mask patches every image hides: ``round(ratio * patches)``."""
    return round(ratio * patches)


def random_patch_grid(batch: int, grid: tuple[int, int], ratio: float) -> Tensor:
    """(B, gh, gw) bool, True where a mask patch is hidden; each image hides exactly
    ``round(ratio * gh * gw)`` patches, the ones with the lowest uniform scores."""
    patches = grid[0] * grid[1]
    order = torch.rand(batch, patches).argsort(dim=1)
    hidden = torch.zeros(batch, patches, dtype=torch.bool)
    hidden.scatter_(1, order[:, : hidden_count(ratio, patches)], True)
    return hidden.reshape(batch, *grid)


def grid_to_pixels(grid: Tensor, patch: int) -> Tensor:
    """Repeat a (B, gh, gw) patch grid into a (B, 1, gh * patch, gw * patch) pixel mask."""
    return grid.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1).unsqueeze(1)


def check_geometry(mim: MIMParams, img_size: int, encoder_patch: int | None) -> None:
    """Stop with one line naming the key and the fix when the mask grid does not fit.

    ``encoder_patch`` is the patch side of a patch-embedding encoder (None for CNNs): a ViT
    replaces whole tokens by its mask token, so a mask patch must cover whole tokens.
    """
    size = mim.mask_patch_size
    fit = _nearest_fit(img_size, size, encoder_patch or 1)
    if img_size % size:
        raise UserError(
            f"pretrain.mim.mask_patch_size = {size} does not divide data.img_size = {img_size}; "
            f"set it to a divisor of {img_size} (e.g. {fit})"
        )
    if encoder_patch is not None and size % encoder_patch:
        raise UserError(
            f"pretrain.mim.mask_patch_size = {size} is not a multiple of the ViT's patch size "
            f"{encoder_patch} (model.patch_size); set it to a multiple of {encoder_patch} that "
            f"divides data.img_size = {img_size} (e.g. {fit})"
        )
    patches = (img_size // size) ** 2
    hidden = hidden_count(mim.mask_ratio, patches)
    if not 0 < hidden < patches:
        raise UserError(
            f"pretrain.mim.mask_ratio = {mim.mask_ratio} hides {hidden} of the {patches} mask "
            "patches per image; pick a ratio that hides at least one and keeps at least one"
        )


def _nearest_fit(img_size: int, wanted: int, step: int) -> int:
    """The multiple of ``step`` dividing ``img_size`` closest to ``wanted`` (for error hints)."""
    fits = [d for d in range(step, img_size + 1, step) if img_size % d == 0] or [step]
    return min(fits, key=lambda d: abs(d - wanted))
