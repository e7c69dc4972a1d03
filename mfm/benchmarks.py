"""The released robustness benchmarks (ImageNet-C, -A, -R, -Sketch), scored for any
1000-class ImageNet classifier.

Each benchmark is a folder of ``<wnid>/*`` images; labels are ImageNet-1k indices (the
sorted order of the 1000 wnids that timm ships), so one model head serves all four.
ImageNet-A and -R cover 200 classes each: the 1000 logits are sliced to those classes
(ascending 1k indices) before the argmax, as their authors score them.
"""

from __future__ import annotations

import logging
import os
import pkgutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from mfm.data import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, make_loader
from mfm.errors import UserError
from mfm.robustness_metrics import (
    ALEXNET_CLEAN_ERROR,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_EXTRAS,
    alexnet_baseline,
    robustness_report,
)

log = logging.getLogger("mfm")

NUM_CLASSES = 1000
BENCHMARKS = ("imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch")
C_GROUPS = ("noise", "blur", "weather", "digital", "extra")
C_LAYOUT = "<root>/[<group>/]<corruption>/<severity 1-5>/<wnid>/*.JPEG"
_KNOWN_CORRUPTIONS = IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRAS


# --------------------------------------------------------------------------- class lists


def _timm_lines(name: str) -> list[str]:
    """Lines of a class list timm ships in ``timm/data/_info``."""
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    if data is None:
        raise UserError(f"timm lacks _info/{name}; reinstall timm (>=1.0.9)")
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted), from timm."""
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != NUM_CLASSES or list(wnids) != sorted(wnids):
        raise UserError("timm's imagenet_synsets.txt is not 1000 sorted wnids; reinstall timm")
    return wnids


@cache
def imagenet_index() -> dict[str, int]:
    """wnid -> ImageNet-1k class index."""
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


@cache
def class_subset(benchmark: str) -> tuple[int, ...]:
    """Ascending 1k indices of ImageNet-A's or -R's 200 classes (``"a"`` or ``"r"``).

    timm's index list is cross-checked against its wnid list, so a mismatch between the two
    files cannot silently shift every label.
    """
    synsets = _timm_lines(f"imagenet_{benchmark}_synsets.txt")
    indices = [int(line) for line in _timm_lines(f"imagenet_{benchmark}_indices.txt")]
    index = imagenet_index()
    if [index.get(wnid) for wnid in synsets] != indices or indices != sorted(indices):
        raise UserError(f"timm's imagenet_{benchmark} synset and index lists disagree; reinstall")
    return tuple(indices)


# --------------------------------------------------------------------------- data


def benchmark_transform(crop: int = 224, resize: int | None = 256) -> Callable[[Image.Image], Any]:
    """Evaluation preprocessing: optional Resize, CenterCrop, ImageNet normalisation.

    ImageNet-C images are already 224 px crops, so they take ``resize=None``.
    """
    steps: list[Any] = [transforms.Resize(resize)] if resize else []
    steps += [
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return transforms.Compose(steps)


def _images(folder: Path) -> list[str]:
    """Sorted image paths directly inside ``folder``."""
    return sorted(
        entry.path
        for entry in os.scandir(folder)
        if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
    )


def _check_wnid(folder: Path, allowed: set[str] | None) -> int:
    """The 1k index of a class folder; a folder outside the label set is a mistake."""
    index = imagenet_index().get(folder.name)
    if index is None:
        raise UserError(
            f"{folder} is not an ImageNet-1k wnid folder; remove it or point to the "
            "benchmark's root (<root>/<wnid>/*)"
        )
    if allowed is not None and folder.name not in allowed:
        raise UserError(
            f"{folder}: {folder.name} is not one of this benchmark's 200 classes; remove it "
            "or check that the root is the right benchmark"
        )
    return index


class WnidFolder(Dataset):
    """Images under ``<root>/<wnid>/*`` labelled with their ImageNet-1k class index."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any],
        allowed_wnids: Iterable[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        allowed = None if allowed_wnids is None else set(allowed_wnids)
        self.samples: list[tuple[str, int]] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            label = _check_wnid(folder, allowed)
            self.samples += [(path, label) for path in _images(folder)]
        if not self.samples:
            raise UserError(
                f"{self.root} holds no images in <wnid>/ folders; point to the benchmark's root"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int) -> tuple[Any, int]:
        path, label = self.samples[item]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def _severity_folders(corruption_dir: Path) -> list[tuple[str, int, Path]]:
    """(corruption, severity, folder) for the ``1``..``5`` folders of one corruption."""
    return [
        (corruption_dir.name, int(entry.name), entry)
        for entry in sorted(corruption_dir.iterdir())
        if entry.is_dir() and entry.name in {"1", "2", "3", "4", "5"}
    ]


def _corruption_dirs(root: Path) -> list[Path]:
    """Corruption folders at the top level or one group level down; others are ignored."""
    found: list[Path] = []
    for entry in sorted(p for p in root.iterdir() if p.is_dir()):
        if entry.name in _KNOWN_CORRUPTIONS:
            found.append(entry)
        elif entry.name in C_GROUPS:
            found += [p for p in sorted(entry.iterdir()) if p.name in _KNOWN_CORRUPTIONS]
    return [p for p in found if p.is_dir()]


def imagenet_c_sets(root: str | Path) -> list[tuple[str, int, Path]]:
    """(corruption, severity, folder) of an ImageNet-C copy, in mCE order then severity."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ImageNet-C root {root} is not a folder; expected {C_LAYOUT}")
    dirs = _corruption_dirs(root)
    names = [p.name for p in dirs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(
            f"{root} holds {', '.join(twice)} both with and without a group folder; keep one"
        )
    sets = [item for corruption_dir in dirs for item in _severity_folders(corruption_dir)]
    if not sets:
        raise UserError(f"no ImageNet-C corruption folders under {root}; expected {C_LAYOUT}")
    return sorted(sets, key=lambda item: (_KNOWN_CORRUPTIONS.index(item[0]), item[1]))


# --------------------------------------------------------------------------- scoring


def _subset_targets(labels: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """1k labels mapped to their positions in ``subset`` (the sliced logits' columns)."""
    lookup = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    lookup[subset] = torch.arange(len(subset))
    targets = lookup[labels]
    if (targets < 0).any():
        raise UserError("an image's class is outside the benchmark's class subset; check the root")
    return targets


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's 1000 ImageNet logits; any other head cannot be scored here."""
    logits = model(images)
    if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
        raise UserError(
            f"the robustness benchmarks need a 1000-class ImageNet classifier; the model gives "
            f"outputs of shape {tuple(logits.shape)}"
        )
    return logits


@torch.inference_mode()
def score(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    class_subset: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 (%) and the top-1 error (fraction) of ``model`` on ``loader``.

    With ``class_subset`` (ascending 1k indices), only those logits compete, as ImageNet-A
    and -R prescribe.
    """
    model.eval()
    columns = None if class_subset is None else torch.as_tensor(list(class_subset))
    correct1 = correct5 = count = 0
    for images, labels in tqdm(loader, desc="score", unit="batch", leave=False, disable=None):
        logits = _logits(model, images.to(device)).float().cpu()
        targets = labels.long()
        if columns is not None:
            logits = logits[:, columns]
            targets = _subset_targets(targets, columns)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        count += len(targets)
    if count == 0:
        raise UserError("the benchmark loader yielded no images; check the benchmark root")
    return {
        "top1": 100.0 * correct1 / count,
        "top1_err": 100.0 * (count - correct1) / count,
        "top5": 100.0 * correct5 / count,
        "top5_err": 100.0 * (count - correct5) / count,
        "error": (count - correct1) / count,
        "count": count,
    }


def _existing_root(name: str, root: str | Path) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"{name} root {path} is not a folder; fix robustness.{name} or set it null")
    return path


def _evaluate_imagenet_c(
    model: nn.Module,
    root: Path,
    severities: Sequence[int],
    loader_for: Callable[[Dataset], DataLoader],
    device: torch.device | str,
    crop: int,
) -> dict[str, dict[int, float]]:
    """Top-1 error (fraction) per corruption and severity of an ImageNet-C copy."""
    wanted = set(severities)
    sets = [item for item in imagenet_c_sets(root) if item[1] in wanted]
    if not sets:
        raise UserError(
            f"{root} holds none of severities {list(severities)}; fix robustness.severities"
        )
    transform = benchmark_transform(crop, resize=None)
    errors: dict[str, dict[int, float]] = {}
    for corruption, severity, folder in sets:
        result = score(model, loader_for(WnidFolder(folder, transform)), device)
        errors.setdefault(corruption, {})[severity] = result["error"]
        log.info("imagenet_c %s/%d: top-1 error %.2f%%", corruption, severity, result["top1_err"])
    return errors


def _imagenet_c_report(
    errors: Mapping[str, Mapping[int, float]], clean_error: float | None
) -> dict[str, Any]:
    """The robustness report against AlexNet, mCE over the 15 corruptions present."""
    names = [name for name in IMAGENET_C_CORRUPTIONS if name in errors]
    if len(names) < len(IMAGENET_C_CORRUPTIONS):
        log.warning("imagenet_c: mCE over %d of the 15 corruptions only", len(names))
    if not names:
        raise UserError("ImageNet-C copy holds only held-out corruptions; add the 15 mCE ones")
    severities = sorted({s for by_severity in errors.values() for s in by_severity})
    return robustness_report(
        errors,
        clean_error,
        alexnet_baseline(severities),
        ALEXNET_CLEAN_ERROR,
        "alexnet",
        names,
    )


def evaluate_benchmarks(
    model: nn.Module,
    paths: Mapping[str, str | Path | None],
    batch_size: int,
    device: torch.device | str,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    workers: int = 0,
    crop: int = 224,
    resize: int = 256,
    clean_error: float | None = None,
) -> dict[str, Any]:
    """Score ``model`` on every benchmark whose root is given (``None`` skips it).

    ImageNet-C gives a robustness report against AlexNet (relative mCE only with the model's
    clean ImageNet ``clean_error``, a fraction); A, R and Sketch give top-1/top-5.
    """
    unknown = sorted(set(paths) - set(BENCHMARKS))
    if unknown:
        raise UserError(f"unknown benchmark(s) {', '.join(unknown)}; use {', '.join(BENCHMARKS)}")
    roots = {name: _existing_root(name, root) for name, root in paths.items() if root}
    model = model.to(device)

    def loader_for(dataset: Dataset) -> DataLoader:
        return make_loader(dataset, batch_size, False, 0, workers, drop_last=False)

    results: dict[str, Any] = {}
    if "imagenet_c" in roots:
        errors = _evaluate_imagenet_c(
            model, roots["imagenet_c"], severities, loader_for, device, crop
        )
        results["imagenet_c"] = _imagenet_c_report(errors, clean_error)
    transform = benchmark_transform(crop, resize)
    for name, subset in (("imagenet_a", "a"), ("imagenet_r", "r"), ("imagenet_sketch", None)):
        if name not in roots:
            continue
        indices = class_subset(subset) if subset else None
        wnids = [imagenet_wnids()[i] for i in indices] if indices else None
        dataset = WnidFolder(roots[name], transform, wnids)
        results[name] = score(model, loader_for(dataset), device, indices)
        log.info("%s: top-1 %.2f%%", name, results[name]["top1"])
    return results
