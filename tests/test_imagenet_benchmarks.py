"""The benchmark layouts and label mapping, end to end on tiny trees with real wnids.

Every image is one flat colour that encodes its ImageNet-1k class (red + 256 * green) and
how many competing classes the fake classifier should rank above it (blue), so each
expected score is known by construction.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms import v2

from mfm.data.loaders import make_loader
from mfm.errors import UserError
from mfm.imagenet_benchmarks import (
    WnidFolder,
    benchmark_transform,
    class_subset,
    evaluate_benchmarks,
    imagenet_c_sets,
    imagenet_index,
    imagenet_wnids,
    score,
)

CROP, RESIZE = 8, 10
TENCH, GOLDFISH = "n01440764", "n01443537"  # 1k indices 0 and 1
A_WNIDS = ["n01498041", "n01531178", "n01534433"]  # ImageNet-A's first three (6, 11, 13)
DISTRACTOR = 0  # tench: in neither the A nor the R subset


class MarkerClassifier(nn.Module):
    """1000 logits: the true class at 10, ``rank`` competitors at 20, a distractor at 100."""

    def __init__(self, competitors: Sequence[int], distractor: int | None = None) -> None:
        super().__init__()
        self.competitors = list(competitors)
        self.distractor = distractor
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3))
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images[:, :, 0, 0] * self.std + self.mean) * 255).round().long()
        logits = torch.zeros(len(images), 1000)
        for row, (red, green, rank) in enumerate(pixels.tolist()):
            label = red + 256 * green
            logits[row, label] = 10.0
            above = [k for k in self.competitors if k != label][:rank]
            logits[row, above] = 20.0
            if self.distractor is not None:
                logits[row, self.distractor] = 100.0
        return logits


def write_class(folder: Path, ranks: Sequence[int], size: int = 12) -> None:
    """One flat image per rank in ``folder`` (a wnid), coloured with its class and rank."""
    folder.mkdir(parents=True, exist_ok=True)
    label = imagenet_index()[folder.name]
    for i, rank in enumerate(ranks):
        colour = (label % 256, label // 256, rank)
        Image.new("RGB", (size, size), colour).save(folder / f"img{i}.png")


def write_imagenet_c(root: Path, grouped: bool) -> dict[str, dict[int, float]]:
    """gaussian_noise and fog at severities 1, 2 (4 images each); returns the true errors."""
    wrong = {("gaussian_noise", 1): 1, ("gaussian_noise", 2): 2, ("fog", 1): 0, ("fog", 2): 4}
    groups = {"gaussian_noise": "noise", "fog": "weather"}
    for (corruption, severity), count in wrong.items():
        base = root / groups[corruption] if grouped else root
        ranks = [9] * count + [0] * (4 - count)
        for i, wnid in enumerate((TENCH, GOLDFISH)):
            write_class(base / corruption / str(severity) / wnid, ranks[2 * i : 2 * i + 2])
    (root / "not_a_corruption" / "1").mkdir(parents=True)  # ignored
    (root / "fog_readme.txt").write_text("ignored")
    return {c: {s: wrong[c, s] / 4 for s in (1, 2)} for c in ("gaussian_noise", "fog")}


def test_class_lists_come_from_timm() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == TENCH and wnids[1] == GOLDFISH
    a, r = class_subset("a"), class_subset("r")
    assert len(a) == len(r) == 200 and list(a) == sorted(a)
    assert a[:3] == tuple(imagenet_index()[w] for w in A_WNIDS) == (6, 11, 13)
    assert r[0] == 1 and DISTRACTOR not in a and DISTRACTOR not in r
    assert len({wnids[i] for i in a} & {wnids[i] for i in r}) == 86


def reference_transform(crop: int, resize: int | None) -> v2.Compose:
    """The benchmarks' preprocessing spelled out: shorter side to ``resize`` (bilinear,
    antialiased, none for ImageNet-C), centre crop, ImageNet mean/std."""
    steps = [v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR)] if resize else []
    steps += [
        v2.CenterCrop(crop),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ]
    return v2.Compose(steps)


def photo(path: Path, size: tuple[int, int], seed: int) -> Image.Image:
    """A JPEG of smooth random content (detail interpolation can tell apart) at ``size``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size[1] // 8 + 2, size[0] // 8 + 2, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize(
    ("size", "crop", "resize"),
    [
        ((500, 375), 224, 256),  # ImageNet's commonest shape, landscape
        ((333, 517), 224, 256),  # odd sides, portrait
        ((240, 250), 224, None),  # ImageNet-C: cropped, never resized
        ((224, 224), 224, None),
        ((20, 12), CROP, RESIZE),
        ((31, 23), 9, 14),  # crop / resize pairs whose crop ratio floors badly in floats
        ((40, 41), 14, 25),
    ],
)
def test_transform_is_todays_preprocessing(
    tmp_path: Path, size: tuple[int, int], crop: int, resize: int | None
) -> None:
    image = photo(tmp_path / "photo.jpg", size, seed=sum(size))
    got = benchmark_transform(crop, resize)(image)
    assert got.shape == (3, crop, crop)
    torch.testing.assert_close(got, reference_transform(crop, resize)(image), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grouped", [False, True])
def test_imagenet_c_layouts_are_found(tmp_path: Path, grouped: bool) -> None:
    write_imagenet_c(tmp_path, grouped)
    sets = imagenet_c_sets(tmp_path)
    assert [(c, s) for c, s, _ in sets] == [
        ("gaussian_noise", 1),
        ("gaussian_noise", 2),
        ("fog", 1),
        ("fog", 2),
    ]
    assert all(folder.is_dir() and folder.name == str(s) for _, s, folder in sets)


def test_imagenet_c_without_corruptions_names_the_root(tmp_path: Path) -> None:
    (tmp_path / "misc" / "1").mkdir(parents=True)
    with pytest.raises(UserError, match=str(tmp_path)):
        imagenet_c_sets(tmp_path)


def test_imagenet_c_flat_and_grouped_copies_of_one_corruption_clash(tmp_path: Path) -> None:
    write_class(tmp_path / "fog" / "1" / TENCH, [0])
    write_class(tmp_path / "weather" / "fog" / "1" / TENCH, [0])
    with pytest.raises(UserError, match="fog"):
        imagenet_c_sets(tmp_path)


def test_imagenet_c_report_end_to_end(tmp_path: Path) -> None:
    truth = write_imagenet_c(tmp_path / "c", grouped=True)
    model = MarkerClassifier(range(1000))
    paths = {"imagenet_c": tmp_path / "c", "imagenet_a": None}
    out = evaluate_benchmarks(model, paths, 3, "cpu", [1, 2], crop=CROP, resize=RESIZE)
    report = out["imagenet_c"]
    assert set(out) == {"imagenet_c"} and "relative_mce" not in report
    assert report["baseline"] == "alexnet"
    assert report["errors"] == {
        "gaussian_noise": {"1": 25.0, "2": 50.0},
        "fog": {"1": 0.0, "2": 100.0},
    }
    # AlexNet at severities 1, 2: (0.25 + 0.5) / (0.69528 + 0.82542); 1.0 / (0.67474 + 0.7605)
    assert report["ce"] == pytest.approx(
        {"gaussian_noise": 49.31939238508581, "fog": 69.67475822858895}, rel=1e-12
    )
    assert report["mce"] == pytest.approx(59.497075306837374, rel=1e-12)
    with_clean = evaluate_benchmarks(
        model, paths, 4, "cpu", [2], crop=CROP, resize=RESIZE, clean_error=0.2
    )["imagenet_c"]
    assert set(with_clean["errors"]["fog"]) == {"2"}
    # (0.5 - 0.2) / (0.82542 - 0.43478); (1.0 - 0.2) / (0.7605 - 0.43478)
    assert with_clean["relative_ce"] == pytest.approx(
        {"gaussian_noise": 76.79705099324184, "fog": 245.6097261451554}, rel=1e-12
    )
    assert with_clean["relative_mce"] == pytest.approx(161.20338856919864, rel=1e-12)
    assert truth == {"gaussian_noise": {1: 0.25, 2: 0.5}, "fog": {1: 0.0, 2: 1.0}}


def test_imagenet_c_copy_missing_severity_folders(tmp_path: Path) -> None:
    write_imagenet_c(tmp_path, grouped=False)
    shutil.rmtree(tmp_path / "fog" / "1")  # fog at severity 2 only
    for severity in (1, 2):  # a held-out corruption at two of its five severities
        write_class(tmp_path / "spatter" / str(severity) / TENCH, [0, 9])
    model = MarkerClassifier(range(1000))
    report = evaluate_benchmarks(
        model, {"imagenet_c": tmp_path}, 4, "cpu", crop=CROP, resize=RESIZE
    )["imagenet_c"]
    assert report["errors"] == {
        "gaussian_noise": {"1": 25.0, "2": 50.0},
        "fog": {"2": 100.0},
        "spatter": {"1": 50.0, "2": 50.0},
    }
    # (0.25 + 0.5) / (0.69528 + 0.82542) and 1.0 / 0.7605; the means gave 82.18 mCE
    assert report["ce"].pop("spatter") is None
    assert report["ce"] == pytest.approx(
        {"gaussian_noise": 49.31939238508581, "fog": 131.4924391847469}, rel=1e-12
    )
    assert report["mce"] == pytest.approx(90.40591578491635, rel=1e-12)
    assert report["mce_corruptions"] == ["gaussian_noise", "fog"]
    assert set(report["notes"]) == {"spatter"} and "[1, 2]" in report["notes"]["spatter"]


@pytest.mark.parametrize("clean", [25.0, 1.5, -0.01])
def test_clean_error_in_percent_is_refused_before_scoring(tmp_path: Path, clean: float) -> None:
    paths = {"imagenet_c": tmp_path / "not-read"}  # refused before the root is even looked at
    with pytest.raises(UserError, match=r"clean_error = .* not in \[0, 1\]"):
        evaluate_benchmarks(MarkerClassifier([]), paths, 2, "cpu", clean_error=clean)


def test_imagenet_a_slices_to_its_200_classes(tmp_path: Path) -> None:
    for wnid in A_WNIDS:
        write_class(tmp_path / wnid, [0, 0, 2, 6])  # top-1 hit, hit, top-5 only, miss
    model = MarkerClassifier(class_subset("a"), distractor=DISTRACTOR)
    out = evaluate_benchmarks(model, {"imagenet_a": tmp_path}, 5, "cpu", crop=CROP, resize=RESIZE)
    result = out["imagenet_a"]
    assert result["count"] == 12 and result["error"] == pytest.approx(0.5)
    assert result["top1"] == pytest.approx(50.0) and result["top5"] == pytest.approx(75.0)
    dataset = WnidFolder(tmp_path, benchmark_transform(CROP, RESIZE))
    loader = make_loader(dataset, 5, False, 0, 0, drop_last=False)
    assert score(model, loader, "cpu", None)["top1"] == 0.0  # the distractor wins unsliced


def test_imagenet_r_and_sketch(tmp_path: Path) -> None:
    r_wnids = [imagenet_wnids()[i] for i in class_subset("r")[:2]]
    for wnid in r_wnids:
        write_class(tmp_path / "r" / wnid, [0, 4, 5])
    for wnid in (TENCH, "n15075141"):  # first and last of the 1000
        write_class(tmp_path / "sketch" / wnid, [0, 3, 7, 7], size=16)
    (tmp_path / "sketch" / ".ipynb_checkpoints").mkdir()  # hidden: neither class nor image
    (tmp_path / "sketch" / TENCH / "._img0.png").write_bytes(b"macOS resource fork")
    model = MarkerClassifier(class_subset("r"), distractor=DISTRACTOR)
    paths = {"imagenet_r": tmp_path / "r"}
    result = evaluate_benchmarks(model, paths, 4, "cpu", crop=CROP, resize=RESIZE)["imagenet_r"]
    assert result["top1"] == pytest.approx(100 / 3) and result["top5"] == pytest.approx(200 / 3)
    sketch_model = MarkerClassifier(range(1000))
    paths = {"imagenet_sketch": tmp_path / "sketch"}
    out = evaluate_benchmarks(sketch_model, paths, 3, "cpu", crop=CROP, resize=RESIZE)
    assert out["imagenet_sketch"]["top1"] == 25.0 and out["imagenet_sketch"]["top5"] == 50.0
    assert out["imagenet_sketch"]["count"] == 8


def test_unknown_wnids_are_user_errors(tmp_path: Path) -> None:
    write_class(tmp_path / "a" / A_WNIDS[0], [0])
    (tmp_path / "a" / "n99999999").mkdir()
    model = MarkerClassifier([])
    with pytest.raises(UserError, match="n99999999"):
        evaluate_benchmarks(model, {"imagenet_a": tmp_path / "a"}, 2, "cpu", crop=CROP)
    write_class(tmp_path / "a2" / TENCH, [0])  # a real wnid, but not one of A's 200
    with pytest.raises(UserError, match=TENCH):
        evaluate_benchmarks(model, {"imagenet_a": tmp_path / "a2"}, 2, "cpu", crop=CROP)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_named(tmp_path: Path, workers: int) -> None:
    write_class(tmp_path / "s" / TENCH, [0, 0])
    bad = tmp_path / "s" / TENCH / "cut.jpg"
    photo(bad, (64, 48), seed=1)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # cut mid-scan: Pillow's error names no file
    paths = {"imagenet_sketch": tmp_path / "s"}
    with pytest.raises(
        UserError,
        match=f"cannot read image {re.escape(str(bad))} .*image file is truncated.*remove or",
    ):
        evaluate_benchmarks(MarkerClassifier([]), paths, 2, "cpu", workers=workers, crop=CROP)
    bad.write_text("not a JPEG at all")
    with pytest.raises(
        UserError, match=f"cannot read image {re.escape(str(bad))} \\(not an image file\\)"
    ):
        evaluate_benchmarks(MarkerClassifier([]), paths, 2, "cpu", workers=workers, crop=CROP)


def test_bad_roots_and_heads_are_user_errors(tmp_path: Path) -> None:
    model = MarkerClassifier([])
    with pytest.raises(UserError, match="missing"):
        evaluate_benchmarks(model, {"imagenet_r": tmp_path / "missing"}, 2, "cpu")
    with pytest.raises(UserError, match="imagenet_x"):
        evaluate_benchmarks(model, {"imagenet_x": tmp_path}, 2, "cpu")
    write_class(tmp_path / "s" / TENCH, [0])
    with pytest.raises(UserError, match="1000-class"):
        evaluate_benchmarks(nn.Flatten(), {"imagenet_sketch": tmp_path / "s"}, 2, "cpu", crop=CROP)
