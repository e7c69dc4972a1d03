"""Released weights as this project's encoder and classifier files.

``python -m mfm import FILE`` reads a checkpoint (safely, see ``safe_load``), maps it to timm
keys (``checkpoint_formats``), checks that the architecture it holds is the one params.yaml
builds, and writes ``weights/<name>.encoder.pt`` (or ``.classifier.pt``). ``pretrain.weights``
(or ``finetune.weights``) pointing at that file makes the stage import it instead of training,
with ``weights/`` as the stage's dependency, so a new file reruns what follows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from mfm.checkpoint_formats import Architecture, Converted, convert
from mfm.config import Params
from mfm.errors import UserError
from mfm.models import (
    HEAD_PREFIXES,
    Encoder,
    build_classifier,
    build_encoder,
    model_from_spec,
    save_classifier,
    save_encoder,
)
from mfm.paths import WEIGHTS_DIR
from mfm.safe_load import load_foreign_checkpoint

# What `python -m mfm import --as KIND` writes, and the param that makes a stage use it.
WEIGHTS_KEYS = {
    "pretrain": "pretrain.weights",
    "finetune": "finetune.weights",
    "scratch": "finetune.scratch_weights",
}


@dataclass
class ImportReport:
    """Where imported weights came from and what of the file was used: the stage's metrics."""

    file: str
    format: str
    sha256: str
    source_keys: int
    loaded_tensors: int
    dropped: dict[str, int] = field(default_factory=dict)
    adapted: list[str] = field(default_factory=list)

    def as_metrics(self) -> dict[str, Any]:
        return asdict(self)


def read_weights(path: str | Path, fmt: str | None = None) -> Converted:
    """The checkpoint at ``path`` mapped to timm keys (``fmt`` None: detected)."""
    return convert(load_foreign_checkpoint(path), fmt, str(path))


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- the architecture check ------------------------------------------------------------------
def params_values(params: Params) -> dict[str, Any]:
    """The params.yaml values that decide the architecture, keyed as ``Architecture`` keys them."""
    return {
        "model.name": params.model.name,
        "model.kwargs": dict(params.model.kwargs),
        "model.patch_size": params.model.patch_size,
        "data.img_size": params.data.img_size,
    }


def mismatch(arch: Architecture | None, params: Params) -> dict[str, Any]:
    """The params values to change so that params build ``arch`` ({} when they already do).

    Compared by building both: every tensor's shape and every attention's head count (which
    no shape shows) must agree, whatever the names and kwargs say.
    """
    if arch is None:
        return {}
    wanted = {**_signature(_arch_spec(arch))}
    try:
        have = _signature(build_encoder(params.model, params.data.img_size, arch.in_chans).spec)
    except UserError:
        have = {}
    if wanted == have:
        return {}
    current = params_values(params)
    return {k: v for k, v in arch.param_values().items() if current.get(k) != v}


def _arch_spec(arch: Architecture) -> dict[str, Any]:
    return {
        "name": arch.name,
        "kwargs": dict(arch.kwargs),
        "in_chans": arch.in_chans,
        "patch_size": arch.patch_size,
        "img_size": arch.img_size,
        "output_stride": None,
    }


def _signature(spec: dict[str, Any]) -> dict[str, Any]:
    """Tensor shapes and head counts of the encoder ``spec`` builds (no head, no dilation)."""
    model = model_from_spec({**spec, "output_stride": None, "num_classes": 0})
    shapes: dict[str, Any] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["#heads"] = [m.num_heads for m in model.modules() if hasattr(m, "num_heads")]
    return shapes


def check_architecture(arch: Architecture | None, params: Params, where: str) -> None:
    """A UserError naming the params to set when params.yaml builds another architecture."""
    changes = mismatch(arch, params)
    if changes:
        settings = ", ".join(f"{key}={json.dumps(value)}" for key, value in changes.items())
        raise UserError(
            f"{where} holds {arch.name} ({arch.patch_size and f'patch {arch.patch_size}, '}"
            f"{arch.img_size and f'{arch.img_size} px, '}{arch.in_chans} channels) but "
            f"params.yaml builds another model; set {settings} in params.yaml, or run "
            f"python -m mfm import {where} --write-params"
        )


# -- building the project's models -------------------------------------------------------
def encoder_from(converted: Converted, params: Params, in_chans: int, where: str) -> Encoder:
    """The params' encoder holding the converted weights (a classifier's head left out)."""
    check_architecture(converted.architecture, params, where)
    state = dict(converted.state_dict)
    if "fc_norm.weight" in state and "norm.weight" not in state:
        raise UserError(
            f"{where} is a mean-pooled classifier (fc_norm, no final norm), not an encoder; "
            "import it as finetune.weights, or use the pretraining checkpoint"
        )
    encoder = build_encoder(params.model, params.data.img_size, in_chans)
    own = encoder.backbone.state_dict()
    for key in [k for k in state if k.startswith(HEAD_PREFIXES) and k not in own]:
        converted.drop("classification head (importing the encoder)", key)
        del state[key]
    _load_exactly(encoder.backbone, state, converted, where)
    return encoder


def classifier_from(
    converted: Converted, params: Params, in_chans: int, num_classes: int, where: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The params' classifier (the source's pooling) holding the converted weights."""
    arch = converted.architecture
    if arch is not None and arch.num_classes == 0:
        raise UserError(
            f"{where} holds no classification head (a pretrained encoder); import it as "
            "pretrain.weights and fine-tune, or give a fine-tuned checkpoint"
        )
    if arch is not None and arch.num_classes != num_classes:
        raise UserError(
            f"{where} classifies {arch.num_classes} classes but the prepared data has "
            f"{num_classes}; prepare the data set it was trained on (e.g. ImageNet-1k)"
        )
    check_architecture(arch, params, where)
    _, spec = build_classifier(params.model, params.data.img_size, in_chans, num_classes, 0.0)
    if arch is not None and arch.global_pool:
        spec["global_pool"] = arch.global_pool
    elif "cls_token" in converted.state_dict:  # a ViT classifying its class token
        spec["global_pool"] = "token"
    model = model_from_spec(spec)
    _load_exactly(model, dict(converted.state_dict), converted, where)
    return model, spec


def _load_exactly(
    model: nn.Module, state: dict[str, torch.Tensor], converted: Converted, where: str
) -> None:
    """Load every tensor of ``model`` from ``state`` and use every tensor of ``state``; a
    first conv of another channel count is adapted as timm does for pretrained weights."""
    own = model.state_dict()
    for key, tensor in list(state.items()):
        target = own.get(key)
        if target is not None and _other_channels(tensor, target):
            state[key] = adapt_input_conv(int(target.shape[1]), tensor)
            converted.adapted.append(
                f"{key}: {tensor.shape[1]} -> {target.shape[1]} input channels"
            )
    missing = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unused or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unused:
            parts.append(f"not in the model {unused[:3]}")
        if wrong:
            key = wrong[0]
            parts.append(f"{key} is {tuple(state[key].shape)} there, {tuple(own[key].shape)} here")
        raise UserError(
            f"{where} does not fit {type(model).__name__} built from params.yaml "
            f"({'; '.join(parts)}); set model.* and data.img_size to the checkpoint's "
            "architecture (python -m mfm import FILE --write-params does it for known ones)"
        )
    model.load_state_dict(state, strict=True)


def _other_channels(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    return (
        tensor.ndim == 4
        and target.ndim == 4
        and tensor.shape[0] == target.shape[0]
        and tensor.shape[2:] == target.shape[2:]
        and tensor.shape[1] != target.shape[1]
    )


def report_of(converted: Converted, path: str | Path, loaded: int) -> ImportReport:
    return ImportReport(
        file=str(path),
        format=converted.format,
        sha256=sha256(path),
        source_keys=converted.source_keys,
        loaded_tensors=loaded,
        dropped={reason: len(keys) for reason, keys in converted.dropped.items()},
        adapted=list(converted.adapted),
    )


# -- python -m mfm import -------------------------------------------------------------------
def import_file(
    converted: Converted,
    path: str | Path,
    params: Params,
    in_chans: int | None,
    num_classes: int | None,
    kind: str | None = None,
    out: str | Path | None = None,
) -> tuple[Path, str]:
    """Write the project's file for ``converted`` (read from ``path``); returns (that file, a
    key of ``WEIGHTS_KEYS``). ``in_chans``/``num_classes`` None: the checkpoint's own."""
    path = Path(path)
    arch = converted.architecture
    if kind is None:
        kind = "finetune" if arch is not None and arch.num_classes else "pretrain"
    if kind not in WEIGHTS_KEYS:
        raise UserError(f"--as {kind!r}: choose one of {', '.join(WEIGHTS_KEYS)}")
    channels = in_chans or (arch.in_chans if arch else 3)
    stem = path.name.split(".")[0]
    if kind == "pretrain":
        target = Path(out) if out else WEIGHTS_DIR / f"{stem}.encoder.pt"
        encoder = encoder_from(converted, params, channels, str(path))
        save_encoder(encoder, target, converted.pixel_head)
        return target, kind
    classes = num_classes or (arch.num_classes if arch else 0)
    if not classes:
        raise UserError(f"{path}: prepare the data set it classifies first (python -m mfm prepare)")
    target = Path(out) if out else WEIGHTS_DIR / f"{stem}.classifier.pt"
    model, spec = classifier_from(converted, params, channels, classes, str(path))
    info = {
        "classes": [str(i) for i in range(classes)],
        "img_size": params.data.img_size,
        "channels": channels,
        "imported_from": str(path),
        "format": converted.format,
    }
    save_classifier(model, spec, info, target)
    return target, kind


def describe(converted: Converted, target: Path, kind: str) -> list[str]:
    """What the import used and left out, for the user."""
    arch = converted.architecture
    lines = [
        f"format: {converted.format}; {converted.source_keys} source tensors",
        f"architecture: {json.dumps(arch.param_values()) if arch else 'from params.yaml'}",
    ]
    for reason, keys in converted.dropped.items():
        lines.append(f"dropped ({reason}): {len(keys)} entries, e.g. {keys[0]}")
    lines += [f"adapted: {item}" for item in converted.adapted]
    lines.append(f"wrote {target} ({'encoder' if kind == 'pretrain' else 'classifier'})")
    return lines
