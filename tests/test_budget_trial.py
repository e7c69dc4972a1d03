"""workflow/scripts/budget_trial.py: the main job's commands over seeds, summarised by seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_training_params

SCRIPT = Path(__file__).resolve().parents[1] / "workflow/scripts/budget_trial.py"


def trial(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("budget")
    params = tiny_training_params(1, 1, 32)
    params["data"].update(train_limit=64, test_limit=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([sys.executable, "-m", "mfm", "prepare"], cwd=root, check=True)
    return root


def test_runs_both_inits_per_seed_and_pairs_them_by_seed(project: Path) -> None:
    done = trial(project, "--name", "two", "--seeds", "0", "1", "-S", "finetune.epochs=2")
    assert done.returncode == 0, done.stderr
    result = json.loads((project / "results/budget-trial/two/summary.json").read_text())
    assert result["overrides"] == ["finetune.epochs=2"] and result["seeds"] == [0, 1]
    for seed in (0, 1):
        run = project / f"results/budget-trial/two/seed{seed}"
        for init in ("mfm", "scratch"):
            metrics = json.loads((run / f"metrics/finetune_{init}.json").read_text())
            assert metrics["epochs"] == 2  # the override reached the stage
            assert result["per_seed"][str(seed)][f"{init}_top1"] == metrics["top1"]
        assert result["per_seed"][str(seed)]["pretrain_min"] > 0
    differences = [row["mfm_top1"] - row["scratch_top1"] for row in result["per_seed"].values()]
    assert result["mfm_minus_scratch"]["values"] == pytest.approx(differences)
    low, high = result["mfm_minus_scratch"]["ci95"]
    assert low <= result["mfm_minus_scratch"]["mean"] <= high
    assert result["mfm_top1"]["n"] == 2
    assert "mfm - scratch (paired by seed)" in done.stdout


def test_a_failing_stage_names_its_log(project: Path) -> None:
    done = trial(project, "--name", "bad", "--seeds", "0", "-S", "model.name=no_such_model")
    assert done.returncode != 0
    assert "pretrain.log" in done.stderr and "failed" in done.stderr


def test_asks_for_the_prepared_data_first(tmp_path: Path) -> None:
    done = trial(tmp_path, "--name", "x")
    assert done.returncode != 0 and "dvc repro prepare" in done.stderr


def test_refuses_data_overrides_the_prepared_data_would_not_follow(project: Path) -> None:
    done = trial(project, "--name", "d", "-S", "data.train_limit=8")
    assert done.returncode != 0 and "dvc repro prepare" in done.stderr
    assert "data.train_limit=8" in done.stderr
    assert not (project / "results/budget-trial/d").exists()
