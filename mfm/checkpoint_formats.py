"""Released checkpoints as timm state dicts: the authors' ViT and ResNet files, MAE-style and
timm files, and this project's own encoder/classifier files.

Every key of the source is accounted for: it is mapped into the timm model, or dropped under a
named reason (pixel head, decoder, training state); anything else is an error, so a file of
another architecture never loads half-way. The authors' ViT is BEiT-derived: separate q and v
biases (the k bias is zero by construction), optional layer scale ``gamma_1/gamma_2``, optional
relative position bias. timm's ``VisionTransformer`` computes the same function with one qkv
bias (q, zeros, v) and ``ls1/ls2.gamma``; relative position bias has no place in it, so such a
file is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from mfm.errors import UserError

FormatName = Literal["mfm-vit", "mfm-resnet", "mae", "timm", "project"]
FORMATS: tuple[str, ...] = get_args(FormatName)

# Top-level entries of a training checkpoint that are not the model: named and dropped.
TRAINING_STATE = {
    "optimizer": "optimizer state",
    "lr_scheduler": "lr scheduler state",
    "scheduler": "lr scheduler state",
    "scaler": "AMP grad-scaler state",
    "amp": "AMP state",
    "epoch": "training progress",
    "step": "training progress",
    "global_step": "training progress",
    "max_accuracy": "training progress",
    "config": "the source's config (read for num_heads)",
    "args": "the source's command-line arguments",
    "model_ema": "EMA copy (the model weights are used)",
    "info": "the project's classifier info",
    "spec": "the project's architecture spec",
    "pixel_head": "the MFM pixel head",
}
# timm ViT names by width; their depth and heads are what a standard model of that width has.
VIT_BY_WIDTH = {
    192: ("vit_tiny_patch16_224", 12, 3),
    384: ("vit_small_patch16_224", 12, 6),
    768: ("vit_base_patch16_224", 12, 12),
    1024: ("vit_large_patch16_224", 24, 16),
}
RESNET_BY_LAYOUT = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


@dataclass
class Architecture:
    """What the source file's tensors (and config) say the model is, in timm's terms."""

    name: str
    in_chans: int
    num_classes: int = 0  # > 0: a classifier with a trained head
    patch_size: int | None = None
    img_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    global_pool: str | None = None  # 'avg' for mean-pooled ViT classifiers (fc_norm)

    def param_values(self) -> dict[str, Any]:
        """The params.yaml values that build this architecture."""
        values: dict[str, Any] = {"model.name": self.name, "model.kwargs": dict(self.kwargs)}
        if self.patch_size is not None:
            values["model.patch_size"] = self.patch_size
        if self.img_size is not None:
            values["data.img_size"] = self.img_size
        return values


@dataclass
class Converted:
    """A source checkpoint mapped to timm keys, with what was left out and why."""

    format: str
    state_dict: dict[str, torch.Tensor]
    architecture: Architecture | None  # None: not inferable, model.* in params decide
    dropped: dict[str, list[str]] = field(default_factory=dict)
    pixel_head: dict[str, torch.Tensor] | None = None  # the MFM head's 1x1 conv, if shipped
    source_keys: int = 0
    adapted: list[str] = field(default_factory=list)  # tensors reshaped to fit (channels)

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)


def convert(
    blob: Mapping[str, Any], fmt: str | None = None, where: str = "checkpoint"
) -> Converted:
    """Map a loaded checkpoint to a timm state dict; ``fmt`` None detects the format."""
    state, top_dropped, config = _split(blob, where)
    if fmt is None:
        fmt = detect_format(blob, state, config)
    elif fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    converter = {
        "mfm-vit": _convert_mfm_vit,
        "mfm-resnet": _convert_resnet,
        "mae": _convert_timm,
        "timm": _convert_timm,
        "project": _convert_project,
    }[fmt]
    converted = converter(state, config, where)
    converted.format = fmt
    converted.source_keys = len(state)
    for key, reason in top_dropped:
        if fmt != "project":  # the project's spec and info are read, not dropped
            converted.drop(reason, key)
    if fmt == "project":
        converted.architecture = _project_architecture(blob, where)
        converted.pixel_head = blob.get("pixel_head")
    return converted


def detect_format(blob: Mapping[str, Any], state: Mapping[str, Any], config: Mapping) -> str:
    """The format a checkpoint is in, from its keys (and the authors' config when present)."""
    if "spec" in blob and "state_dict" in blob:
        return "project"
    model_type = str(_config_get(config, "MODEL", "TYPE") or "").lower()
    if model_type == "vit" or any(k.endswith("attn.q_bias") for k in state):
        return "mfm-vit"
    if any(k.startswith("encoder.blocks.") for k in state):
        return "mfm-vit"
    if model_type == "resnet" or any(k.startswith("encoder.layer1.") for k in state):
        return "mfm-resnet"
    if "mask_token" in state or any(k.startswith("decoder_") for k in state):
        return "mae"
    return "timm"


# -- reading the container ----------------------------------------------------------------
def _split(
    blob: Mapping[str, Any], where: str
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]], Mapping]:
    """(model state dict, dropped top-level entries with reasons, the source's config)."""
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return _strip_module(dict(blob)), [], {}
    for name in ("model", "state_dict"):
        if isinstance(blob.get(name), Mapping):
            container = name
            break
    else:
        raise UserError(
            f"{where} has no weights: expected a state dict, or one under 'model' or "
            f"'state_dict' (found {', '.join(sorted(map(str, blob))[:6])})"
        )
    dropped, unknown = [], []
    for key in blob:
        if key == container:
            continue
        if key in TRAINING_STATE:
            dropped.append((key, TRAINING_STATE[key]))
        else:
            unknown.append(str(key))
    if unknown:
        raise UserError(
            f"{where}: top-level entries {unknown[:4]} are neither weights nor known training "
            "state; re-save the file with only the model's state_dict under 'model'"
        )
    state = blob[container]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        odd = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise UserError(f"{where}: '{container}' entry {odd!r} is not a tensor")
    config = blob.get("config") if isinstance(blob.get("config"), Mapping) else {}
    return _strip_module(dict(state)), dropped, config


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DistributedDataParallel's ``module.`` prefix when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _config_get(config: Mapping, *path: str) -> Any:
    node: Any = config
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# -- the authors' ViT -----------------------------------------------------------------------
REFUSED_VIT_PARTS = {
    "relative_position_bias_table": "relative position bias",
    "rel_pos_bias.": "shared relative position bias",
}


def _convert_mfm_vit(state: dict[str, torch.Tensor], config: Mapping, where: str) -> Converted:
    out = Converted("mfm-vit", {}, None)
    for key, tensor in state.items():
        for part, what in REFUSED_VIT_PARTS.items():
            if part in key:
                raise UserError(
                    f"{where} uses {what} ({key}): timm's VisionTransformer has none, so no "
                    "model here computes what it computes; the released MFM checkpoints do not "
                    "use it (USE_RPB/USE_SHARED_RPB false)"
                )
        if key.startswith("decoder.0.") and key.count(".") == 2:
            out.pixel_head = out.pixel_head or {}
            out.pixel_head[f"proj.{key.rsplit('.', 1)[1]}"] = tensor
            out.drop("pixel head (MFM pretraining only)", key)
        elif key.startswith("decoder."):
            out.drop("decoder (MFM pretraining only)", key)
        elif key in ("encoder.mask_token", "mask_token"):
            out.drop("mask token (pretraining only)", key)
        elif key.endswith("relative_position_index"):
            out.drop("relative position index (a constant buffer)", key)
        else:
            name = key.removeprefix("encoder.")
            if name.endswith("attn.v_bias"):
                continue  # folded into qkv.bias with the q bias
            if name.endswith("attn.q_bias"):
                block = name[: -len("q_bias")]
                v_bias = state[key[: -len("q_bias")] + "v_bias"]
                out.state_dict[block + "qkv.bias"] = torch.cat(
                    [tensor, torch.zeros_like(tensor), v_bias]
                )
            elif re.search(r"\.gamma_[12]$", name):
                which = name[-1]
                out.state_dict[name[: -len("gamma_1")] + f"ls{which}.gamma"] = tensor
            else:
                out.state_dict[name] = tensor
    out.architecture = _vit_architecture(out.state_dict, config, where)
    return out


def _vit_architecture(
    state: Mapping[str, torch.Tensor], config: Mapping, where: str
) -> Architecture:
    """The timm ViT these tensors fill: width, depth, patch, grid and MLP from the shapes;
    heads from the source's config, else the standard model of that width."""
    for needed in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if needed not in state:
            raise UserError(
                f"{where} has no {needed}: only ViTs with a class token and absolute position "
                "embeddings map onto timm's VisionTransformer"
            )
    width = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    proj = state["patch_embed.proj.weight"]
    patch, in_chans = int(proj.shape[-1]), int(proj.shape[1])
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    mlp_ratio = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / width
    name, std_depth, std_heads = VIT_BY_WIDTH.get(width, ("vit_base_patch16_224", 12, 12))
    heads = _config_get(config, "MODEL", "VIT", "NUM_HEADS") or (
        std_heads if width in VIT_BY_WIDTH else max(1, width // 64)
    )
    kwargs: dict[str, Any] = {}
    if width not in VIT_BY_WIDTH:
        kwargs["embed_dim"] = width
    if depth != std_depth:
        kwargs["depth"] = depth
    if int(heads) != std_heads:
        kwargs["num_heads"] = int(heads)
    if mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = mlp_ratio
    if "blocks.0.attn.qkv.bias" not in state:
        kwargs["qkv_bias"] = False
    if "blocks.0.ls1.gamma" in state:  # any value builds the parameter; the file's is loaded
        kwargs["init_values"] = 0.1
    classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    pool = "avg" if "fc_norm.weight" in state else None
    return Architecture(name, in_chans, classes, patch, grid * patch, kwargs, pool)


# -- ResNets (the authors' and timm's share torchvision's names) ---------------------------
def _convert_resnet(state: dict[str, torch.Tensor], config: Mapping, where: str) -> Converted:
    out = Converted("mfm-resnet", {}, None)
    for key, tensor in state.items():
        if key.startswith("decoder.0.") and key.count(".") == 2:
            out.pixel_head = out.pixel_head or {}
            out.pixel_head[f"proj.{key.rsplit('.', 1)[1]}"] = tensor
            out.drop("pixel head (MFM pretraining only)", key)
        elif key.startswith("decoder."):
            out.drop("decoder (MFM pretraining only)", key)
        else:
            out.state_dict[key.removeprefix("encoder.")] = tensor
    out.architecture = _resnet_architecture(out.state_dict, where)
    return out


def _resnet_architecture(state: Mapping[str, torch.Tensor], where: str) -> Architecture | None:
    """A plain timm ResNet from its block counts and block type; None for other layouts."""
    if "conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
        return None
    layout = tuple(
        1 + max(int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}."))
        for i in range(1, 5)
    )
    name = RESNET_BY_LAYOUT.get((layout, "layer1.0.conv3.weight" in state))
    if name is None:
        return None
    classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
    return Architecture(name, int(state["conv1.weight"].shape[1]), classes)


# -- timm / MAE-style ---------------------------------------------------------------------
def _convert_timm(state: dict[str, torch.Tensor], config: Mapping, where: str) -> Converted:
    out = Converted("timm", {}, None)
    for key, tensor in state.items():
        if key == "mask_token" or key.startswith("decoder"):
            out.drop("MAE decoder and mask token (pretraining only)", key)
        else:
            out.state_dict[key] = tensor
    if "cls_token" in out.state_dict and "blocks.0.attn.qkv.weight" in out.state_dict:
        out.architecture = _vit_architecture(out.state_dict, config, where)
    else:
        out.architecture = _resnet_architecture(out.state_dict, where)
    return out


# -- this project's own files -------------------------------------------------------------
def _convert_project(state: dict[str, torch.Tensor], config: Mapping, where: str) -> Converted:
    return Converted("project", dict(state), None)


def _project_architecture(blob: Mapping[str, Any], where: str) -> Architecture:
    spec = blob["spec"]
    return Architecture(
        name=spec["name"],
        in_chans=int(spec["in_chans"]),
        num_classes=int(spec.get("num_classes") or 0),
        patch_size=spec.get("patch_size"),
        img_size=spec.get("img_size"),
        kwargs=dict(spec.get("kwargs", {})),
        global_pool=spec.get("global_pool"),
    )
