"""The study stage: variants x seeds collected into mean +- std, paired differences with
95 % intervals, a table, a chart and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from mfm.cli import main
from mfm.config import Params, StudyParams
from mfm.errors import UserError
from mfm.figures import plt
from mfm.paths import study_run_dir
from mfm.study import LOSS_TSV, chart, collect, table

RUNS = Path("results/study/runs")
VARIANTS = {"mfm": {"pretrain.pretext": "mfm"}, "radius2": {"pretrain.mask.radius": 2}}
# Per seed: the variants' fine-tune top-1 and the scratch classifier's.
FINETUNE = {"mfm": [80.0, 82.0, 84.0], "radius2": [70.0, 70.0, 76.0]}
SCRATCH = [75.0, 76.0, 80.0]


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _curve(path: Path, start: float) -> None:
    """A dvclive loss TSV: step and loss columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{10 * k}\t{start / k}\n" for k in range(1, 6))
    path.write_text("step\tloss\n" + rows)


def study_params(seeds: list[int]) -> Params:
    return Params(study=StudyParams(variants=VARIANTS, seeds=seeds))


def fake_study(root: Path, seeds: list[int], pixels: bool = True) -> None:
    """Metrics as the study's stages write them, for every variant x seed and scratch."""
    for k, seed in enumerate(seeds):
        for i, name in enumerate(VARIANTS):
            run = study_run_dir(name, seed, root / RUNS)
            linprobe = {
                "pretrained": {"logreg_top1": 70.0 + i + k, "knn_top1": 60.0 + i},
                "random": {"logreg_top1": 65.0 + k, "knn_top1": 55.0},
            }
            if pixels:
                linprobe["pixels"] = {"logreg_top1": 84.0 - k, "knn_top1": 80.0}
            _write(run / "metrics/linprobe.json", linprobe)
            _write(run / "metrics/finetune_mfm.json", {"init": "mfm", "top1": FINETUNE[name][k]})
            _write(run / "metrics/robustness_mfm.json", {"clean_error": 20.0 - i, "mce": 90.0 - i})
            _write(run / "metrics/robustness_scratch.json", {"clean_error": 25.0, "mce": 100.0})
            _curve(run / "pretrain" / LOSS_TSV, 1.0 + i)
            _curve(run / "finetune/mfm" / LOSS_TSV, 2.0 + i)
            plt.imsave(run / "pretrain/reconstruction.png", np.full((20, 60, 3), 0.2 * i))
        scratch = study_run_dir("scratch", seed, root / RUNS)
        _write(scratch / "metrics/finetune_scratch.json", {"init": "scratch", "top1": SCRATCH[k]})
        _curve(scratch / "finetune/scratch" / LOSS_TSV, 3.0)


def test_summarises_each_variant_over_seeds_and_pairs_it_with_the_seeds_baseline(
    tmp_path: Path,
) -> None:
    fake_study(tmp_path, [0, 1, 2])
    study = collect(study_params([0, 1, 2]), tmp_path / RUNS)
    assert study["seeds"] == [0, 1, 2]
    mfm = study["variants"]["mfm"]
    assert mfm["overrides"] == {"pretrain.pretext": "mfm"}
    assert mfm["finetune_top1"]["mean"] == pytest.approx(82.0)
    assert mfm["finetune_top1"]["std"] == pytest.approx(2.0)
    assert study["baseline"]["finetune_top1"]["values"] == SCRATCH  # the per-seed scratch runs
    # paired differences 5, 6, 4: mean 5, std 1, t(0.975, 2) = 4.302652729749464
    diff = mfm["difference"]["finetune_top1"]
    half = 4.302652729749464 * 1.0 / math.sqrt(3)
    assert diff["values"] == [5.0, 6.0, 4.0]
    assert diff["ci95"] == pytest.approx([5.0 - half, 5.0 + half])
    # radius2: differences -5, -6, -4: an interval that excludes zero on the other side
    low, high = study["variants"]["radius2"]["difference"]["finetune_top1"]["ci95"]
    assert high < 0
    # the probe is paired with the random init of the same run and seed: 70+k - (65+k) = 5
    probe = mfm["difference"]["probe_top1"]
    assert probe["values"] == [5.0, 5.0, 5.0] and probe["ci95"] == pytest.approx([5.0, 5.0])
    assert study["pixels"]["probe_top1"]["mean"] == pytest.approx(83.0)


def test_table_shows_spreads_intervals_and_reference_rows(tmp_path: Path) -> None:
    fake_study(tmp_path, [0, 1, 2])
    lines = table(collect(study_params([0, 1, 2]), tmp_path / RUNS)).splitlines()
    assert lines[0] == "Mean ± std over 3 seed(s):"
    assert lines[2].startswith("| variant | linear probe top-1 | k-NN top-1 | fine-tune top-1")
    assert (
        lines[4]
        == "| mfm | 71.00 ± 1.00 | 60.00 ± 0.00 | 82.00 ± 2.00 | 20.00 ± 0.00 | 90.00 ± 0.00 |"
    )
    assert lines[6].startswith("| random init / scratch | 66.00 ± 1.00 | 55.00 ± 0.00 | 77.00 ± ")
    assert lines[7] == "| raw pixels (no encoder) | 83.00 ± 1.00 | 80.00 ± 0.00 |  |  |  |"
    assert lines[9].startswith("Difference to random init / scratch, paired by seed")
    assert lines[13].startswith(
        "| mfm | +5.00 [+5.00, +5.00] | +5.00 [+5.00, +5.00] | +5.00 [+2.52, +7.48]"
    )


def test_the_first_variant_meets_each_other_one_head_to_head(tmp_path: Path) -> None:
    fake_study(tmp_path, [0, 1, 2])
    study = collect(study_params([0, 1, 2]), tmp_path / RUNS)
    versus = study["versus_first"]
    assert versus["reference"] == "mfm" and list(versus["differences"]) == ["radius2"]
    # fine-tune: mfm 80, 82, 84 minus radius2 70, 70, 76 = 10, 12, 8, paired by seed
    finetune = versus["differences"]["radius2"]["finetune_top1"]
    half = 4.302652729749464 * 2.0 / math.sqrt(3)
    assert finetune["values"] == [10.0, 12.0, 8.0]
    assert finetune["ci95"] == pytest.approx([10.0 - half, 10.0 + half])
    # mCE: 90 minus 89 every seed
    assert versus["differences"]["radius2"]["mce"]["values"] == [1.0, 1.0, 1.0]
    lines = table(study).splitlines()
    assert lines[-5] == "`mfm` minus each other variant, paired by seed (mean [95 % CI]):"
    assert lines[-1].startswith(
        "| mfm - radius2 | -1.00 [-1.00, -1.00] | -1.00 [-1.00, -1.00] | +10.00 ["
    )


def test_one_variant_has_no_head_to_head(tmp_path: Path) -> None:
    fake_study(tmp_path, [0, 1])
    params = Params(study=StudyParams(variants={"mfm": VARIANTS["mfm"]}, seeds=[0, 1]))
    study = collect(params, tmp_path / RUNS)
    assert study["versus_first"] == {}
    assert "minus each other variant" not in table(study)


def test_one_seed_works_without_intervals(tmp_path: Path) -> None:
    fake_study(tmp_path, [7], pixels=False)
    study = collect(study_params([7]), tmp_path / RUNS)
    assert study["variants"]["mfm"]["finetune_top1"]["std"] is None
    assert study["variants"]["mfm"]["difference"]["finetune_top1"]["ci95"] is None
    assert "pixels" not in study  # older linprobe metrics without the pixel probe
    text = table(study)
    assert "| mfm | 70.00 (1 seed) |" in text and "+5.00 (1 seed)" in text
    chart(study, tmp_path / "study.png", "test")
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_run_names_the_command_that_makes_it(tmp_path: Path) -> None:
    fake_study(tmp_path, [0, 1])
    (study_run_dir("radius2", 1, tmp_path / RUNS) / "metrics/finetune_mfm.json").unlink()
    with pytest.raises(UserError, match=r"radius2/seed1/metrics lacks finetune .*dvc repro study"):
        collect(study_params([0, 1]), tmp_path / RUNS)


def _project(tmp_path: Path, seeds: list[int]) -> None:
    fake_study(tmp_path, seeds)
    params = {"data": {"dataset": "digits"}, "study": {"variants": VARIANTS, "seeds": seeds}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def test_the_cli_writes_json_table_and_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(tmp_path, [0, 1, 2])
    monkeypatch.chdir(tmp_path)
    assert main(["study"]) == 0
    stored = json.loads((tmp_path / "metrics/study.json").read_text())
    assert stored["variants"]["radius2"]["finetune_top1"]["mean"] == pytest.approx(72.0)
    assert (tmp_path / "results/study/study.md").read_text() == table(stored)
    for figure in ("study.png", "curves.png", "reconstructions.png"):
        assert (tmp_path / "results/study" / figure).read_bytes()[:4] == b"\x89PNG"


def test_missing_curves_are_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(tmp_path, [0, 1, 2])
    (study_run_dir("radius2", 0, tmp_path / RUNS) / "pretrain" / LOSS_TSV).unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["study"]) == 2
    err = capsys.readouterr().err
    assert "radius2/seed0/pretrain/live/plots/metrics/train/loss.tsv not found" in err
    assert not (tmp_path / "metrics/study.json").exists()
