"""An encoder as a timm model folder: ``timm.create_model("local-dir:<folder>", pretrained=True)``.

The folder is what ``timm.models.push_to_hf_hub`` uploads (``config.json``,
``model.safetensors``) plus a model card, so the encoder can be shared without this package.
timm's own ``save_for_hf`` writes weights and config, so the folder follows whatever format
the installed timm reads. Its ``model_args`` rebuild the architecture on load (depth, patch
and image size, input channels, output stride), and the weights then load strictly: a folder
whose config does not match its weights fails to load instead of re-initialising layers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf

from mfm.io import atomic_dir
from mfm.models import Encoder

# Training-time regularisation, not architecture; timm leaves these out of exports too.
DROP_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate")
# The pretrained_cfg fields that describe our weights and how to feed them. timm copies the
# rest (tag, license, paper ids, test sizes) from the ImageNet weights of the architecture,
# which these weights are not.
PRETRAINED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
    "custom_load",
)
# The pretrained_cfg fields the card lists under "input".
INPUT_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "fixed_input_size")
# Card entries used for preprocessing or the title, not listed under "Training".
CARD_META = ("title", "mean", "std", "img_size")


def timm_model_args(spec: dict[str, Any]) -> dict[str, Any]:
    """What ``spec`` passes to ``timm.create_model`` to build the architecture, without the
    drop rates (training settings) and the head (an encoder has none)."""
    args = {k: v for k, v in spec["kwargs"].items() if not _is_drop_arg(k)}
    for key in ("img_size", "patch_size", "output_stride", "global_pool"):
        if spec.get(key) is not None:
            args[key] = spec[key]
    args["in_chans"] = spec["in_chans"]
    return args


def _is_drop_arg(key: str) -> bool:
    return key in DROP_ARGS or key.endswith("_drop_rate")


def _data_config(encoder: Encoder, card: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing for ``pretrained_cfg``: the card's normalisation and, for models that take
    any size (CNNs), the card's training size; fixed-size models report their own size."""
    config: dict[str, Any] = {"interpolation": "bicubic", "crop_pct": 1.0}
    for key in ("mean", "std"):
        if card.get(key) is not None:
            config[key] = tuple(card[key])
    if encoder.spec.get("img_size") is None and card.get("img_size") is not None:
        size = card["img_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        config["input_size"] = (encoder.spec["in_chans"], *size)
    return config


def _own_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``pretrained_cfg`` cut to the fields true of these weights."""
    pretrained = config["pretrained_cfg"]
    pretrained = {k: pretrained[k] for k in PRETRAINED_CFG_KEYS if k in pretrained}
    pretrained["pool_size"] = None  # timm keeps the source's, wrong at other sizes / strides
    return {**config, "pretrained_cfg": pretrained}


def write_timm_folder(encoder: Encoder, out_dir: Path, card: dict[str, Any]) -> None:
    """Write ``encoder``'s backbone as a timm model folder (config, safetensors, README).

    ``card`` holds the model card's facts: optional ``mean``/``std`` (per channel) and
    ``img_size`` (the training size, for models that take any size), an optional ``title``,
    and training facts such as ``pretext``, ``dataset``, ``recipe`` and ``metrics`` (dicts are
    rendered as nested lists). The folder is replaced atomically.
    """
    backbone = encoder.backbone
    if any(not p.is_contiguous() for p in backbone.parameters()):  # channels-last CNNs
        backbone = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    if backbone.num_classes != 0:
        raise ValueError(f"the backbone has a {backbone.num_classes}-class head; expected 0")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_for_hf(
            backbone,
            tmp,
            model_args=timm_model_args(encoder.spec),
            safe_serialization=True,
            data_config=_data_config(encoder, card),
        )
        config_path = tmp / "config.json"
        config = _own_config(json.loads(config_path.read_text()))
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(config, card, out_dir.name))


def model_card(config: dict[str, Any], card: dict[str, Any], folder: str) -> str:
    """The README: architecture and input, how to load and push, and the training facts."""
    arch = config["architecture"]
    pretrained = config["pretrained_cfg"]
    pretext = card.get("pretext")
    title = card.get("title") or f"{arch} encoder" + (f", {pretext} pretraining" if pretext else "")
    lines = [
        f"# {title}",
        "",
        f"A timm `{arch}` backbone without a classifier (`num_classes=0`): the model returns "
        f"pooled features of size {config['num_features']}.",
        "",
        "## Model",
        "",
        f"- architecture: `{arch}`",
        f"- num_features: {config['num_features']}",
        "- model_args:",
        *_markdown_list(config.get("model_args", {}), depth=1),
        "- input:",
        *_markdown_list({k: pretrained[k] for k in INPUT_KEYS if k in pretrained}, depth=1),
        "",
        "## Usage",
        "",
        "```python",
        "import timm",
        "",
        f'model = timm.create_model("local-dir:/path/to/{folder}", pretrained=True)',
        "features = model.forward_features(images)  # unpooled features",
        "pooled = model(images)  # (batch, num_features)",
        "```",
        "",
        "`config.json` holds the `model_args`, so the same architecture is built before the "
        "weights load. Pass `num_classes=N` to `create_model` for a new, untrained classifier "
        "on top.",
        "",
        "To push to the Hugging Face Hub:",
        "",
        "```python",
        'timm.models.push_to_hf_hub(model, "<user>/<repo>")',
        "```",
        "",
        "`push_to_hf_hub` writes `config.json` and the weights from the loaded model; it adds "
        "its own README only if the repo has none.",
    ]
    training = {k: v for k, v in card.items() if k not in CARD_META}
    if training:
        lines += ["", "## Training", ""]
        scalars = {k: v for k, v in training.items() if not isinstance(v, dict)}
        lines += _markdown_list(scalars, depth=0)
        for key, value in training.items():
            if isinstance(value, dict):
                lines += ["", f"### {key.replace('_', ' ').capitalize()}", ""]
                lines += _markdown_list(value, depth=0)
    return "\n".join(lines) + "\n"


def _markdown_list(items: dict[str, Any], depth: int) -> list[str]:
    """``items`` as a Markdown bullet list, dicts nested one level deeper."""
    indent = "  " * depth
    lines = []
    for key, value in items.items():
        if isinstance(value, dict):
            lines.append(f"{indent}- {key}:")
            lines += _markdown_list(value, depth + 1)
        else:
            lines.append(f"{indent}- {key}: {_format(value)}")
    return lines


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return f"`{value}`" if isinstance(value, str) else str(value)
