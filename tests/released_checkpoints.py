"""Checkpoints in the released formats, with the real key names and shapes, built on the spot.

The authors' files (SimMIM/BEiT lineage) are a dict with ``model``, the training state and a
pickled yacs ``CfgNode``; their ViT keeps separate q and v biases, optional layer scale
``gamma_1/gamma_2``, and either the ``encoder.`` prefix with a pixel head ``decoder.0``
(pretraining) or ``fc_norm`` + ``head`` (fine-tuned). ``authors_vit_forward`` computes what
their model computes, written from the tensors alone, as the reference an import must match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from yacs.config import CfgNode


def authors_config(model_type: str, heads: int | None = None) -> CfgNode:
    """The parts of their yacs config an importer may read, frozen as their scripts leave it."""
    config = CfgNode()
    config.MODEL = CfgNode()
    config.MODEL.TYPE = model_type
    config.MODEL.VIT = CfgNode()
    config.MODEL.VIT.NUM_HEADS = heads or 12
    config.MODEL.VIT.USE_RPB = False
    config.DATA = CfgNode()
    config.DATA.IMG_SIZE = 224
    config.TRAIN = CfgNode()
    config.TRAIN.OPTIMIZER = CfgNode()
    config.TRAIN.OPTIMIZER.BETAS = (0.9, 0.95)
    config.freeze()
    return config


def training_state(model: dict[str, torch.Tensor], config: CfgNode) -> dict[str, Any]:
    """A checkpoint as their ``save_checkpoint`` writes one."""
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "lr_scheduler": {"t_initial": 300},
        "max_accuracy": 0.0,
        "epoch": 299,
        "config": config,
    }


def random_vit(
    width: int,
    depth: int,
    heads: int,
    patch: int,
    img: int,
    chans: int,
    layer_scale: bool,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A timm ViT's tensors, all randomised (so defaults cannot pass for loaded weights)."""
    kwargs = {"init_values": 0.5} if layer_scale else {}
    model = timm.create_model(
        "vit_base_patch16_224",
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        img_size=img,
        in_chans=chans,
        num_classes=0,
        **kwargs,
    )
    generator = torch.Generator().manual_seed(seed)
    return {
        key: 0.5 * torch.randn(value.shape, generator=generator) + (1.0 if "norm" in key else 0.0)
        for key, value in model.state_dict().items()
    }


def as_authors_vit(
    timm_state: dict[str, torch.Tensor], pretrain: bool, classes: int = 0
) -> dict[str, torch.Tensor]:
    """timm ViT tensors under their names: q/v bias (the k part of timm's bias is dropped, as
    their model has none), gamma_1/2, and the pretraining or fine-tuned extras."""
    out: dict[str, torch.Tensor] = {}
    for key, value in timm_state.items():
        if key.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")] = q_bias
            out[key.replace("qkv.bias", "v_bias")] = v_bias
        elif key.endswith("ls1.gamma") or key.endswith("ls2.gamma"):
            out[key.replace(f"ls{key[-7]}.gamma", f"gamma_{key[-7]}")] = value
        else:
            out[key] = value
    width = timm_state["cls_token"].shape[-1]
    generator = torch.Generator().manual_seed(1)
    if pretrain:
        out = {f"encoder.{key}": value for key, value in out.items()}
        patch = timm_state["patch_embed.proj.weight"].shape[-1]
        chans = timm_state["patch_embed.proj.weight"].shape[1]
        out["decoder.0.weight"] = torch.randn(patch**2 * chans, width, 1, 1, generator=generator)
        out["decoder.0.bias"] = torch.randn(patch**2 * chans, generator=generator)
    else:  # mean pooling: no final norm, fc_norm and a head instead
        out.pop("norm.weight")
        out.pop("norm.bias")
        out["fc_norm.weight"] = 1 + 0.1 * torch.randn(width, generator=generator)
        out["fc_norm.bias"] = 0.1 * torch.randn(width, generator=generator)
        out["head.weight"] = torch.randn(classes, width, generator=generator)
        out["head.bias"] = torch.randn(classes, generator=generator)
    return out


def authors_vit_forward(
    state: dict[str, torch.Tensor], x: torch.Tensor, heads: int
) -> torch.Tensor:
    """Their ViT on ``x`` from the tensors alone: the normed tokens (pretraining encoder), or
    the logits of mean-pooled tokens through fc_norm and head (fine-tuned)."""
    s = {key.removeprefix("encoder."): value for key, value in state.items()}
    proj = s["patch_embed.proj.weight"]
    tokens = F.conv2d(x, proj, s["patch_embed.proj.bias"], stride=proj.shape[-1])
    tokens = tokens.flatten(2).transpose(1, 2)
    batch, _, width = tokens.shape
    tokens = torch.cat([s["cls_token"].expand(batch, -1, -1), tokens], dim=1) + s["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(tokens, (width,), s[b + "norm1.weight"], s[b + "norm1.bias"], 1e-6)
        bias = torch.cat(
            [s[b + "attn.q_bias"], torch.zeros_like(s[b + "attn.v_bias"]), s[b + "attn.v_bias"]]
        )
        qkv = F.linear(h, s[b + "attn.qkv.weight"], bias)
        qkv = qkv.reshape(batch, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, -1, width)
        out = F.linear(out, s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        tokens = tokens + s.get(b + "gamma_1", 1.0) * out
        h = F.layer_norm(tokens, (width,), s[b + "norm2.weight"], s[b + "norm2.bias"], 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])),
            s[b + "mlp.fc2.weight"],
            s[b + "mlp.fc2.bias"],
        )
        tokens = tokens + s.get(b + "gamma_2", 1.0) * h
    if "head.weight" not in s:
        return F.layer_norm(tokens, (width,), s["norm.weight"], s["norm.bias"], 1e-6)
    pooled = F.layer_norm(
        tokens[:, 1:].mean(1), (width,), s["fc_norm.weight"], s["fc_norm.bias"], 1e-6
    )
    return F.linear(pooled, s["head.weight"], s["head.bias"])


def save_authors_vit(
    path: Path,
    *,
    width: int = 48,
    depth: int = 2,
    heads: int = 2,
    patch: int = 4,
    img: int = 16,
    chans: int = 3,
    layer_scale: bool = False,
    pretrain: bool = True,
    classes: int = 0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write an authors'-format ViT checkpoint; returns its ``model`` tensors."""
    state = as_authors_vit(
        random_vit(width, depth, heads, patch, img, chans, layer_scale, seed), pretrain, classes
    )
    torch.save(training_state(state, authors_config("vit", heads)), path)
    return state


def save_authors_resnet(
    path: Path, name: str = "resnet18", chans: int = 3
) -> dict[str, torch.Tensor]:
    """An authors'-format ResNet pretraining checkpoint: timm (torchvision) names under
    ``encoder.``, the 1x1-conv pixel head for stride 32 under ``decoder.0``."""
    model = timm.create_model(name, num_classes=0, in_chans=chans)
    generator = torch.Generator().manual_seed(2)
    state = {
        f"encoder.{key}": (
            value
            if value.dtype == torch.long
            else 0.1 * torch.randn(value.shape, generator=generator) + 1.0
        )
        for key, value in model.state_dict().items()
    }
    state["decoder.0.weight"] = torch.randn(32**2 * chans, model.num_features, 1, 1)
    state["decoder.0.bias"] = torch.randn(32**2 * chans)
    torch.save(training_state(state, authors_config("resnet")), path)
    return state
