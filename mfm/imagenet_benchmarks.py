"""The released robustness benchmarks (ImageNet-C, -A, -R, -Sketch), scored for any
1000-class ImageNet classifier.

Each benchmark is a folder of ``<wnid>/*`` images; labels are ImageNet-1k indices (the
sorted order of the 1000 wnids that timm ships), so one model head serves all four.
ImageNet-A and -R cover 200 classes each: the 1000 logits are sliced to those classes
(ascending 1k indices) before the argmax, as their authors score them. Images are
preprocessed by timm's ImageNet evaluation transform.
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
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms_factory import transforms_imagenet_eval
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms  # the API timm's transforms are built with
from tqdm import tqdm

from mfm.data.datasets import ImageReadError
from mfm.data.files import is_hidden, is_image_file
from mfm.data.loaders import make_loader
from mfm.errors import UserError
from mfm.evaluation import evaluate_batches
from mfm.robustness_metrics import (
    ALEXNET_CLEAN_ERROR,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_EXTRAS,
    alexnet_baseline_for,
    check_fraction,
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
    """timm's ImageNet evaluation: shorter side to ``resize`` (bilinear), centre ``crop``,
    ImageNet mean/std normalisation.

    ImageNet-C images are already 224 px crops of resized images, so they take
    ``resize=None``: timm's resize step is left out and the crop alone remains.
    """
    # timm resizes to floor(crop / crop_pct); the half pixel keeps float error off the floor.
    crop_pct = 1.0 if resize is None else crop / (resize + 0.5)
    pipeline = transforms_imagenet_eval(
        crop,
        crop_pct=crop_pct,
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    if resize is None:
        kept = [step for step in pipeline.transforms if not isinstance(step, transforms.Resize)]
        pipeline = transforms.Compose(kept)
    return pipeline


def _images(folder: Path) -> list[str]:
    """Sorted image paths directly inside ``folder``."""
    return sorted(
        entry.path for entry in os.scandir(folder) if entry.is_file() and is_image_file(entry.name)
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
        folders = (p for p in self.root.iterdir() if p.is_dir() and not is_hidden(p.name))
        for folder in sorted(folders):
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
        return self.transform(_decode_rgb(path)), label


def _decode_rgb(path: str) -> Image.Image:
    """Open and fully decode one benchmark image; a bad file is named with the fix.

    Pillow's own errors (a truncated JPEG's "image file is truncated") name no file. The
    ``ImageReadError`` survives a DataLoader worker as one line, as in training.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, UnidentifiedImageError):  # its message repeats the path
            reason = "not an image file"
        else:
            reason = " ".join(f"{err.__class__.__name__}: {err}".split())
        raise ImageReadError(
            f"cannot read image {path} ({reason}); remove or replace it (or extract the "
            "benchmark's archive again), then rerun robustness"
        ) from None


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


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's 1000 ImageNet logits; any other head cannot be scored here."""
    logits = model(images)
    if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
        raise UserError(
            f"the robustness benchmarks need a 1000-class ImageNet classifier; the model gives "
            f"outputs of shape {tuple(logits.shape)}"
        )
    return logits


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
    batches = tqdm(loader, desc="score", unit="batch", leave=False, disable=None)
    result = evaluate_batches(lambda x: _logits(model, x), batches, device, 5, class_subset)
    missed1, missed5 = result.count - result.correct1, result.count - result.correctk
    return {
        "top1": result.top1,
        "top1_err": 100.0 * missed1 / result.count,
        "top5": result.topk,
        "top5_err": 100.0 * missed5 / result.count,
        "error": missed1 / result.count,
        "count": result.count,
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
    """The robustness report against AlexNet, mCE over the 15 corruptions present.

    CE is exact for any severities scored (AlexNet's per-severity errors); a held-out
    corruption scored at fewer than all five severities gets a null CE and a note.
    """
    names = [name for name in IMAGENET_C_CORRUPTIONS if name in errors]
    if len(names) < len(IMAGENET_C_CORRUPTIONS):
        log.warning("imagenet_c: mCE over %d of the 15 corruptions only", len(names))
    if not names:
        raise UserError("ImageNet-C copy holds only held-out corruptions; add the 15 mCE ones")
    baseline, notes = alexnet_baseline_for(errors)
    for name, note in notes.items():
        log.warning("imagenet_c %s: no CE; %s", name, note)
    return robustness_report(
        errors, clean_error, baseline, ALEXNET_CLEAN_ERROR, "alexnet", names, notes
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
    if clean_error is not None:  # checked first: scoring can take hours
        check_fraction(clean_error, "clean_error")
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
