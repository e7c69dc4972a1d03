"""``bench --data``: the ImageNet-like JPEG folder writer, and the pretrain stage's input path
timed on such a folder (a 1-block ViT at 32 px, batch 8, 2 timed steps, 0 and 1 workers)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mfm import bench_data, cli, jpeg_folder, throughput
from mfm.config import load_params
from mfm.data.datasets import ManifestImages
from mfm.errors import UserError

SMALL = (40, 64)  # long sides of the test images (ImageNet's are 350-500)
TRAIN, VAL = 24, 4


def small_folder(root: Path, seed: int = 0, **options: Any) -> jpeg_folder.FolderSummary:
    return jpeg_folder.write_jpeg_folder(
        root, images=TRAIN, val_images=VAL, seed=seed, long_side=SMALL, **options
    )


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "jpegs"
    small_folder(root)
    return root


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(
        "data:\n  img_size: 32\n"
        "model:\n  name: vit_tiny_patch16_224\n  patch_size: 4\n"
        "runtime:\n  device: cpu\n  workers: 0\n"
    )
    return path


def bench(params_file: Path, *options: str) -> list[str]:
    return ["bench", "--params", str(params_file), "-S", 'model.kwargs={"depth": 1}', *options]


# -- the folder ----------------------------------------------------------------------------------


def test_folder_layout_sizes_and_figures(folder):
    photos = jpeg_folder.source_photos()
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(photos)
    for split, count in (("train", TRAIN), ("val", VAL)):
        paths = sorted((folder / split).glob("*/*.JPEG"))
        assert len(paths) == count
        assert {p.parent.name for p in paths} <= set(photos)
        for path in paths:
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                image.load()  # decodes in full
                assert SMALL[0] <= max(image.size) <= SMALL[1]
    assert {p.name for p in (folder / "val").iterdir()} <= {
        p.name for p in (folder / "train").iterdir()
    }
    summary = small_folder(folder.parent / "again")
    written = [p for p in (folder.parent / "again").rglob("*.JPEG")]
    assert summary.images == len(written) == TRAIN + VAL
    assert summary.mean_kb == pytest.approx(
        sum(p.stat().st_size for p in written) / 1000 / len(written)
    )
    widths = [Image.open(p).size[0] for p in written]
    assert summary.mean_width == pytest.approx(np.mean(widths))
    assert summary.classes == len(photos) and summary.quality == jpeg_folder.QUALITY


def test_folder_is_a_function_of_the_seed(folder, tmp_path):
    small_folder(tmp_path / "same")
    small_folder(tmp_path / "other", seed=1)
    assert files(tmp_path / "same") == files(folder)
    other = files(tmp_path / "other")
    assert other.keys() == files(folder).keys() and other != files(folder)


def test_folder_refuses_a_non_empty_target_and_bad_counts(folder, tmp_path):
    with pytest.raises(UserError, match="not an empty folder"):
        small_folder(folder)
    with pytest.raises(UserError, match="at least 1"):
        jpeg_folder.write_jpeg_folder(tmp_path / "none", images=0)
    assert not (tmp_path / "none").exists()


def test_cli_writes_an_imagenet_sized_folder(params_file, tmp_path, capsys):
    root = tmp_path / "imagenet_like"
    argv = ["bench", "--params", str(params_file), "--make-jpeg-folder", str(root)]
    assert cli.main([*argv, "--images", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["train_images"], out["val_images"], out["images"]) == (16, 1, 17)
    assert len(list(root.glob("train/*/*.JPEG"))) == 16
    assert 350 <= out["mean_width"] <= 500 and 250 <= out["mean_height"] <= 500
    assert out["mean_kb"] > 30 and out["quality"] == jpeg_folder.QUALITY


# -- the input path ------------------------------------------------------------------------------


def test_the_folder_is_read_by_the_pretrain_stages_dataset_and_loader(folder, params_file):
    params = load_params(params_file)
    source = bench_data.folder_input(params, folder, 32, (0.2, 1.0), least_images=50)
    assert isinstance(source.dataset, ManifestImages)
    assert (source.images, source.repeats, len(source.dataset)) == (TRAIN, 3, 3 * TRAIN)
    assert source.meta.kind == "manifest" and source.meta.channels == 3
    images, labels = next(bench_data.batches(source, 8, 0, 0, epoch=0))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    assert labels.shape == (8,)


@pytest.mark.parametrize(
    ("workers", "loader", "draft"),
    [("0", "pil", False), ("1", "pil", False), ("auto", "pil", True), ("0", "device", True)],
)
def test_bench_data_figures(folder, params_file, capsys, monkeypatch, workers, loader, draft):
    monkeypatch.setattr("mfm.data.workers.usable_cpus", lambda: 2)  # auto: 2 CPUs - 1
    argv = bench(params_file, "--data", str(folder), "--batch-size", "8", "--steps", "2")
    argv += ["--warmup", "1", "--workers", workers, "-S", f"runtime.loader={loader}"]
    argv += ["-S", f"runtime.jpeg_draft={str(draft).lower()}"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [key for key in throughput.DATA_KEYS if key not in throughput.__doc__] == []
    assert out["data"] == str(folder.resolve()) and out["loader"] == loader
    assert out["jpeg_draft"] is (draft and loader == "pil")  # the device path decodes in full
    workers = 1 if workers == "auto" else int(workers)
    assert out["workers"] == workers
    assert out["data_images"] == TRAIN and out["data_repeats"] >= 1
    assert out["loader_batches"] >= 2 and out["loader_warmup_batches"] >= max(1, workers)
    for key in (
        "images_per_second",
        "loader_images_per_second",
        "loader_images_per_second_per_worker",
        "end_to_end_images_per_second",
        "end_to_end_step_ms",
        "end_to_end_over_synthetic",
    ):
        assert math.isfinite(out[key]) and out[key] > 0, key
    ratio = out["end_to_end_images_per_second"] / out["images_per_second"]
    assert out["end_to_end_over_synthetic"] == pytest.approx(ratio)
    assert out["end_to_end_images_per_second"] == pytest.approx(8000 / out["end_to_end_step_ms"])
    per_worker = out["loader_images_per_second"] / max(workers, 1)
    assert out["loader_images_per_second_per_worker"] == pytest.approx(per_worker)
    assert out["step_ms"] > 0 and out["supervised_step_ms"] > 0  # the synthetic figures too


def test_workers_must_be_a_count_or_auto(params_file, capsys):
    assert cli.main(bench(params_file, "--data", "x", "--workers", "-1")) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(bench(params_file, "--workers", "many"))
    assert "not a number or auto: 'many'" in capsys.readouterr().err


def test_without_data_the_new_keys_are_null(params_file, capsys):
    assert (
        cli.main([*bench(params_file, "--batch-size", "4", "--steps", "1", "--warmup", "0")]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {key: out[key] for key in throughput.DATA_KEYS} == dict.fromkeys(throughput.DATA_KEYS)


@pytest.mark.parametrize(
    ("where", "cause"),
    [("missing", "no such folder"), ("flat", "no train/"), ("empty", "has no class folders")],
)
def test_a_bad_folder_is_one_line(where, cause, params_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(throughput, "build_encoder", lambda *a: pytest.fail("bench timed"))
    root = tmp_path / where
    if where == "flat":
        root.mkdir()
        (root / "a.jpg").write_bytes(b"")
    elif where == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    with pytest.raises(UserError, match=cause):
        bench_data.folder_input(load_params(params_file), root, 32, (0.2, 1.0))
    assert cli.main([*bench(params_file, "--data", str(root))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"mfm bench: error: bench --data {root}")
    assert cause in err
    assert ("add one folder" if where == "empty" else "--make-jpeg-folder") in err  # the fix
