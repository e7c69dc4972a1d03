"""The bad-input catalogue: every mistake a user can make stops the real CLI cleanly.

Each test runs ``mfm.cli.main`` in-process from a small project (scikit-learn digits at 16 px,
a one-block ViT, CPU) that already holds the outputs of earlier stages, makes one mistake,
and checks the contract of ``mfm.errors.UserError``: exit code 2, exactly one line on stderr
naming the cause and the fix, and every output written before (data/prepared, metrics,
results) byte-for-byte intact, with no new or half-written file beside them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mfm.cli import main
from mfm.models import build_encoder, save_encoder

TINY: dict[str, Any] = {
    "data": {
        "dataset": "digits",
        "img_size": 16,
        "download": False,
        "train_limit": 64,
        "test_limit": 32,
    },
    "model": {
        "name": "vit_tiny_patch16_224",
        "patch_size": 4,
        "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
    },
    "pretrain": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0.0, "log_every": 1},
    "finetune": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0.0, "log_every": 1},
    "runtime": {"device": "cpu", "seed": 0, "workers": 0, "amp": False},
}
OUTPUT_DIRS = ("data", "metrics", "results")
# A failed training run leaves its own curves in the hidden staging folder next to live/
# (engine state, like a checkpoint, git-ignored); the published live/ stays as it was.
STAGING = "/.live.partial/"


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied section by section (a new dict)."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def write_params(root: Path, changes: dict[str, Any] | None = None) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(merged(TINY, changes or {})))


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones too) under the output folders, by relative path;
    folders too, so that a leftover empty temporary folder shows."""
    hashes = {}
    for folder in OUTPUT_DIRS:
        for dirpath, _, files in os.walk(root / folder):
            hashes[f"{Path(dirpath).relative_to(root)}/"] = "folder"
            for name in files:
                path = Path(dirpath) / name
                hashes[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def without_staging(hashes: dict[str, str]) -> dict[str, str]:
    return {path: h for path, h in hashes.items() if STAGING not in f"/{path}/"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after prepare, pretrain and finetune --init mfm (built once, copied per test)."""
    root = tmp_path_factory.mktemp("built")
    write_params(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for argv in (["prepare"], ["pretrain"], ["finetune", "--init", "mfm"]):
            assert main(argv) == 0, argv
    return root


@pytest.fixture
def project(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_data) -> Path:
    """A fresh copy of the built project as the working directory; no network, no machine-wide
    data set places."""
    root = tmp_path / "project"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def fails(project: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """Run the CLI, expect exit 2 and one stderr line, check the outputs; returns the line.

    (In a shell, a training stage's INFO log lines come before the error line; here pytest's
    log capture keeps them off stderr, so stderr holds the error alone.)
    """

    def run(*argv: str) -> str:
        capsys.readouterr()
        before = snapshot(project)
        code = main(list(argv))
        captured = capsys.readouterr()
        after = without_staging(snapshot(project))
        assert code == 2, captured
        lines = captured.err.splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith(f"mfm {argv[0]}: error: "), lines[0]
        assert "Traceback" not in captured.err
        assert after == before
        print(lines[0])
        return lines[0]

    return run


# --------------------------------------------------------------------------- 1. unknown key


def test_unknown_key_in_params_yaml(project: Path, fails: Callable[..., str]) -> None:
    write_params(project, {"pretrain": {"epoch": 2}})
    line = fails("pretrain")
    assert "params.yaml" in line and "unknown key 'pretrain.epoch'" in line
    assert "did you mean 'epochs'" in line and "allowed keys here" in line


def test_unknown_section_in_params_yaml(project: Path, fails: Callable[..., str]) -> None:
    write_params(project, {"trainer": {"epochs": 2}})
    line = fails("prepare")
    assert "unknown key 'trainer'" in line and "pretrain" in line


def test_unknown_key_as_override(project: Path, fails: Callable[..., str]) -> None:
    write_params(project)
    line = fails("finetune", "--init", "mfm", "-S", "finetune.mixupp=0.2")
    assert "-S finetune.mixupp=0.2" in line and "unknown key 'finetune.mixupp'" in line
    assert "did you mean 'mixup'" in line


def test_unknown_model_kwarg(project: Path, fails: Callable[..., str]) -> None:
    write_params(project)
    line = fails("pretrain", "-S", "model.kwargs.depht=2")
    assert "depht" in line and "model.kwargs" in line


# --------------------------------------------------------------------------- 2. bad values


@pytest.mark.parametrize(
    ("changes", "override", "expected"),
    [
        ({"pretrain": {"epochs": "two"}}, None, ["pretrain.epochs = 'two'", "valid integer"]),
        ({"data": {"img_size": 4}}, None, ["data.img_size = 4", "greater than or equal to 8"]),
        (None, "pretrain.lr=-1", ["pretrain.lr = -1", "greater than 0"]),
        (None, "runtime.device=tpu", ["runtime.device = 'tpu'", "'cpu'"]),
        (None, "finetune.crop_scale=[0.9, 0.1]", ["finetune.crop_scale", "low <= high"]),
    ],
)
def test_wrong_type_or_out_of_range(
    project: Path,
    fails: Callable[..., str],
    changes: dict[str, Any] | None,
    override: str | None,
    expected: list[str],
) -> None:
    write_params(project, changes)
    line = fails("pretrain", *(["-S", override] if override else []))
    assert f"error: -S {override}: " in line if override else "error: params.yaml: " in line
    assert "is invalid" in line
    assert all(text in line for text in expected), line


# --------------------------------------------------------------------------- 3. missing data


def test_missing_fashion_mnist(project: Path, fails: Callable[..., str]) -> None:
    (project / "empty").mkdir()
    write_params(project, {"data": {"dataset": "fashion_mnist", "root": "empty"}})
    line = fails("prepare")
    assert "Fashion-MNIST not found in empty" in line and "data.download is false" in line
    assert "data.download: true" in line and "set data.root" in line


def test_missing_imagefolder_root(project: Path, fails: Callable[..., str]) -> None:
    write_params(project, {"data": {"dataset": "imagefolder", "root": "no/such/folder"}})
    line = fails("prepare")
    assert "no/such/folder does not exist" in line and "fix data.root" in line


# --------------------------------------------------------------------------- 4, 5. image folders


def test_empty_class_folder(project: Path, fails: Callable[..., str], make_image_tree) -> None:
    root = make_image_tree(project / "imgs")
    (root / "train" / "bird").mkdir()
    write_params(project, {"data": {"dataset": "imagefolder", "root": "imgs"}})
    line = fails("prepare")
    assert "train/bird holds no images" in line and "add images or remove the folder" in line


def test_unreadable_image_is_caught_by_prepare(
    project: Path, fails: Callable[..., str], make_image_tree
) -> None:
    root = make_image_tree(project / "imgs")
    (root / "train" / "cat" / "y.png").write_bytes(b"this is not a png at all" * 10)
    write_params(project, {"data": {"dataset": "imagefolder", "root": "imgs"}})
    line = fails("prepare")
    assert "cannot read image" in line and "train/cat/y.png" in line
    assert "UnidentifiedImageError" in line and "remove or replace it" in line

    (root / "val" / "dog" / "d.png").write_bytes(b"")  # a second one, in the other split
    line = fails("prepare")
    assert "cannot read 2 images, e.g." in line and "train/cat/y.png" in line
    assert "remove or replace them" in line


@pytest.mark.parametrize("workers", [0, 2])
def test_image_broken_after_prepare_is_named_by_training(
    project: Path, fails: Callable[..., str], make_image_tree, workers: int
) -> None:
    root = make_image_tree(project / "imgs")
    changes = {
        "data": {"dataset": "imagefolder", "root": "imgs"},
        "pretrain": {"batch_size": 5},  # all five training images in one batch
        "runtime": {"workers": workers},
    }
    write_params(project, changes)
    assert main(["prepare"]) == 0
    (root / "train" / "dog" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    line = fails("pretrain")
    assert "cannot read image" in line and "train/dog/a.png" in line
    assert "remove or replace it" in line


# --------------------------------------------------------------------------- 6. checkpoint


@pytest.mark.parametrize(
    "other",
    [
        {"kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},  # same keys, other shapes
        {"kwargs": {"depth": 2, "embed_dim": 16, "num_heads": 2}},  # extra blocks
        {"name": "resnet18", "kwargs": {}},  # another family
    ],
)
def test_encoder_of_another_architecture(
    project: Path, fails: Callable[..., str], other: dict[str, Any]
) -> None:
    from mfm.config import ModelParams

    model = ModelParams.model_validate({**TINY["model"], **other})
    save_encoder(build_encoder(model, 16, 1), project / "results/pretrain/encoder.pt")
    write_params(project)
    line = fails("finetune", "--init", "mfm")
    assert "results/pretrain/encoder.pt holds another architecture" in line
    assert "rerun pretrain" in line and "model.*" in line


# --------------------------------------------------------------------------- 7. non-finite loss


def test_non_finite_loss_keeps_the_last_checkpoint(
    project: Path, fails: Callable[..., str]
) -> None:
    write_params(project, {"pretrain": {"lr": 1e30, "epochs": 2}})
    line = fails("pretrain")
    assert "loss is nan" in line or "loss is inf" in line
    assert "lower the learning rate" in line and "clip_grad" in line
    assert "last good checkpoint kept: results/pretrain/checkpoint.pt" in line


# --------------------------------------------------------------------------- 8. export


def test_export_of_a_missing_classifier(project: Path, fails: Callable[..., str]) -> None:
    (project / "results/finetune/mfm/classifier.pt").unlink()
    write_params(project)
    line = fails("export")
    assert "results/finetune/mfm/classifier.pt not found" in line
    assert "python -m mfm finetune --init mfm" in line and "export.init" in line
