"""``python -m mfm predict``: classify image files with the exported ONNX model.

This is the deployment path, so it needs onnxruntime, numpy and Pillow only: no torch. The
model file carries everything else (input size, channels, mean/std, class names and how to
resize) in its ONNX metadata, written by the export stage with the keys below.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfm.data.files import IMAGE_EXTENSIONS, is_hidden, is_image_file  # torch-free, like this
from mfm.errors import UserError

# The deployment contract between ``mfm export`` (writer) and this module (reader).
METADATA_KEYS = ("input_name", "img_size", "channels", "mean", "std", "classes", "resize")
RESIZE_MODES = ("square", "center_crop")  # arrays: whole image resized; folders: crop
EXPORT_HINT = "re-export it with `dvc repro export` (or `python -m mfm export`)"


@dataclass(frozen=True)
class Preprocessing:
    """How the classifier's test-time input is made from an image file."""

    input_name: str
    img_size: int
    channels: int
    mean: np.ndarray
    std: np.ndarray
    classes: list[str]
    resize: str
    crop_ratio: float


def _parse_metadata(raw: dict[str, str], path: Path) -> Preprocessing:
    missing = [key for key in METADATA_KEYS if key not in raw]
    if missing:
        raise UserError(f"{path} lacks the metadata key {missing[0]!r}; {EXPORT_HINT}")
    try:
        prep = Preprocessing(
            input_name=raw["input_name"],
            img_size=int(raw["img_size"]),
            channels=int(raw["channels"]),
            mean=np.asarray(json.loads(raw["mean"]), dtype=np.float32),
            std=np.asarray(json.loads(raw["std"]), dtype=np.float32),
            classes=[str(name) for name in json.loads(raw["classes"])],
            resize=raw["resize"],
            crop_ratio=float(raw.get("crop_ratio", "0.875")),
        )
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} has unreadable metadata ({err}); {EXPORT_HINT}") from None
    if prep.resize not in RESIZE_MODES or prep.channels not in (1, 3):
        raise UserError(f"{path} has unknown preprocessing metadata; {EXPORT_HINT}")
    return prep


class OnnxClassifier:
    """An onnxruntime session plus the preprocessing its metadata describes."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX model {path} not found; run the export stage (dvc repro export)")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            raise UserError(
                f"{path} is not a readable ONNX model ({err.__class__.__name__}: {first}); "
                f"{EXPORT_HINT}"
            ) from None
        self.prep = _parse_metadata(self.session.get_modelmeta().custom_metadata_map, path)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits of an already preprocessed float32 (N, C, H, W) batch."""
        return self.session.run(None, {self.prep.input_name: batch})[0]

    def preprocess(self, image: Any) -> np.ndarray:
        """A PIL image -> normalised float32 (C, size, size), as the pipeline tests images."""
        prep, size = self.prep, self.prep.img_size
        image = image.convert("L" if prep.channels == 1 else "RGB")
        if prep.resize == "square":
            pixels = _resize_square(image, size)
        else:
            pixels = np.asarray(_resize_center_crop(image, size, prep.crop_ratio), np.float32)
            pixels = pixels / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return (pixels - prep.mean[:, None, None]) / prep.std[:, None, None]


def _resize_square(image: Any, size: int) -> np.ndarray:
    """The whole image to (size, size[, C]) float32 in [0, 1], as array data sets are tested:
    bicubic with antialiasing on floats, then clamped (``mfm.data.augment.ResizeSquare``).

    Each channel is resized as a float ("F") image: resizing the uint8 image instead rounds
    and clips between Pillow's two passes, which moves sharp edges by up to ~16 grey levels.
    """
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if pixels.shape[:2] == (size, size):
        return pixels
    planes = pixels[..., None] if pixels.ndim == 2 else pixels
    resized = []
    for channel in np.moveaxis(planes, -1, 0):
        plane = Image.fromarray(np.ascontiguousarray(channel))  # mode "F"
        resized.append(np.asarray(plane.resize((size, size), Image.Resampling.BICUBIC)))
    out = np.clip(np.stack(resized, axis=-1), 0.0, 1.0)
    return out[..., 0] if pixels.ndim == 2 else out


def _resize_center_crop(image: Any, size: int, crop_ratio: float) -> Any:
    """Shorter side to ``size / crop_ratio`` (bicubic, on uint8 like the loader's PIL
    transform), then the central ``size`` x ``size``, as image folders are tested."""
    from PIL import Image

    short = int(size / crop_ratio)
    width, height = image.size  # torchvision's Resize(int) rounding
    if width <= height:
        new = (short, int(short * height / width))
    else:
        new = (int(short * width / height), short)
    image = image.resize(new, Image.Resampling.BICUBIC)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, sorted, by the pipeline's rule (hidden entries,
    and whatever lies in hidden folders, are left out)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if is_image_file(path.name)
        and not any(map(is_hidden, path.relative_to(folder).parts))
        and path.is_file()
    )


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under named folders."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += _images_under(item)
        elif item.is_file():
            found.append(item)
        else:
            raise UserError(f"{item} does not exist; name image files or folders of images")
    if not found:
        suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images ({suffixes}) under {', '.join(map(str, inputs))}")
    return found


def _open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(
            f"{path} is not a readable image ({err.__class__.__name__}); "
            "remove it or replace it with a valid image file"
        ) from None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict(
    classifier: OnnxClassifier, paths: Sequence[Path], top_k: int = 5, batch_size: int = 64
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities of each image, in input order."""
    classes = classifier.prep.classes
    k = min(top_k, len(classes))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch = np.stack([classifier.preprocess(_open_image(p)) for p in chunk])
        probs = softmax(classifier.logits(batch.astype(np.float32)))
        for path, row in zip(chunk, probs, strict=True):
            best = np.argsort(-row, kind="stable")[:k]
            top = [
                {"class": classes[i], "index": int(i), "probability": float(row[i])} for i in best
            ]
            rows.append({"path": str(path), "top": top})
    return rows


def _csv_rows(rows: Iterable[dict[str, Any]], k: int) -> Iterable[list[Any]]:
    yield ["path"] + [f"{field}_{i}" for i in range(1, k + 1) for field in ("class", "prob")]
    for row in rows:
        yield [row["path"]] + [
            v for t in row["top"] for v in (t["class"], f"{t['probability']:.6f}")
        ]


def write_predictions(rows: list[dict[str, Any]], output: str | None) -> None:
    """CSV or JSON by the output's suffix; a plain table on stdout without one."""
    k = len(rows[0]["top"]) if rows else 0
    if output is None:
        for row in rows:
            best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
            print(f"{row['path']}\t{best}")
        return
    from mfm.io import atomic_path

    out = Path(output)
    if out.suffix not in (".csv", ".json"):
        raise UserError(f"--output {out} must end in .csv or .json")
    with atomic_path(out) as tmp, tmp.open("w", newline="") as handle:
        if out.suffix == ".json":
            json.dump(rows, handle, indent=2)
        else:
            csv.writer(handle).writerows(_csv_rows(rows, k))
    print(f"wrote {len(rows)} predictions to {out}", file=sys.stderr)


def run(model: str, inputs: Sequence[str], top_k: int, batch_size: int, output: str | None) -> int:
    """The ``predict`` command: find images, classify them, print or write the results."""
    if top_k < 1 or batch_size < 1:
        raise UserError("predict: --top-k and --batch-size must be >= 1")
    classifier = OnnxClassifier(model)
    rows = predict(classifier, find_images(inputs), top_k, batch_size)
    write_predictions(rows, output)
    return len(rows)
