"""``python -m mfm report``: the MFM-vs-baseline table from the metrics files."""

from __future__ import annotations

import json
from pathlib import Path

from mfm.cli import main
from mfm.report import table


def _write(root: Path, name: str, data: dict) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / f"{name}.json").write_text(json.dumps(data))


def test_table_pairs_each_stage_with_its_baseline(tmp_path: Path, capsys) -> None:
    _write(
        tmp_path,
        "linprobe",
        {"pretrained": {"logreg_top1": 80.0, "knn_top1": 60.0}, "random": {"logreg_top1": 70.0}},
    )
    _write(tmp_path, "finetune_mfm", {"top1": 90.5})
    _write(tmp_path, "finetune_scratch", {"top1": 88.0})
    _write(tmp_path, "segment_mfm", {"miou": 30.25, "pixel_accuracy": 85.0})
    _write(tmp_path, "segment_scratch", {"miou": 27.0, "pixel_accuracy": 84.5})
    lines = table(tmp_path).splitlines()
    assert "| segmentation mIoU | 30.25 | 27.00 | +3.25 |" in lines
    assert "| segmentation pixel accuracy | 85.00 | 84.50 | +0.50 |" in lines
    assert "| linear probe (logistic regression) top-1 | 80.00 | 70.00 | +10.00 |" in lines
    assert "| fine-tune top-1 | 90.50 | 88.00 | +2.50 |" in lines
    assert not any("k-NN" in line for line in lines)  # the random k-NN is missing
    assert not any("mCE" in line for line in lines)  # robustness has not run
    assert main(["report", "--root", str(tmp_path)]) == 0
    assert "+10.00" in capsys.readouterr().out


def test_table_puts_the_probes_next_to_raw_pixels(tmp_path: Path) -> None:
    scores = {"logreg_top1": 80.0, "knn_top1": 60.0}
    _write(
        tmp_path,
        "linprobe",
        {"pretrained": scores, "random": scores, "pixels": {"logreg_top1": 84.0}},
    )
    lines = table(tmp_path).splitlines()
    assert "| linear probe top-1, baseline: raw pixels | 80.00 | 84.00 | -4.00 |" in lines
    assert not any("k-NN top-1, baseline: raw pixels" in line for line in lines)  # no pixel k-NN
    assert "| weighted k-NN top-1 | 60.00 | 60.00 | +0.00 |" in lines
