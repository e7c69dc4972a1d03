"""Joint image + mask augmentation for segmentation training (mmseg's ADE20K recipe).

torchvision's v2 transforms act on a ``tv_tensors.Image`` and a ``tv_tensors.Mask`` together:
one draw of the random parameters moves both, images are resized bilinearly and masks with
nearest neighbour, so a label never blends two classes. Every draw comes from torch's global
generator, which :class:`mfm.data.loaders.PerSampleSeeded` seeds per sample, so a sample's
crop depends on (seed, epoch, index) only.
"""

from __future__ import annotations

from torchvision import tv_tensors
from torchvision.transforms import v2

from mfm.segment_params import IGNORE_INDEX, SegmentParams


def train_transform(cfg: SegmentParams) -> v2.Transform:
    """Scale jitter, a ``crop_size`` square crop and a horizontal flip.

    * ``ScaleJitter``: resize (keeping the aspect ratio) to fit ``cfg.resize`` times a factor
      drawn from ``cfg.scale_range``, as mmseg's ``RandomResize(keep_ratio=True)``. Its
      ``target_size`` is (width, height) while ``cfg.resize`` is (h, w), hence the swap;
      unlike mmseg, which bounds the long and the short side, it bounds height and width,
      so a portrait image gets a smaller scale than a landscape one;
    * ``RandomCrop``: pads an image smaller than the crop (image with 0, mask with the ignore
      index, so padding never counts as a class), so the output is always exactly
      ``crop_size`` square and batches stack;
    * ``RandomHorizontalFlip``.
    """
    height, width = cfg.resize
    return v2.Compose(
        [
            v2.ScaleJitter(target_size=(width, height), scale_range=tuple(cfg.scale_range)),
            v2.RandomCrop(
                cfg.crop_size,
                pad_if_needed=True,
                fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX},
            ),
            v2.RandomHorizontalFlip(),
        ]
    )
