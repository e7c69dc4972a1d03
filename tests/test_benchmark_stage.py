"""The released benchmarks through the robustness stage command, as users' copies really are.

A tiny ImageNet project (a prepared manifest whose meta has the 1000 wnids, a corrupted set
without corruptions, so only the benchmarks are scored, and two one-block ViTs with a
1000-class head) is built once. Each classifier's head has
zero weights and a bias that falls away from one class, so its prediction is that class (or,
with the logits sliced to ImageNet-A's or -R's 200, the subset's class nearest to it) and
every expected error is known by construction.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mfm.cli import main
from mfm.config import ModelParams
from mfm.corrupt import build
from mfm.data.meta import DatasetMeta
from mfm.data.prepared import write_prepared
from mfm.data.sources.common import ManifestData
from mfm.imagenet_benchmarks import class_subset, imagenet_wnids
from mfm.models import build_classifier, save_classifier
from mfm.paths import ROBUSTNESS_DIR

TENCH, GOLDFISH, LAST = "n01440764", "n01443537", "n15075141"  # 1k indices 0, 1, 999
TINY_VIT = ModelParams(
    name="vit_tiny_patch16_224", patch_size=32, kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2}
)
FAVOURITE = {"mfm": 0, "scratch": 1}  # the class each classifier predicts
PARAMS = {
    "data": {"dataset": "imagefolder", "root": "imgs", "img_size": 224, "download": False},
    "robustness": {"batch_size": 4},
    "runtime": {"device": "cpu", "workers": 0, "seed": 0},
}
HIDDEN = (".DS_Store", "._img0.JPEG")  # macOS leftovers: junk bytes under image-like names


def hide_junk(folder: Path) -> None:
    """What copying a folder between machines leaves; none of it is an image or a class."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in HIDDEN:
        (folder / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    checkpoints = folder / ".ipynb_checkpoints"
    checkpoints.mkdir(exist_ok=True)
    (checkpoints / "img0-checkpoint.JPEG").write_text("a notebook's copy, not an image")


def write_images(folder: Path, count: int, size: int = 24) -> list[Path]:
    """``count`` flat JPEGs in a wnid folder, with hidden junk beside them."""
    hide_junk(folder)
    paths = [folder / f"ILSVRC_{i}.JPEG" for i in range(count)]
    for i, path in enumerate(paths):
        Image.new("RGB", (size, size + 4), (40 * i, 90, 160)).save(path, quality=90)
    return paths


def tiny_classifier(favourite: int) -> torch.nn.Module:
    """A one-block ViT whose 1000 logits are a bias peaked at class ``favourite``."""
    model, spec = build_classifier(TINY_VIT, 224, 3, 1000, 0.0)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(-1e-3 * (torch.arange(1000) - favourite).abs().float())
    return model, spec


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after prepare, corrupt and finetune, each output written by its own writer."""
    root = tmp_path_factory.mktemp("imagenet_project")
    wnids = list(imagenet_wnids())
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    image = write_images(root / "imgs" / "train" / TENCH, 1)[0]
    rows = [(str(image.relative_to(root / "imgs")), 0)]
    meta = DatasetMeta(
        dataset="imagefolder",
        kind="manifest",
        classes=wnids,
        num_classes=1000,
        channels=3,
        image_size=None,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        num_train=1,
        num_test=1,
        source=str(root / "imgs"),
    )
    data = ManifestData(train=rows, test=rows, classes=wnids, source=str(root / "imgs"))
    write_prepared(data, meta, root / "data/prepared")
    info = {"classes": wnids, "dataset": "imagefolder", "img_size": 224}
    for init, favourite in FAVOURITE.items():
        torch.manual_seed(favourite)
        model, spec = tiny_classifier(favourite)
        save_classifier(model, spec, info, root / f"results/finetune/{init}/classifier.pt")
    crops = np.zeros((0, 224, 224, 3), np.uint8)  # data.img_size crops, none corrupted
    build(crops, np.zeros(0, np.int64), [], [1], 0, root / "data/corrupted", 1)
    return root


@pytest.fixture
def project(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    return root


def metrics(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root / "metrics") for f in fs}


def write_trees(base: Path) -> dict[str, Path]:
    """ImageNet-C (grouped, fog at severity 2 only, spatter at 1 and 2), A, R and Sketch."""
    c = base / "imagenet-c"
    layout = {  # (group, corruption, severity): (tench images, goldfish images)
        ("noise", "gaussian_noise", 1): (1, 1),
        ("noise", "gaussian_noise", 2): (0, 2),
        ("weather", "fog", 2): (2, 2),
        ("extra", "spatter", 1): (1, 1),
        ("extra", "spatter", 2): (1, 1),
    }
    for (group, corruption, severity), counts in layout.items():
        hide_junk(c / group)
        hide_junk(c / group / corruption / str(severity))
        for wnid, count in zip((TENCH, GOLDFISH), counts, strict=True):
            if count:
                write_images(c / group / corruption / str(severity) / wnid, count, size=224)
    hide_junk(c)
    a_wnid = imagenet_wnids()[class_subset("a")[0]]  # index 6
    write_images(base / "imagenet-a" / a_wnid, 2)
    write_images(base / "imagenet-r" / GOLDFISH, 2)  # R's first class
    write_images(base / "sketch" / TENCH, 2)
    write_images(base / "sketch" / LAST, 1)
    for name in ("imagenet-a", "imagenet-r", "sketch"):
        hide_junk(base / name)
    return {
        "imagenet_c": c,
        "imagenet_a": base / "imagenet-a",
        "imagenet_r": base / "imagenet-r",
        "imagenet_sketch": base / "sketch",
    }


def settings(roots: dict[str, Path], workers: int = 0) -> list[str]:
    pairs = [f"robustness.{name}={path}" for name, path in roots.items()]
    return [arg for pair in [*pairs, f"runtime.workers={workers}"] for arg in ("-S", pair)]


def test_stage_scores_real_layouts_ignoring_hidden_entries(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = write_trees(project / "benchmarks")
    assert main(["robustness", *settings(roots)]) == 0, capsys.readouterr().err
    mfm = json.loads((project / "metrics/robustness_mfm.json").read_text())["benchmarks"]
    scratch = json.loads((project / "metrics/robustness_scratch.json").read_text())["benchmarks"]
    c = mfm["imagenet_c"]
    assert c["errors"] == {
        "gaussian_noise": {"1": 50.0, "2": 100.0},
        "fog": {"2": 50.0},
        "spatter": {"1": 50.0, "2": 50.0},
    }
    # AlexNet at the severities present: (0.5 + 1.0) / (0.69528 + 0.82542); 0.5 / 0.7605
    assert c["ce"]["gaussian_noise"] == pytest.approx(98.63878477017162, rel=1e-12)
    assert c["ce"]["fog"] == pytest.approx(65.74621959237344, rel=1e-12)
    assert c["mce"] == pytest.approx(82.19250218127253, rel=1e-12)
    assert c["ce"]["spatter"] is None and "[1, 2]" in c["notes"]["spatter"]
    # scratch predicts goldfish: (0.5 + 0.0) / (0.69528 + 0.82542) and 0.5 / 0.7605
    assert scratch["imagenet_c"]["mce"] == pytest.approx(49.312907257881996, rel=1e-12)
    assert mfm["imagenet_sketch"]["count"] == 3  # hidden files and folders left out
    assert mfm["imagenet_sketch"]["top1"] == pytest.approx(200 / 3)
    assert scratch["imagenet_sketch"]["top1"] == 0.0
    for report in (mfm, scratch):  # A and R: the subset's class nearest to 0 or 1
        assert report["imagenet_a"]["count"] == 2 and report["imagenet_a"]["top1"] == 100.0
        assert report["imagenet_r"]["count"] == 2 and report["imagenet_r"]["top1"] == 100.0


@pytest.mark.parametrize(
    ("benchmark", "broken", "workers"),
    [
        ("imagenet_c", "truncated", 2),
        ("imagenet_a", "text", 0),
        ("imagenet_r", "truncated", 0),
        ("imagenet_sketch", "text", 2),
    ],
)
def test_unreadable_benchmark_image_is_one_line_naming_it(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    benchmark: str,
    broken: str,
    workers: int,
) -> None:
    roots = write_trees(project / "benchmarks")
    folder = {
        "imagenet_c": roots["imagenet_c"] / "weather/fog/2" / GOLDFISH,
        "imagenet_a": roots["imagenet_a"] / imagenet_wnids()[class_subset("a")[0]],
        "imagenet_r": roots["imagenet_r"] / GOLDFISH,
        "imagenet_sketch": roots["imagenet_sketch"] / LAST,
    }[benchmark]
    bad = folder / "ILSVRC_0.JPEG"
    if broken == "truncated":  # a download cut short: Pillow's OSError names no file
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
    else:
        bad.write_text("<html>403 Forbidden</html>")  # a text file saved under a .JPEG name
    crops = np.full((2, 224, 224, 3), 128, np.uint8)  # corrupted crops are scored first
    shutil.rmtree(project / "data/corrupted")
    build(crops, np.zeros(2, np.int64), ["gaussian_noise"], [1], 0, "data/corrupted", 1)
    before = metrics(project)
    capsys.readouterr()
    code = main(["robustness", *settings({benchmark: roots[benchmark]}, workers)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    reason = "(?i:truncated)" if broken == "truncated" else "not an image file"
    assert re.fullmatch(
        f"mfm robustness: error: cannot read image {re.escape(str(bad))} \\(.*{reason}.*\\); "
        "remove or replace it .*then rerun robustness",
        lines[0],
    ), lines[0]
    assert metrics(project) == before  # a failed run writes no metrics
    assert not (project / ROBUSTNESS_DIR).exists()  # and no figures: benchmarks score first
