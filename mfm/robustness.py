"""The robustness stage: every fine-tuned classifier on the corrupted test set (and on
ImageNet-C/A/R/Sketch when their roots are given).

One stage scores all classifiers, so each is evaluated once and the pretrained one's
corruption errors are normalised by the scratch classifier's (the AlexNet of a dataset that
has no published baseline). Writes ``metrics/robustness_<init>.json`` and a heatmap each.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from mfm.config import INITS, Params
from mfm.corrupted_set import CorruptedSet, check_crop_size, load_corrupted
from mfm.data.meta import DatasetMeta, load_meta
from mfm.device import resolve_device
from mfm.errors import UserError
from mfm.evaluation import evaluate
from mfm.figures import error_heatmap, text_figure
from mfm.imagenet_benchmarks import evaluate_benchmarks
from mfm.models import load_classifier
from mfm.paths import CORRUPTED_DIR, FINETUNE_DIR, PREPARED_DIR, ROBUSTNESS_DIR
from mfm.robustness_metrics import IMAGENET_C_CORRUPTIONS, robustness_report

log = logging.getLogger("mfm.robustness")

# The CLI writes one metrics file per key of the returned dict: metrics/robustness_<init>.json
METRICS_PER_KEY = True

SeverityErrors = dict[str, dict[int, float]]


def error_rate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    meta: DatasetMeta,
    img_size: int,
    batch_size: int,
    device: torch.device,
) -> float:
    """Top-1 error (a fraction) on uint8 (N, H, W, C) images, preprocessed as at test time."""
    tensors = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # copy: a read-only memmap
    dataset = TensorDataset(tensors, torch.tensor(np.asarray(labels), dtype=torch.int64))
    scores, _, _ = evaluate(model, dataset, meta, img_size, batch_size, device)
    return 1.0 - scores["top1"] / 100.0


def score_classifier(
    model: nn.Module,
    corrupted: CorruptedSet,
    meta: DatasetMeta,
    img_size: int,
    batch_size: int,
    device: torch.device,
    desc: str,
) -> tuple[float, SeverityErrors]:
    """Clean error and the error table (corruption -> severity -> error) of one classifier."""
    clean = error_rate(model, corrupted.clean, corrupted.labels, meta, img_size, batch_size, device)
    errors: SeverityErrors = {}
    sets = list(corrupted.items())
    for name, severity, images in tqdm(sets, desc=desc, unit="set", leave=False, disable=None):
        errors.setdefault(name, {})[severity] = error_rate(
            model, images, corrupted.labels, meta, img_size, batch_size, device
        )
    return clean, errors


def _load(finetune_dir: Path, init: str, meta: DatasetMeta, device: torch.device) -> nn.Module:
    model, info = load_classifier(finetune_dir / init / "classifier.pt")
    if info.get("dataset") != meta.dataset or len(info.get("classes", [])) != meta.num_classes:
        raise UserError(
            f"{finetune_dir / init / 'classifier.pt'} was trained on {info.get('dataset')!r}, "
            f"not the prepared {meta.dataset!r}; rerun finetune (dvc repro)"
        )
    return model.to(device).eval()


def _benchmarks(
    model: nn.Module, params: Params, meta: DatasetMeta, device: torch.device
) -> dict[str, Any]:
    cfg = params.robustness
    paths = {
        "imagenet_c": cfg.imagenet_c,
        "imagenet_a": cfg.imagenet_a,
        "imagenet_r": cfg.imagenet_r,
        "imagenet_sketch": cfg.imagenet_sketch,
    }
    if not any(paths.values()):
        return {}
    if meta.num_classes != 1000:
        raise UserError(
            f"robustness.imagenet_* score ImageNet-1k classifiers, but this one has "
            f"{meta.num_classes} classes ({meta.dataset}); unset them or fine-tune on ImageNet"
        )
    crop = params.data.img_size  # the classifier's input size; timm's 0.875 crop ratio
    return evaluate_benchmarks(
        model,
        paths,
        cfg.batch_size,
        device,
        cfg.severities,
        params.runtime.workers,
        crop=crop,
        resize=round(crop / 0.875),
    )


def run(
    params: Params,
    prepared_dir: str | Path = PREPARED_DIR,
    corrupted_dir: str | Path = CORRUPTED_DIR,
    finetune_dir: str | Path = FINETUNE_DIR,
    out_dir: str | Path = ROBUSTNESS_DIR,
    scratch_dir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every init's classifier; returns {init: report} (one metrics file each).

    ``scratch_dir`` (a finetune folder) supplies the scratch baseline when it lives
    elsewhere, as in the study, where every variant of a seed shares that seed's scratch run.
    """
    device = resolve_device(params.runtime.device)
    meta = load_meta(prepared_dir, params.data.dataset)
    corrupted = load_corrupted(corrupted_dir)
    if meta.kind == "manifest":  # evaluation's crops: device_augment only makes them floats
        check_crop_size(corrupted, params.data.img_size, corrupted_dir)
    names = [n for n in corrupted.info["corruptions"] if n in IMAGENET_C_CORRUPTIONS]
    folders = {init: Path(finetune_dir) for init in INITS}
    if scratch_dir is not None:
        folders["scratch"] = Path(scratch_dir)
    models = {init: _load(folders[init], init, meta, device) for init in INITS}
    reports: dict[str, dict[str, Any]] = {}
    errors: dict[str, SeverityErrors] = {}
    if names:  # a set built without ImageNet-C corruptions has nothing to normalise
        reports, errors = _corrupted_reports(models, corrupted, meta, params, names)
    for init, model in models.items():  # every score before any figure: a failure writes none
        report = reports.setdefault(init, {"init": init, "num_images": 0})
        benchmarks = _benchmarks(model, params, meta, device)
        if benchmarks:
            report["benchmarks"] = benchmarks
    for init, report in reports.items():
        heatmap = Path(out_dir) / init / "heatmap.png"
        if names:
            title = f"{meta.dataset}-C error (%), {init} init: mCE {report['mce']:.1f}"
            error_heatmap(errors[init], heatmap, title)
        else:
            text_figure(
                heatmap,
                f"{meta.dataset}: the corrupted test set holds no ImageNet-C corruption;\n"
                "rerun corrupt (dvc repro corrupt)",
            )
    return reports


def _corrupted_reports(
    models: dict[str, nn.Module],
    corrupted: CorruptedSet,
    meta: DatasetMeta,
    params: Params,
    names: list[str],
) -> tuple[dict[str, dict[str, Any]], dict[str, SeverityErrors]]:
    """Reports (errors, CE, mCE) and error tables per classifier, normalised by the
    baseline's errors."""
    cfg, img_size = params.robustness, params.data.img_size
    device = next(next(iter(models.values())).parameters()).device
    scored = {
        init: score_classifier(
            model, corrupted, meta, img_size, cfg.batch_size, device, f"robustness[{init}]"
        )
        for init, model in models.items()
    }
    base_clean, base_errors = scored[cfg.baseline]
    reports = {}
    for init, (clean, errors) in scored.items():
        report = robustness_report(
            errors, clean, base_errors, base_clean, f"finetune[{cfg.baseline}]", names
        )
        reports[init] = {"init": init, "num_images": corrupted.info["num_images"], **report}
        log.info(
            "robustness[%s]: clean error %.2f%%, mCE %.1f, relative mCE %s",
            init,
            report["clean_error"],
            report["mce"],
            report.get("relative_mce"),
        )
    return reports, {init: errors for init, (_, errors) in scored.items()}
