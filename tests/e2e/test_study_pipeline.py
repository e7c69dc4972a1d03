"""The pretext study, shrunk: four pretexts through both engines, one table."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.e2e.conftest import Project

pytestmark = pytest.mark.e2e
# Eight training runs per engine: smaller still than the main job's tiny config.
SMALLER = {
    "data": {"train_limit": 400, "test_limit": 200},
    "linprobe": {"train_limit": 200},
    "robustness": {"num_images": 8, "severities": [1]},
}


def test_dvc_and_snakemake_produce_the_same_study_table(
    make_project: Callable[..., Project],
) -> None:
    by_dvc = make_project(SMALLER, name="dvc")
    ran = by_dvc.run("dvc", "repro", "study/dvc.yaml").stdout
    for pretext in ("mfm", "sr", "deblur", "denoise"):
        assert f"Running stage 'study/dvc.yaml:study_pretrain@{pretext}'" in ran
    assert "Running stage 'study/dvc.yaml:study'" in ran
    assert "Running stage 'finetune@scratch'" in ran  # the shared baseline
    assert "Running stage 'finetune@mfm'" not in ran  # the main job is not needed
    study = json.loads((by_dvc.path / "metrics/study.json").read_text())
    assert set(study["pretexts"]) == {"mfm", "sr", "deblur", "denoise"}
    assert study["baseline"]["mce"] == pytest.approx(100.0)
    table = (by_dvc.path / "results/study/study.md").read_text()
    assert table.count("\n") == 2 + 4 + 1
    assert (by_dvc.path / "results/study/study.png").is_file()
    shown = json.loads(by_dvc.run("dvc", "metrics", "show", "--json").stdout)
    assert "metrics/study.json" in json.dumps(shown)
    assert "Running stage" not in by_dvc.run("dvc", "repro", "study/dvc.yaml").stdout

    by_snakemake = make_project(SMALLER, name="snakemake")
    by_snakemake.run("snakemake", "--cores", "2", "study")
    assert (by_snakemake.path / "results/study/study.md").read_text() == table
