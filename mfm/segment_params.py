"""The ``segment`` section of params.yaml: the segmentation data, UPerNet and its recipe.

Kept apart from :mod:`mfm.config` (which includes it in ``Params``) so the classification
sections and the dense-transfer section each stay readable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

SegmentDataset = Literal["scenes", "ade20k", "folder"]
EvalMode = Literal["whole", "slide"]
IGNORE_INDEX = 255  # label of pixels no metric or loss counts (ADE20K's "other" after the shift)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _ordered_pair(value: tuple[float, float], what: str) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high:
        raise ValueError(f"{what} must be [low, high] with 0 < low <= high")
    return value


class ScenesParams(_Section):
    """Segmentation scenes built from the prepared classification images (``segment.dataset:
    scenes``): a few objects pasted at random places and scales onto a blank canvas, later
    ones occluding earlier ones; each pixel is labelled with its object's class, background
    with class 0. Train scenes use training images only, test scenes test images only."""

    size: int = Field(64, ge=16, description="Canvas side in pixels.")
    train: int = Field(1600, ge=1, description="Training scenes.")
    test: int = Field(500, ge=1, description="Test scenes.")
    objects: tuple[int, int] = Field((2, 4), description="[min, max] objects per scene.")
    scale: tuple[float, float] = Field(
        (0.6, 1.4), description="[min, max] object side relative to its native size."
    )
    threshold: int = Field(
        32, ge=0, le=254, description="An object's pixels: brighter than this (0-255)."
    )

    @field_validator("objects")
    @classmethod
    def _objects(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError("objects must be [min, max] with 1 <= min <= max")
        return value

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(value, "scale")


class SegmentParams(_Section):
    """UPerNet on the encoder's four-level feature pyramid, trained the same way from the
    pretrained encoder (init=mfm) and from random init (init=scratch)."""

    dataset: SegmentDataset = Field(
        "scenes", description="scenes (built from the prepared images) | ade20k | folder."
    )
    root: str | None = Field(
        None,
        description="ade20k: the ADEChallengeData2016 folder; folder: images/ + masks/ + "
        "classes.txt; scenes: null (data/scenes).",
    )
    crop_size: int = Field(64, ge=16, description="Training crop; the encoder's input size.")
    resize: tuple[int, int] = Field(
        (64, 64), description="Scale-jitter target (h, w) before the crop (mmseg's 512, 2048)."
    )
    scale_range: tuple[float, float] = Field(
        (0.5, 2.0), description="Random factor on the resize target (mmseg's ratio_range)."
    )
    eval_mode: EvalMode = Field("whole", description="whole image | sliding crop windows.")
    eval_short_side: int | None = Field(
        None, ge=16, description="Test images resized to this short side (null = as stored)."
    )
    eval_stride: int | None = Field(
        None, ge=1, description="Sliding-window stride (null = 2/3 of the crop, as mmseg)."
    )
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(1.6e-2, gt=0.0, description="Base lr per 512 images (5e-4 at batch 16).")
    min_lr: float = Field(0.0, ge=0.0)
    warmup_epochs: float = Field(0.5, ge=0.0)
    poly_power: float = Field(1.0, gt=0.0, description="Poly decay exponent after warmup.")
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = Field(
        0.65, gt=0.0, le=1.0, description="Layer-wise lr decay (ViTs); null = off."
    )
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    clip_grad: float | None = Field(None, gt=0.0)
    channels: int = Field(64, ge=8, description="UPerNet width (512 in the paper's recipe).")
    vit_blocks: list[int] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="The 4 ViT blocks (0-based) feeding the pyramid; null = evenly spaced.",
    )
    overlay_images: int = Field(6, ge=1, description="Test images drawn in overlay.png.")
    checkpoint_every: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)
    scenes: ScenesParams = Field(default_factory=ScenesParams)

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(value, "scale_range")

    @field_validator("eval_stride")
    @classmethod
    def _stride_fits_crop(cls, value: int | None, info: ValidationInfo) -> int | None:
        crop = info.data.get("crop_size")
        if value is not None and crop is not None and value > crop:
            raise ValueError(
                f"must not exceed crop_size ({crop}): windows further apart skip pixels"
            )
        return value

    def slide_stride(self) -> int:
        """The sliding-window stride: as set, or 2/3 of the crop (mmseg's 341 for 512)."""
        return self.eval_stride or max(1, (2 * self.crop_size) // 3)
