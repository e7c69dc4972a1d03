"""The study stage: per-pretext metrics collected into one table, chart and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mfm.cli import main
from mfm.errors import UserError
from mfm.figures import plt
from mfm.study import LOSS_TSV, PRETEXTS, chart, collect, table


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fake_study(root: Path) -> None:
    """Metrics as the study's stages write them: pretext i gets probe 70 + i, etc."""
    for i, pretext in enumerate(PRETEXTS):
        metrics = root / "results/study" / pretext / "metrics"
        _write(
            metrics / "linprobe.json",
            {
                "pretrained": {"logreg_top1": 70.0 + i, "knn_top1": 60.0 + i},
                "random": {"logreg_top1": 65.0, "knn_top1": 55.0},
            },
        )
        _write(metrics / "finetune_mfm.json", {"init": "mfm", "top1": 80.0 + i})
        _write(metrics / "robustness_mfm.json", {"clean_error": 20.0 - i, "mce": 90.0 - i})
        _write(metrics / "robustness_scratch.json", {"clean_error": 25.0, "mce": 100.0})
        run = root / "results/study" / pretext
        _curve(run / "pretrain" / LOSS_TSV, 1.0 + i)
        _curve(run / "finetune/mfm" / LOSS_TSV, 2.0 + i)
        plt.imsave(run / "pretrain/reconstruction.png", np.full((20, 60, 3), 0.2 * i))
    _write(root / "metrics/finetune_scratch.json", {"init": "scratch", "top1": 75.0})
    _curve(root / "results/finetune/scratch" / LOSS_TSV, 3.0)


def _curve(path: Path, start: float) -> None:
    """A dvclive loss TSV: step and loss columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{10 * k}\t{start / k}\n" for k in range(1, 6))
    path.write_text("step\tloss\n" + rows)


def test_collects_every_pretext_and_the_baseline(tmp_path: Path) -> None:
    fake_study(tmp_path)
    study = collect(tmp_path / "results/study", tmp_path)
    assert list(study["pretexts"]) == list(PRETEXTS) == ["mfm", "sr", "deblur", "denoise"]
    assert study["pretexts"]["sr"] == {
        "probe_top1": 71.0,
        "knn_top1": 61.0,
        "finetune_top1": 81.0,
        "clean_error": 19.0,
        "mce": 89.0,
    }
    assert study["baseline"] == {
        "probe_top1": 65.0,
        "knn_top1": 55.0,
        "finetune_top1": 75.0,  # the main job's scratch classifier
        "clean_error": 25.0,
        "mce": 100.0,
    }
    lines = table(study).splitlines()
    assert lines[0].startswith("| pretext | linear probe top-1 | k-NN top-1 | fine-tune top-1")
    assert lines[4] == "| deblur | 72.00 | 62.00 | 82.00 | 18.00 | 88.00 |"
    assert lines[-1] == "| random init / scratch | 65.00 | 55.00 | 75.00 | 25.00 | 100.00 |"
    chart(study, tmp_path / "study.png", "test")
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_pretext_names_the_command_that_makes_it(tmp_path: Path) -> None:
    fake_study(tmp_path)
    (tmp_path / "results/study/deblur/metrics/finetune_mfm.json").unlink()
    with pytest.raises(UserError, match=r"deblur/metrics lacks finetune .*dvc repro study"):
        collect(tmp_path / "results/study", tmp_path)


def test_the_cli_writes_json_table_and_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_study(tmp_path)
    (tmp_path / "params.yaml").write_text("data:\n  dataset: digits\n")
    monkeypatch.chdir(tmp_path)
    assert main(["study"]) == 0
    stored = json.loads((tmp_path / "metrics/study.json").read_text())
    assert stored["pretexts"]["denoise"]["finetune_top1"] == 83.0
    assert (tmp_path / "results/study/study.md").read_text() == table(stored)
    for figure in ("study.png", "curves.png", "reconstructions.png"):
        assert (tmp_path / "results/study" / figure).read_bytes()[:4] == b"\x89PNG"


def test_missing_curves_are_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_study(tmp_path)
    (tmp_path / "results/study/sr/pretrain" / LOSS_TSV).unlink()
    (tmp_path / "params.yaml").write_text("data:\n  dataset: digits\n")
    monkeypatch.chdir(tmp_path)
    assert main(["study"]) == 2
    assert "sr/pretrain/live/plots/metrics/train/loss.tsv not found" in capsys.readouterr().err
