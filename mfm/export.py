"""The export stage: a fine-tuned classifier as ONNX, checked against torch before it lands.

The graph takes normalised float32 images (N, C, H, W) with a dynamic batch axis (and
dynamic height/width for CNNs; a ViT's position embedding fixes its input size) and returns
logits. Everything a deployer needs besides the graph (image size, channels, mean/std, class
names, how to resize, the params that made it, the package version) is stored in the
model's metadata, which ``python -m mfm predict`` reads. The file is renamed into place only
after ``onnx.checker`` and the onnxruntime parity check on real test images pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mfm
from mfm.config import Params
from mfm.data.augment import device_augment, normalizer
from mfm.data.datasets import EVAL_CROP_RATIO, image_dataset
from mfm.data.meta import DatasetMeta, load_meta
from mfm.errors import UserError
from mfm.io import atomic_path
from mfm.models import fixed_input_size, load_classifier
from mfm.paths import EXPORT_DIR, FINETUNE_DIR, PREPARED_DIR
from mfm.predict import EXPORT_HINT, OnnxClassifier
from mfm.timing import mean_seconds

log = logging.getLogger("mfm.export")

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
LATENCY_BATCHES = (1, 64)
MAX_SIDE = 4096


def dynamic_shapes(model: nn.Module) -> tuple[dict[int, Any]]:
    """Batch is always dynamic; height and width too for models without patch embeddings."""
    from torch.export import Dim

    axes: dict[int, Any] = {0: Dim("batch", min=1, max=1 << 16)}
    if not fixed_input_size(model):
        axes[2] = Dim("height", min=8, max=MAX_SIDE)
        axes[3] = Dim("width", min=8, max=MAX_SIDE)
    return (axes,)  # positional: the one input of forward()


def export_graph(model: nn.Module, example: torch.Tensor, opset: int) -> Any:
    """The ONNX ModelProto of ``model`` (torch.export-based exporter, weights inline)."""
    for chatty in ("onnx_ir", "onnxscript"):  # per-initializer INFO lines
        logging.getLogger(chatty).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):  # the exporter narrates on stdout
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(model),
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    return program.model_proto


def deploy_metadata(info: dict[str, Any], meta: DatasetMeta, params: Params) -> dict[str, str]:
    """The strings ``mfm.predict`` needs (``METADATA_KEYS``) plus provenance."""
    return {
        "input_name": INPUT_NAME,
        "img_size": str(info["img_size"]),
        "channels": str(info["channels"]),
        "mean": json.dumps(info["mean"]),
        "std": json.dumps(info["std"]),
        "classes": json.dumps(info["classes"]),
        # How the pipeline tests images: arrays are resized whole, folders are centre-cropped.
        "resize": "square" if meta.kind == "arrays" else "center_crop",
        "crop_ratio": str(EVAL_CROP_RATIO),
        "dataset": meta.dataset,
        "init": str(info.get("init", "")),
        "params": params.model_dump_json(),
        "mfm_version": mfm.__version__,
        "torch_version": torch.__version__,
    }


def save_onnx(proto: Any, metadata: dict[str, str], path: Path) -> None:
    """Attach the metadata, write one self-contained file and run ``onnx.checker`` on it."""
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name, proto.producer_version = "mfm", mfm.__version__
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def parity_inputs(
    prepared_dir: Path, meta: DatasetMeta, img_size: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` test images preprocessed as at test time, and their labels."""
    dataset = image_dataset(prepared_dir, "test", img_size, train=False)
    count = min(count, len(dataset))
    if count == 0:
        raise UserError(f"{prepared_dir} holds no test images for the parity check; rerun prepare")
    prepare = nn.Sequential(device_augment(meta, img_size, train=False), normalizer(meta))
    pairs = [dataset[i] for i in range(count)]
    images = torch.stack([image for image, _ in pairs])
    with torch.no_grad():
        inputs = torch.cat([prepare(chunk) for chunk in images.split(256)])
    return inputs.float().contiguous(), torch.tensor([label for _, label in pairs])


@torch.no_grad()
def torch_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    return torch.cat([model(chunk) for chunk in inputs.split(batch_size)]).float().numpy()


def onnx_logits(
    classifier: OnnxClassifier, inputs: torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    return np.concatenate([classifier.logits(c.numpy()) for c in inputs.split(batch_size)])


def parity(expected: np.ndarray, actual: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
    """Largest logit difference, top-1 agreement and both accuracies, in percent."""
    truth = labels.numpy()
    return {
        "max_abs_diff": float(np.abs(expected - actual).max()),
        "top1_agreement": float(100 * np.mean(expected.argmax(1) == actual.argmax(1))),
        "torch_top1": float(100 * np.mean(expected.argmax(1) == truth)),
        "onnx_top1": float(100 * np.mean(actual.argmax(1) == truth)),
    }


def latency(
    model: nn.Module, classifier: OnnxClassifier, inputs: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Mean CPU milliseconds per call over ``repeats`` calls, after the warm-up calls that
    absorb allocations and onnxruntime's first-run graph work: torch vs onnxruntime, at
    batch 1 and 64."""
    result = {}
    for batch in LATENCY_BATCHES:
        x = inputs[torch.arange(batch) % len(inputs)].contiguous()
        with torch.inference_mode():
            result[f"torch_b{batch}_ms"] = 1000 * mean_seconds(lambda x=x: model(x), repeats, 1)
        array = x.numpy()
        seconds = mean_seconds(lambda a=array: classifier.logits(a), repeats, 1)
        result[f"onnxruntime_b{batch}_ms"] = 1000 * seconds
    return result


def run(
    params: Params,
    prepared_dir: str | Path = PREPARED_DIR,
    finetune_dir: str | Path = FINETUNE_DIR,
    export_dir: str | Path = EXPORT_DIR,
) -> dict[str, Any]:
    """Export, check, time; returns ``metrics/export.json``. Fails if parity fails."""
    cfg = params.export
    prepared_dir, export_dir = Path(prepared_dir), Path(export_dir)
    meta = load_meta(prepared_dir, params.data.dataset)
    source = Path(finetune_dir) / cfg.init / "classifier.pt"
    if not source.is_file():
        raise UserError(
            f"classifier {source} not found; run the finetune stage first "
            f"(python -m mfm finetune --init {cfg.init}), or set export.init to one that exists"
        )
    model, info = load_classifier(source)
    if info.get("img_size") != params.data.img_size or info.get("dataset") != meta.dataset:
        raise UserError(
            f"{source} was fine-tuned on {info.get('dataset')!r} at {info.get('img_size')} px, "
            f"not {meta.dataset!r} at {params.data.img_size} px; rerun finetune (dvc repro)"
        )
    model = model.float().eval()
    inputs, labels = parity_inputs(prepared_dir, meta, params.data.img_size, cfg.parity_images)
    log.info("export: %s (%s) to ONNX opset %d", source, info.get("init"), cfg.opset)
    proto = export_graph(model, inputs[:2], cfg.opset)
    target = export_dir / ONNX_FILE
    with atomic_path(target) as tmp:
        save_onnx(proto, deploy_metadata(info, meta, params), tmp)
        classifier = OnnxClassifier(tmp)
        check = parity(torch_logits(model, inputs), onnx_logits(classifier, inputs), labels)
        log.info(
            "export: parity on %d images: max |diff| %.2e, top-1 agreement %.2f%%",
            len(inputs),
            check["max_abs_diff"],
            check["top1_agreement"],
        )
        if check["max_abs_diff"] > cfg.atol or check["top1_agreement"] < 100.0:
            raise UserError(
                f"ONNX parity failed: max |logit diff| {check['max_abs_diff']:.2e} "
                f"(export.atol {cfg.atol:g}), top-1 agreement {check['top1_agreement']:.2f}%; "
                f"model.onnx was not written; try another export.opset, or {EXPORT_HINT}"
            )
        timings = latency(model, classifier, inputs, cfg.latency_repeats)
        shape = classifier.session.get_inputs()[0].shape
    return {
        "init": cfg.init,
        "opset": cfg.opset,
        "file_bytes": target.stat().st_size,
        "input_shape": [dim if isinstance(dim, str) else int(dim) for dim in shape],
        "parity_images": len(inputs),
        **check,
        "latency": timings,
    }
