"""The main job on the user's own photos: every stage through DVC on a tiny image folder."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import Project
from tests.photos import write_photos

pytestmark = pytest.mark.e2e

NUM_IMAGES, SEVERITIES, CORRUPTIONS = 8, [1, 3], 15


def test_dvc_repro_scores_robustness_on_an_image_folder(
    make_project: Callable[..., Project], tmp_path: Path
) -> None:
    photos = write_photos(tmp_path / "photos", {"train": 16, "val": 6})
    project = make_project(
        {
            "data": {"dataset": "imagefolder", "root": str(photos), "img_size": 16},
            "pretrain": {"batch_size": 16},
            "finetune": {"batch_size": 16},
            "robustness": {"num_images": NUM_IMAGES, "severities": SEVERITIES},
        }
    )
    project.run("dvc", "repro")

    corrupt = json.loads((project.path / "metrics/corrupt.json").read_text())
    assert corrupt["images_written"] == CORRUPTIONS * len(SEVERITIES) * NUM_IMAGES
    clean = np.load(project.path / "data/corrupted/clean.npy")
    assert clean.shape == (NUM_IMAGES, 16, 16, 3)
    for init in ("mfm", "scratch"):
        report = json.loads((project.path / f"metrics/robustness_{init}.json").read_text())
        assert report["num_images"] == NUM_IMAGES
        assert math.isfinite(report["clean_error"]) and math.isfinite(report["mce"]), init
        assert len(report["errors"]) == CORRUPTIONS
        assert (project.path / f"results/robustness/{init}/heatmap.png").is_file()
    scratch = json.loads((project.path / "metrics/robustness_scratch.json").read_text())
    assert scratch["mce"] == pytest.approx(100.0)
