"""The robustness stage: every classifier on the corrupted set, normalised by scratch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mfm.corrupt
from mfm.cli import run_stage
from mfm.config import ModelParams, Params
from mfm.corrupt import build
from mfm.corrupt import run as corrupt
from mfm.errors import UserError
from mfm.models import build_classifier, save_classifier
from mfm.prepare import run as prepare
from mfm.robustness import error_rate, run

TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 4,
    "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Params, Path]:
    params = Params.model_validate(
        {
            "data": {"dataset": "digits", "img_size": 16},
            "model": TINY_VIT,
            "robustness": {"num_images": 12, "severities": [1, 5]},
            "runtime": {"workers": 1, "device": "cpu"},
        }
    )
    prepare(params, tmp_path / "data/prepared")
    monkeypatch.setattr(
        mfm.corrupt, "corruption_names", lambda which: ["gaussian_noise", "contrast"]
    )
    corrupt(params, tmp_path / "data/prepared", tmp_path / "data/corrupted")
    info = {"classes": [str(i) for i in range(10)], "dataset": "digits", "img_size": 16}
    for seed, init in enumerate(("mfm", "scratch")):
        torch.manual_seed(seed)
        model, spec = build_classifier(ModelParams(**TINY_VIT), 16, 1, 10, 0.0)
        save_classifier(model, spec, info, tmp_path / f"results/finetune/{init}/classifier.pt")
    return params, tmp_path


def test_scores_both_classifiers_against_the_scratch_baseline(
    workspace: tuple[Params, Path],
) -> None:
    params, root = workspace
    reports = run(
        params,
        root / "data/prepared",
        root / "data/corrupted",
        root / "results/finetune",
        root / "results/robustness",
    )
    assert set(reports) == {"mfm", "scratch"}
    json.dumps(reports, allow_nan=False)
    scratch, mfm_report = reports["scratch"], reports["mfm"]
    # The baseline divided by itself: every CE and the mCE are exactly 100.
    assert scratch["mce"] == pytest.approx(100.0)
    assert all(ce == pytest.approx(100.0) for ce in scratch["ce"].values())
    assert scratch["baseline"] == mfm_report["baseline"] == "finetune[scratch]"
    assert set(mfm_report["errors"]) == {"gaussian_noise", "contrast"}
    assert set(mfm_report["errors"]["contrast"]) == {"1", "5"}
    assert 0 <= mfm_report["clean_error"] <= 100
    # mCE follows from the two error tables the report lists.
    expected = np.mean(
        [
            sum(mfm_report["errors"][c].values()) / sum(scratch["errors"][c].values())
            for c in ("gaussian_noise", "contrast")
        ]
    )
    assert mfm_report["mce"] == pytest.approx(100 * expected, rel=1e-6)
    for init in ("mfm", "scratch"):
        png = root / "results/robustness" / init / "heatmap.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_one_metrics_file_per_classifier(
    workspace: tuple[Params, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    params, root = workspace
    (root / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    monkeypatch.chdir(root)
    run_stage("robustness", "params.yaml", [])
    for init in ("mfm", "scratch"):
        report = json.loads((root / f"metrics/robustness_{init}.json").read_text())
        assert report["init"] == init and "mce" in report


def test_error_rate_of_a_known_classifier(workspace: tuple[Params, Path]) -> None:
    from mfm.throughput import synthetic_meta

    class AlwaysThree(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), 3), 10).float()

    meta = synthetic_meta(1, 8).model_copy(update={"num_classes": 10})
    images = np.zeros((8, 8, 8, 1), np.uint8)
    labels = np.array([3, 3, 0, 1, 3, 2, 2, 2])
    error = error_rate(AlwaysThree(), images, labels, meta, 8, 3, torch.device("cpu"))
    assert error == pytest.approx(5 / 8)


def test_classifier_of_another_dataset_is_refused(workspace: tuple[Params, Path]) -> None:
    params, root = workspace
    model, spec = build_classifier(ModelParams(**TINY_VIT), 16, 1, 10, 0.0)
    info = {"classes": [str(i) for i in range(10)], "dataset": "fashion_mnist"}
    save_classifier(model, spec, info, root / "results/finetune/mfm/classifier.pt")
    with pytest.raises(UserError, match="trained on 'fashion_mnist'.*rerun finetune"):
        run(params, root / "data/prepared", root / "data/corrupted", root / "results/finetune")


def test_imagenet_benchmarks_need_an_imagenet_classifier(
    workspace: tuple[Params, Path],
) -> None:
    params, root = workspace
    (root / "imagenet-a").mkdir()
    params.robustness.imagenet_a = str(root / "imagenet-a")
    with pytest.raises(UserError, match="ImageNet-1k classifiers, but this one has 10 classes"):
        run(
            params,
            root / "data/prepared",
            root / "data/corrupted",
            root / "results/finetune",
            root / "results/robustness",
        )


def test_an_empty_corrupted_set_reports_no_corruption_scores(
    workspace: tuple[Params, Path],
) -> None:
    # What the corrupt stage writes for image-folder data (ImageNet uses the released sets).
    params, root = workspace
    empty = root / "data/empty"
    build(np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64), [], [1], 0, empty, 1)
    reports = run(
        params, root / "data/prepared", empty, root / "results/finetune", root / "results/r"
    )
    assert reports == {
        "mfm": {"init": "mfm", "num_images": 0},
        "scratch": {"init": "scratch", "num_images": 0},
    }
    assert (root / "results/r/mfm/heatmap.png").read_bytes()[:4] == b"\x89PNG"
