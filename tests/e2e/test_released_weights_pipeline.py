"""Released weights through DVC: import the authors' files, then `dvc repro` runs the
downstream stages on them without any training run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest
import yaml

from tests.e2e.conftest import Project
from tests.released_checkpoints import save_authors_vit

pytestmark = pytest.mark.e2e


def test_imported_checkpoints_run_the_downstream_stages(
    make_project: Callable[..., Project],
) -> None:
    project = make_project({"robustness": {"num_images": 8, "severities": [1]}})
    downloads = project.path / "downloads"
    downloads.mkdir()
    # 3-channel like the released files (the digits are grey: the first conv is adapted)
    save_authors_vit(downloads / "mfm_pretrain__vit.pth")
    save_authors_vit(downloads / "mfm_finetune__vit.pth", pretrain=False, classes=10)
    save_authors_vit(downloads / "supervised__vit.pth", pretrain=False, classes=10, seed=1)
    project.run("dvc", "repro", "prepare")
    python = sys.executable
    project.run(python, "-m", "mfm", "import", "downloads/mfm_pretrain__vit.pth", "--write-params")
    project.run(python, "-m", "mfm", "import", "downloads/mfm_finetune__vit.pth", "--write-params")
    project.run(
        python,
        "-m",
        "mfm",
        "import",
        "downloads/supervised__vit.pth",
        "--as",
        "scratch",
        "--write-params",
    )
    params = yaml.safe_load((project.path / "params.yaml").read_text())
    assert params["pretrain"]["weights"] == "weights/mfm_pretrain__vit.encoder.pt"
    assert params["finetune"]["weights"] == "weights/mfm_finetune__vit.classifier.pt"
    assert params["finetune"]["scratch_weights"] == "weights/supervised__vit.classifier.pt"

    project.run("dvc", "repro", "linprobe", "robustness", "export")

    metrics = project.path / "metrics"
    pretrain = json.loads((metrics / "pretrain.json").read_text())
    assert pretrain["imported"]["format"] == "project" and "final_loss" not in pretrain
    assert json.loads((metrics / "linprobe.json").read_text())
    for init in ("mfm", "scratch"):
        finetune = json.loads((metrics / f"finetune_{init}.json").read_text())
        assert finetune["epochs"] == 0 and finetune["imported"]["format"] == "project"
        assert "mce" in json.loads((metrics / f"robustness_{init}.json").read_text())
    assert (project.path / "results/export/model.onnx").is_file()
    assert (project.path / "results/pretrain/timm/model.safetensors").is_file()
    status = project.run("dvc", "status", "--with-deps", "linprobe", "robustness", "export").stdout
    assert "up to date" in status

    # a new file in weights/ reruns what follows it
    save_authors_vit(downloads / "mfm_pretrain__vit.pth", seed=2)
    project.run(python, "-m", "mfm", "import", "downloads/mfm_pretrain__vit.pth")
    assert "pretrain" in project.run("dvc", "status", "--with-deps", "linprobe").stdout
