"""UPerNet on the encoder's four-level feature pyramid, and how segmenters are saved and loaded.

The backbone is the pretrained encoder's timm architecture built for the segmentation crop.
Hierarchical backbones (CNNs, Swin) give their last four feature levels. A plain ViT has one
stride, so four evenly spaced blocks are resampled to strides 4, 8, 16 and 32 the way BEiT and
MAE feed UPerNet: transposed convs up, max-pools down, by the factor its patch size needs.
The decoder is segmentation_models_pytorch's ``UPerNetDecoder``, which also layer-norms each
level first, so un-normed ViT tokens and CNN maps reach it on one scale.

Parts of the backbone the pyramid never reads (a ViT's final norm, blocks past the deepest
tapped one, a classifier head) are pruned with timm's own ``prune_intermediate_layers``: every
remaining parameter gets a gradient, as DDP requires, and none of them wastes optimiser state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from timm.layers import resample_abs_pos_embed
from timm.models import group_parameters
from torch import nn

from mfm.config import ModelParams
from mfm.errors import UserError
from mfm.models import _create_backbone, _load_blob, build_encoder, fixed_input_size
from mfm.segment_params import SegmentParams

LEVELS = 4  # UPerNet's pyramid: strides 4, 8, 16, 32
FINEST_STRIDE = 4
BACKBONE = "backbone."
ARCH_KEYS = ("name", "in_chans", "patch_size")  # what must match for encoder weights to load
RUNTIME_KWARGS = ("dynamic_img_size",)  # kwargs that change how inputs are read, not the weights
FIX = "rerun pretrain with the current model params, or set model.* to the checkpoint's"
CHANNELS_FIX = "pretrain on images with as many channels as the segmentation images"


def is_plain_vit(backbone: nn.Module) -> bool:
    """A single-stride transformer with numbered ``blocks`` (ViT, DeiT, BEiT, EVA): its
    pyramid comes from blocks; hierarchical models (CNNs, Swin) have one of their own."""
    strides = {int(info["reduction"]) for info in backbone.feature_info}
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed") and len(strides) == 1


def default_vit_blocks(depth: int) -> list[int]:
    """Four evenly spaced blocks, the last one the deepest (2, 5, 8, 11 for depth 12)."""
    return [max(0, (depth * k) // LEVELS - 1) for k in range(1, LEVELS + 1)]


def _vit_blocks(backbone: nn.Module, name: str, chosen: list[int] | None) -> list[int]:
    depth = len(backbone.blocks)
    blocks = list(chosen) if chosen is not None else default_vit_blocks(depth)
    if any(not 0 <= block < depth for block in blocks):
        raise UserError(
            f"segment.vit_blocks = {blocks} is out of range for {name} with {depth} blocks; "
            f"pick 4 block indices from 0 to {depth - 1}, or null for evenly spaced ones"
        )
    return blocks


def rescale_steps(patch_size: int, level: int) -> int:
    """log2 of the factor taking a ViT's stride ``patch_size`` to stride ``4 * 2**level``,
    rounded (patch 14 gets strides 3.5/7/14/28, as BEiT-style necks give it): > 0 upsamples."""
    return round(math.log2(patch_size / (FINEST_STRIDE * 2**level)))


def rescale_neck(channels: int, steps: int) -> nn.Module:
    """BEiT's neck for one level: 2x transposed convs with BatchNorm + GELU between them to go
    finer, one max-pool to go coarser. ``ceil_mode`` keeps a map of odd size non-empty."""
    if steps == 0:
        return nn.Identity()
    if steps < 0:
        return nn.MaxPool2d(kernel_size=2**-steps, ceil_mode=True)
    layers: list[nn.Module] = [nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)]
    for _ in range(steps - 1):
        layers += [
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        ]
    return nn.Sequential(*layers)


def _pruned_keys(backbone: nn.Module, indices: int | list[int]) -> list[str]:
    """Prune what the pyramid does not read; return the state-dict keys that went with it."""
    before = set(backbone.state_dict())
    backbone.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    return sorted(before - set(backbone.state_dict()))


class SegmentationModel(nn.Module):
    """Backbone -> four-level pyramid -> UPerNet decoder -> per-pixel logits at input size.

    ``backbone`` is the timm model itself, so encoder checkpoints load into it by name;
    ``spec`` is the plain dict that rebuilds the whole model (see ``build_segmenter``).
    """

    def __init__(self, backbone: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        name = spec["encoder"]["name"]
        patched = fixed_input_size(backbone)
        self.size_multiple = int(backbone.patch_embed.patch_size[0]) if patched else 1
        if is_plain_vit(backbone):
            self.blocks: list[int] | None = _vit_blocks(backbone, name, spec["blocks"])
            self._taps = sorted(set(self.blocks))
            self.unused_keys = _pruned_keys(backbone, self._taps)
            channels = [int(backbone.feature_info[-1]["num_chs"])] * LEVELS
            patch = int(backbone.patch_embed.patch_size[0])
            steps = [rescale_steps(patch, level) for level in range(LEVELS)]
            self.necks = nn.ModuleList([rescale_neck(channels[0], s) for s in steps])
        else:
            if len(backbone.feature_info) < LEVELS:
                raise UserError(
                    f"model.name = {name!r} has {len(backbone.feature_info)} feature levels but "
                    f"UPerNet needs {LEVELS}; pick a deeper model (e.g. resnet18, convnext_atto)"
                )
            self.blocks = None
            channels = [int(info["num_chs"]) for info in backbone.feature_info[-LEVELS:]]
            self.unused_keys = _pruned_keys(backbone, LEVELS)
            self.necks = nn.ModuleList([nn.Identity() for _ in range(LEVELS)])
        # smp's decoder takes channels for strides 1, 2, 4, ..., 32 and drops the first two.
        self.decoder = UPerNetDecoder(
            encoder_channels=[0, 0, *channels],
            encoder_depth=LEVELS + 1,
            decoder_channels=spec["channels"],
        )
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(spec["channels"], spec["num_classes"], kernel_size=1)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four NCHW maps the decoder reads, finest first (strides 4/8/16/32 of ``x``)."""
        if self.blocks is None:
            return self.backbone.forward_intermediates(
                x, indices=LEVELS, norm=False, output_fmt="NCHW", intermediates_only=True
            )
        maps = self.backbone.forward_intermediates(
            x, indices=self._taps, norm=False, output_fmt="NCHW", intermediates_only=True
        )
        taken = [maps[self._taps.index(block)] for block in self.blocks]
        return [neck(level) for neck, level in zip(self.necks, taken, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_classes, H, W) logits, for any H and W: a patch model
        sees the image zero-padded (bottom, right) to whole patches, and the padding's logits
        are cut off again, so the patch grid stays aligned with the pixels."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.size_multiple, -width % self.size_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        levels = self.pyramid(x)
        features = self.decoder([x, x, *levels])  # the two stand-ins are skipped unread
        logits = self.classifier(self.dropout(features))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Any:
        """Layer ids for timm's layer-wise lr decay: the backbone's own grouping (stem first,
        deepest block last), then everything new (necks, decoder, classifier) in one final
        group at the full lr. A callable, since prefixing timm's regexes breaks alternations
        like ``^cls_token|pos_embed``."""
        own = getattr(self.backbone, "group_matcher", None)
        layer_of: dict[str, int] = {}
        if own is not None:
            layer_of = group_parameters(self.backbone, own(coarse=coarse), reverse=True)

        def layer_id(name: str) -> float:
            if not name.startswith(BACKBONE):
                return math.inf
            return layer_of.get(name[len(BACKBONE) :], 0)

        return layer_id

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's undecayed parameters (a ViT's pos_embed, cls_token), as in finetune."""
        own = getattr(self.backbone, "no_weight_decay", None)
        return {BACKBONE + name for name in own()} if own is not None else set()


def build_segmenter(
    model: ModelParams, crop_size: int, in_chans: int, num_classes: int, seg: SegmentParams
) -> tuple[SegmentationModel, dict[str, Any]]:
    """A UPerNet segmenter of the encoder's architecture for ``crop_size`` crops, with the spec
    that rebuilds it. ViTs are built with ``dynamic_img_size`` so whole test images of any
    size go through (timm interpolates the position embedding on the fly; Swin builds its
    attention masks per input)."""
    params = model.model_copy(update={"drop_path_rate": seg.drop_path_rate})
    encoder = build_encoder(params, crop_size, in_chans)
    encoder_spec = dict(encoder.spec)
    backbone = encoder.backbone
    if fixed_input_size(backbone):
        dynamic = {**encoder_spec, "kwargs": {**encoder_spec["kwargs"], "dynamic_img_size": True}}
        try:
            backbone, encoder_spec = _create_backbone(dynamic), dynamic
        except UserError as err:  # a model without the option stays at its crop size
            if "dynamic_img_size" not in str(err):
                raise
    spec: dict[str, Any] = {
        "encoder": encoder_spec,
        "num_classes": num_classes,
        "channels": seg.channels,
        "blocks": list(seg.vit_blocks) if seg.vit_blocks is not None else None,
    }
    segmenter = SegmentationModel(backbone, spec)
    spec["blocks"] = segmenter.blocks  # the blocks actually tapped (null for CNNs)
    return segmenter, spec


def segmenter_from_spec(spec: dict[str, Any]) -> SegmentationModel:
    """Rebuild a segmenter (random weights) from the spec stored with it."""
    return SegmentationModel(_create_backbone(spec["encoder"]), spec)


# -- pretrained encoder weights ----------------------------------------------------------
def _check_architecture(path: Path, saved: dict[str, Any], ours: dict[str, Any]) -> None:
    """One line naming the first spec entry that differs between checkpoint and model."""
    theirs_kwargs = {k: v for k, v in saved["kwargs"].items() if k not in RUNTIME_KWARGS}
    our_kwargs = {k: v for k, v in ours["kwargs"].items() if k not in RUNTIME_KWARGS}
    pairs = [(key, saved.get(key), ours.get(key)) for key in ARCH_KEYS]
    pairs.append(("kwargs", theirs_kwargs, our_kwargs))
    for key, theirs, mine in pairs:
        if theirs != mine:
            fix = CHANNELS_FIX if key == "in_chans" else FIX
            raise UserError(
                f"{path} holds another architecture ({saved['name']}): {key} is {theirs!r} "
                f"there but {mine!r} here; {fix}"
            )


def _resampled_pos_embed(backbone: nn.Module, saved: torch.Tensor) -> torch.Tensor:
    """The pretraining grid's position embedding interpolated to the crop grid (prefix tokens
    kept as they are), as timm does when it loads a checkpoint at another image size."""
    prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
    side = math.isqrt(saved.shape[1] - prefix)
    return resample_abs_pos_embed(
        saved,
        new_size=list(backbone.patch_embed.grid_size),
        old_size=[side, side],
        num_prefix_tokens=prefix,
    )


def load_pretrained_encoder(model: SegmentationModel, path: str | Path) -> dict[str, list[str]]:
    """Copy a pretrained ``encoder.pt`` into ``model.backbone``; report what was not loaded.

    A ViT's position embedding is resampled from the pretraining grid to the crop grid. Only
    weights the pyramid does not read (``model.unused_keys``) may be left over; anything
    missing, unexpected or of another shape means the checkpoint is another architecture.
    """
    path = Path(path)
    blob = _load_blob(path, {"spec", "state_dict"}, "encoder", "pretrain")
    saved_spec, state = blob["spec"], dict(blob["state_dict"])
    _check_architecture(path, saved_spec, model.spec["encoder"])
    own = model.backbone.state_dict()
    resampled: list[str] = []
    if (
        "pos_embed" in state
        and "pos_embed" in own
        and state["pos_embed"].shape != own["pos_embed"].shape
    ):
        state["pos_embed"] = _resampled_pos_embed(model.backbone, state["pos_embed"])
        resampled.append("pos_embed")
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(
                f"{path} holds another architecture ({saved_spec['name']}): {key} is "
                f"{tuple(tensor.shape)} there but {tuple(own[key].shape)} here; {FIX}"
            )
    unused = set(model.unused_keys)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    odd = missing + [key for key in unexpected if key not in unused]
    if odd:
        raise UserError(
            f"{path} holds another architecture ({saved_spec['name']}): keys {odd[:3]} do not "
            f"match; {FIX}"
        )
    model.backbone.load_state_dict({k: v for k, v in state.items() if k in own})
    return {"missing": missing, "unexpected": unexpected, "resampled": resampled}


# -- segmenter checkpoints ---------------------------------------------------------------
def save_segmenter(
    model: SegmentationModel, spec: dict[str, Any], info: dict[str, Any], path: str | Path
) -> None:
    """Weights, the spec that rebuilds the model, and what a user of it needs (``info``:
    classes, mean/std, crop size), as plain tensors and dicts."""
    from mfm.io import save_torch

    save_torch({"spec": spec, "state_dict": model.state_dict(), "info": info}, path)


def load_segmenter(path: str | Path) -> tuple[SegmentationModel, dict[str, Any]]:
    """Rebuild a segmenter saved by ``save_segmenter`` (``weights_only=True``) with its info."""
    blob = _load_blob(path, {"spec", "state_dict", "info"}, "segmenter", "segment")
    model = segmenter_from_spec(blob["spec"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError:
        raise UserError(
            f"{path} does not match the segmenter its spec describes; rerun the segment stage"
        ) from None
    return model, blob["info"]
