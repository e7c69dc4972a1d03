"""Encoders from timm, the MFM prediction head, and how encoders are saved and loaded.

Any timm model works as an encoder: features come through timm's own API, so tokens (ViT),
NCHW maps (CNNs) and NHWC maps (Swin) all reach the head as one NCHW map. ViTs keep their
own cls token and position embedding and see the whole (filtered) image: MFM has no mask
tokens (only ``MaskedImageModel``, the spatial-masking baseline's wrapper, has one). Models
that take an ``output_stride`` (dilated CNNs) get a smaller one on small images so their last
feature map stays at least 4x4 instead of collapsing to 1x1. The head is the paper's: a 1x1
conv to ``stride**2 * C`` channels and a PixelShuffle back to image size, no decoder blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mfm.config import ModelParams
from mfm.errors import UserError

MIN_FEATURE_MAP = 4


def fixed_input_size(model: nn.Module) -> bool:
    """Whether ``model`` embeds patches (ViT, Swin, ...): such models are built for one input
    size (position embeddings, windows) and have transformer blocks that layer-wise lr decay
    groups; CNNs take any size."""
    return hasattr(model, "patch_embed")


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``; conv nets on CUDA in channels-last layout, which cuDNN's
    tensor-core kernels read without transposes (CPU runs keep the layout their results
    were computed in)."""
    model = model.to(device)
    if channels_last(model, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``place`` lays ``model`` out channels-last: a conv net (no patch embedding
    anywhere in it) on a CUDA device."""
    return device.type == "cuda" and not any(fixed_input_size(m) for m in model.modules())


def token_pooling(model: nn.Module) -> bool:
    """Whether ``model`` pools a token sequence by a named pool type that ``reset_classifier``
    switches (the ViT family: 'avg' over the patch tokens, 'token' for the class token); CNNs
    and Swin pool their maps their own way."""
    has_tokens = hasattr(model, "num_prefix_tokens")
    return has_tokens and isinstance(getattr(model, "global_pool", None), str)


class Encoder(nn.Module):
    """A timm backbone seen through timm's feature API, whatever layout its features have.

    ``spec`` is a plain dict that rebuilds the same architecture, stored next to the weights
    so a checkpoint loads with ``weights_only=True`` and no pickled objects.
    """

    def __init__(self, backbone: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.is_vit = fixed_input_size(backbone)  # a patch-embedding model (ViT, Swin)
        self.num_features = int(backbone.num_features)
        self.stride = int(backbone.feature_info[-1]["reduction"])

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage, normed as ``forward_features`` returns it, as (B, D, H / stride,
        W / stride): timm drops prefix tokens and folds tokens or NHWC maps into NCHW."""
        return self.backbone.forward_intermediates(
            x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """One (B, D) vector per image: what the model's own head would classify."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


class PixelShuffleHead(nn.Module):
    """1x1 conv to ``stride**2 * out_chans`` channels, then PixelShuffle to full resolution.

    The conv reads a channels-last map: a 1x1 conv is one matmul over channels per position,
    and channels-last is the layout ViT tokens fold into, so the float rounding (and with it
    a ViT's pretraining) does not depend on how the map was produced.
    """

    def __init__(self, in_features: int, stride: int, out_chans: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_features, stride**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(feature_map.contiguous(memory_format=torch.channels_last)))


class MFMModel(nn.Module):
    """Encoder + pixel head: predicts the full image from its frequency-filtered version."""

    def __init__(self, encoder: Encoder, in_chans: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = PixelShuffleHead(encoder.num_features, encoder.stride, in_chans)

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.feature_map(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_encoder(x))


def takes_mask_token(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is built from timm's ViT pieces (patch embedding, position
    embedding, blocks), so a mask token can stand in for a patch's embedding."""
    return isinstance(backbone, VisionTransformer)


def encoder_patch_size(encoder: Encoder) -> int | None:
    """The side of a patch-embedding model's square patches; None for CNNs."""
    if not encoder.is_vit:
        return None
    return int(encoder.backbone.patch_embed.patch_size[0])


class MaskedImageModel(MFMModel):
    """Encoder + pixel head for the SimMIM baseline: hidden patches never reach the encoder.

    A ViT's hidden patches have their embedding replaced by a learnable mask token before the
    position embedding is added (SimMIM); other encoders get the hidden pixels zeroed. The
    token lives here, not in the encoder, so the saved encoder is the plain timm backbone
    that linprobe and finetune load. ``kept`` is the corruption's (B, 1, H, W) mask, 1 where
    the pixel is visible.
    """

    def __init__(self, encoder: Encoder, in_chans: int) -> None:
        super().__init__(encoder, in_chans)
        self.mask_token: nn.Parameter | None = None
        if takes_mask_token(encoder.backbone):
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.backbone.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Read by timm's optimiser factory: the mask token is not decayed (as in SimMIM)."""
        return {"mask_token"} if self.mask_token is not None else set()

    def forward_encoder(self, x: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        if kept is None:
            return self.encoder.feature_map(x)
        if self.mask_token is None:
            return self.encoder.feature_map(x * kept.to(x.dtype))
        return self._token_masked_map(x, kept)

    def forward(self, x: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.forward_encoder(x, kept))

    def _token_masked_map(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_intermediates(indices=1, norm=True)`` map with the hidden patches'
        embeddings swapped for the mask token right after the patch embedding."""
        vit = self.encoder.backbone
        tokens = vit.patch_embed(x)  # (B, N, D), or (B, h, w, D) with dynamic_img_size
        # Masks come aligned to whole patches (checked), so a patch is hidden or it is not.
        hidden = F.max_pool2d(1.0 - kept.float(), vit.patch_embed.patch_size)
        hidden = hidden.to(tokens.dtype).reshape(*tokens.shape[:-1], 1)
        tokens = tokens * (1.0 - hidden) + self.mask_token.to(tokens.dtype) * hidden
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
        tokens = vit.norm(vit.blocks(tokens))[:, vit.num_prefix_tokens :]
        height, width = vit.patch_embed.dynamic_feat_size(x.shape[-2:])
        return tokens.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()


def pretext_model(encoder: Encoder, in_chans: int, pretext: str) -> MFMModel:
    """The pretraining wrapper ``pretext`` needs: the spatial baseline hides patches from the
    encoder itself; every other pretext feeds it the whole corrupted image."""
    if pretext == "mim":
        return MaskedImageModel(encoder, in_chans)
    return MFMModel(encoder, in_chans)


def _create_backbone(spec: dict[str, Any]) -> nn.Module:
    kwargs = dict(spec["kwargs"])
    for key in ("patch_size", "img_size", "output_stride"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    try:
        if spec.get("global_pool") is not None:
            kwargs["global_pool"] = spec["global_pool"]
        return timm.create_model(
            spec["name"],
            pretrained=False,
            num_classes=spec.get("num_classes", 0),
            in_chans=spec["in_chans"],
            drop_path_rate=spec.get("drop_path_rate", 0.0),
            **kwargs,
        )
    except TypeError as err:
        raise UserError(
            f"timm model {spec['name']!r} rejects its arguments ({err}); "
            "check model.patch_size and model.kwargs"
        ) from None


def build_encoder(model: ModelParams, img_size: int, in_chans: int) -> Encoder:
    """Create the encoder for ``img_size`` inputs with ``in_chans`` channels."""
    if not timm.models.is_model(model.name):
        raise UserError(
            f"model.name = {model.name!r} is not a timm model; "
            "pick one from timm.list_models() (e.g. vit_tiny_patch16_224, resnet18)"
        )
    spec: dict[str, Any] = {
        "name": model.name,
        "kwargs": dict(model.kwargs),
        "in_chans": in_chans,
        "drop_path_rate": model.drop_path_rate,
        "patch_size": None,
        "img_size": None,
        "output_stride": None,
    }
    try:  # ViT-style models are built for one input size and patch size
        backbone = _create_backbone({**spec, "img_size": img_size, "patch_size": model.patch_size})
        spec.update(img_size=img_size, patch_size=model.patch_size)
    except UserError as err:  # CNNs are size-agnostic and reject both arguments
        if "img_size" not in str(err) and "patch_size" not in str(err):
            raise
        backbone = _create_backbone(spec)
    return Encoder(_dilate_for_small_images(backbone, spec, img_size), spec)


def _dilate_for_small_images(backbone: nn.Module, spec: dict[str, Any], img_size: int) -> nn.Module:
    """The backbone rebuilt with a smaller ``output_stride`` (recorded in ``spec``) when its last
    map would be under 4x4; models without that argument (ViTs, Swin, ...) stay as they are."""
    stride = int(backbone.feature_info[-1]["reduction"])
    if img_size // stride >= MIN_FEATURE_MAP:
        return backbone
    output_stride = _small_image_stride(img_size, stride)
    try:
        dilated = _create_backbone({**spec, "output_stride": output_stride})
    except UserError as err:
        if "output_stride" not in str(err):
            raise
        return backbone
    spec["output_stride"] = output_stride
    return dilated


def _small_image_stride(img_size: int, stride: int) -> int:
    """Largest power-of-two output stride that keeps a >= 4x4 feature map (at least 8)."""
    out = stride
    while out > 8 and img_size // out < MIN_FEATURE_MAP:
        out //= 2
    return out


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The timm model a stored spec describes (encoder or classifier), freshly initialised."""
    return _create_backbone(spec)


def encoder_from_spec(spec: dict[str, Any]) -> Encoder:
    """Rebuild an encoder from the plain-dict spec stored in a checkpoint."""
    return Encoder(_create_backbone(spec), spec)


def save_encoder(
    encoder: Encoder, path: str | Path, pixel_head: dict[str, torch.Tensor] | None = None
) -> None:
    """Weights plus the spec that rebuilds the architecture, as plain tensors and dicts (and,
    for imported MFM weights, the pixel head they shipped with, for reconstructions)."""
    from mfm.io import save_torch

    blob: dict[str, Any] = {"spec": encoder.spec, "state_dict": encoder.backbone.state_dict()}
    if pixel_head:
        blob["pixel_head"] = pixel_head
    save_torch(blob, path)


def _load_blob(path: str | Path, keys: set[str], what: str, stage: str) -> dict[str, Any]:
    """A checkpoint dict with ``keys``, loaded with ``weights_only=True``, or a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found; run the {stage} stage first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise UserError(
            f"{path} is not a readable {what} ({err.__class__.__name__}); rerun {stage}"
        ) from None
    if not isinstance(blob, dict) or not keys <= set(blob):
        raise UserError(f"{path} holds no {what} ({'/'.join(sorted(keys))}); rerun {stage}")
    return blob


def load_encoder(path: str | Path) -> Encoder:
    """Load an encoder saved by ``save_encoder`` (``weights_only=True``)."""
    blob = _load_blob(path, {"spec", "state_dict"}, "encoder", "pretrain")
    encoder = encoder_from_spec(blob["spec"])
    encoder.backbone.load_state_dict(blob["state_dict"])
    return encoder


# -- classifiers -------------------------------------------------------------------------
HEAD_PREFIXES = ("head.", "fc.", "fc_norm.", "classifier.", "head_drop.")
# With mean pooling, timm ViTs swap the final norm for a fresh fc_norm (the MAE/MFM recipe).
REPLACED_PREFIXES = ("norm.",)


def build_classifier(
    model: ModelParams, img_size: int, in_chans: int, num_classes: int, drop_path_rate: float
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm classifier of the encoder's architecture: mean-pooled features, fresh head.

    Returned as the plain timm model (so timm's layer decay and ONNX export see it as-is),
    with the spec that rebuilds it.
    """
    encoder_spec = build_encoder(model, img_size, in_chans).spec
    spec = {
        **encoder_spec,
        "num_classes": num_classes,
        "global_pool": "avg",
        "drop_path_rate": drop_path_rate,
    }
    return _create_backbone(spec), spec


def load_encoder_weights(classifier: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Copy pretrained encoder weights into ``classifier``; report what did not match.

    Only the head (and, for mean-pooled ViTs, the final norm) may differ: any other missing
    or unexpected key, or a shape mismatch, means the checkpoint is another architecture.
    """
    path = Path(path)
    encoder = load_encoder(path)
    state = encoder.backbone.state_dict()
    own = classifier.state_dict()
    fix = "rerun pretrain with the current model params, or set model.* to the checkpoint's"
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(
                f"{path} holds another architecture ({encoder.spec['name']}): {key} is "
                f"{tuple(tensor.shape)} there but {tuple(own[key].shape)} here; {fix}"
            )
    result = classifier.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(REPLACED_PREFIXES)]
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES)]
    if unexpected or missing:
        odd = (unexpected or missing)[:3]
        raise UserError(
            f"{path} holds another architecture ({encoder.spec['name']}): keys {odd} do not "
            f"match; {fix}"
        )
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def save_classifier(
    classifier: nn.Module, spec: dict[str, Any], info: dict[str, Any], path: str | Path
) -> None:
    """Weights, the spec that rebuilds the model, and what a user of it needs (``info``:
    classes, mean/std, image size), as plain tensors and dicts."""
    from mfm.io import save_torch

    save_torch({"spec": spec, "state_dict": classifier.state_dict(), "info": info}, path)


def load_classifier(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a classifier saved by ``save_classifier``; returns it with its ``info``."""
    blob = _load_blob(path, {"spec", "state_dict", "info"}, "classifier", "finetune")
    model = _create_backbone(blob["spec"])
    model.load_state_dict(blob["state_dict"])
    return model, blob["info"]
