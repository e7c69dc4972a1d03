"""PNG figures people look at; each written atomically like every other output."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mfm.io import atomic_path  # noqa: E402


def log_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Centred log-magnitude spectrum of the channel mean, (B, H, W), for display."""
    grey = images.float().mean(dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(grey), dim=(-2, -1))
    return torch.log1p(spectrum.abs())


def _as_image(tensor: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """(C, H, W) in [0, 1] to something imshow takes, with a grey colour map for 1 channel."""
    tensor = tensor.detach().float().clamp(0, 1).cpu()
    if tensor.shape[0] == 1:
        return tensor[0], "gray"
    return tensor.permute(1, 2, 0), None


def reconstruction_figure(
    images: torch.Tensor,
    masks: torch.Tensor,
    corrupted: torch.Tensor,
    predictions: torch.Tensor | None,
    path: str | Path,
    title: str,
    mask_title: str = "kept frequencies",
) -> None:
    """One row per image: image, its spectrum, the mask (kept frequencies, or kept pixels for
    the spatial baseline), input, prediction.

    ``predictions`` should be the model's missing bins (or pixels) completed with the kept
    ones, since the loss never scores what the input already has. None (imported weights
    without a pixel head) leaves the last column out.
    """
    columns = ["image", "log spectrum", mask_title, "corrupted input", "reconstruction"]
    if predictions is None:
        columns = columns[:-1]
    spectra = log_spectrum(images).cpu()
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows))
    axes = axes.reshape(rows, len(columns))
    for row in range(rows):
        panels = [
            _as_image(images[row]),
            (spectra[row], "magma"),
            (masks[row].float().cpu().reshape(masks.shape[-2:]), "gray"),
            _as_image(corrupted[row]),
        ]
        if predictions is not None:
            panels.append(_as_image(predictions[row]))
        for col, (data, cmap) in enumerate(panels):
            axis = axes[row, col]
            axis.imshow(data.numpy(), cmap=cmap, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[col], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def class_palette(count: int) -> np.ndarray:
    """(count + 1, 3) colours in [0, 1]: distinct ones per class, black last (the ignore
    index is mapped there)."""
    base = plt.get_cmap("tab20" if count <= 20 else "hsv", max(count, 1))
    colours = np.array([base(i)[:3] for i in range(count)])
    return np.vstack([colours, np.zeros((1, 3))])


def _label_overlay(image: torch.Tensor, labels: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Labels painted over the image at 60 % opacity (ignored pixels stay black)."""
    picture = image.detach().float().cpu() / 255
    rgb = picture.expand(3, -1, -1) if picture.shape[0] == 1 else picture
    index = labels.detach().cpu().long().clamp(max=len(palette) - 1).numpy()
    return 0.4 * rgb.permute(1, 2, 0).numpy() + 0.6 * palette[index]


def segmentation_overlay(
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    classes: list[str],
    path: str | Path,
    title: str,
) -> None:
    """One row per test image: the image, ground truth and prediction overlaid on it (same
    colour per class), and the image's pixel accuracy; ``samples`` holds uint8 (C, H, W)
    images with their (H, W) label and prediction maps."""
    if not samples:
        text_figure(path, f"{title}: no test images to show")
        return
    palette = class_palette(len(classes))
    rows = len(samples)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.4 * rows + 0.8))
    axes = axes.reshape(rows, 3)
    for row, (image, mask, pred) in enumerate(samples):
        labelled = mask < len(classes)
        accuracy = 100.0 * float((pred[labelled] == mask[labelled]).float().mean())
        panels = [
            _as_image(image.float() / 255),
            (_label_overlay(image, mask, palette), None),
            (_label_overlay(image, pred, palette), None),
        ]
        names = ["image", "ground truth", f"prediction ({accuracy:.0f} % px)"]
        for col, (data, cmap) in enumerate(panels):
            axis = axes[row, col]
            shown = data.numpy() if isinstance(data, torch.Tensor) else data
            axis.imshow(shown, cmap=cmap, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(names[col], fontsize=8)
    present = sorted({int(v) for _, mask, _ in samples for v in mask.unique() if v < len(classes)})
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i]) for i in present]
    fig.legend(handles, [classes[i] for i in present], loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, path)


def text_figure(path: str | Path, text: str) -> None:
    """A small PNG that says why a figure is missing, so a declared output always exists."""
    fig, axis = plt.subplots(figsize=(6, 1.6))
    axis.axis("off")
    axis.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True)
    save_figure(fig, path)


def error_heatmap(errors: Mapping[str, Mapping[int, float]], path: str | Path, title: str) -> None:
    """PNG of error % per corruption (rows) and severity (columns), so weak spots stand out;
    ``errors[corruption][severity]`` are fractions, as ``mfm.robustness_metrics`` takes them."""
    names = list(errors)
    severities = sorted({s for by_severity in errors.values() for s in by_severity})
    table = np.full((len(names), len(severities)), np.nan)
    for row, name in enumerate(names):
        for col, severity in enumerate(severities):
            if severity in errors[name]:
                table[row, col] = 100.0 * errors[name][severity]
    fig, axis = plt.subplots(figsize=(1.2 + 0.9 * len(severities), 1.2 + 0.38 * len(names)))
    image = axis.imshow(np.ma.masked_invalid(table), cmap="viridis", vmin=0, vmax=100)
    _annotate(axis, table)
    axis.set_xticks(range(len(severities)), [str(s) for s in severities])
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("severity")
    axis.set_title(title, fontsize=10)
    fig.colorbar(image, ax=axis, label="error %")
    fig.tight_layout()
    save_figure(fig, path)


def _annotate(axis: Any, table: np.ndarray) -> None:
    """Write each cell's value, dark on the bright (high-error) end of the colour map."""
    for (row, col), value in np.ndenumerate(table):
        if np.isfinite(value):
            colour = "black" if value > 60 else "white"
            axis.text(col, row, f"{value:.1f}", ha="center", va="center", color=colour, fontsize=8)


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
