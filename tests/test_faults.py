"""SIGTERM during a training stage: a checkpoint, exit 143, no half-written outputs, and a
rerun that ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mfm.config import Params
from mfm.prepare import run as prepare
from mfm.scenes import run as scenes
from tests.conftest import tiny_training_params

TINY = tiny_training_params(4, 3, 32)
STAGES = {
    "pretrain": ("results/pretrain/encoder.pt", "metrics/pretrain.json", "final_loss"),
    "finetune --init mfm": (
        "results/finetune/mfm/classifier.pt",
        "metrics/finetune_mfm.json",
        "top1",
    ),
    "segment --init mfm": (
        "results/segment/mfm/model.pt",
        "metrics/segment_mfm.json",
        "miou",
    ),
}
TIMING = ("images_per_second", "eval_images_per_second", "train_seconds", "resumed_from_epoch")


def _project(root: Path) -> Path:
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    params = Params.model_validate(TINY)
    prepare(params, root / "data/prepared")
    scenes(params, root / "data/prepared", root / "data/scenes")  # segment's data
    return root


def _command(stage: str) -> list[str]:
    return [sys.executable, "-m", "mfm", *stage.split()]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _run(project: Path, stage: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(stage), cwd=project, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _terminate_after_first_epoch(project: Path, stage: str) -> tuple[int, str]:
    """Start the stage, send SIGTERM once it reports its first epoch, wait for it."""
    proc = subprocess.Popen(
        _command(stage), cwd=project, env=_env(), stderr=subprocess.PIPE, text=True
    )
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "epoch 1/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    return proc.wait(timeout=600), "".join(lines)


def _results(project: Path, metrics: str) -> dict:
    values = json.loads((project / metrics).read_text())
    return {k: v for k, v in values.items() if k not in TIMING}


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigterm_checkpoints_and_the_rerun_matches_an_uninterrupted_run(
    tmp_path: Path, stage: str
) -> None:
    output, metrics, _ = STAGES[stage]
    straight = _project(tmp_path / "straight")
    stopped = _project(tmp_path / "stopped")
    if stage != "pretrain":  # both fine-tune from the same encoder
        _run(straight, "pretrain")
        for rel in ("results/pretrain/encoder.pt",):
            (stopped / rel).parent.mkdir(parents=True, exist_ok=True)
            (stopped / rel).write_bytes((straight / rel).read_bytes())
    _run(straight, stage)

    code, stderr = _terminate_after_first_epoch(stopped, stage)
    assert code == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert "stopped by a signal" in last and "rerun to resume" in last
    checkpoint = stopped / Path(output).parent / "checkpoint.pt"
    assert checkpoint.is_file()
    assert not (stopped / output).exists() and not (stopped / metrics).exists()

    rerun = _run(stopped, stage)
    assert "resuming from epoch" in rerun.stderr
    assert _results(stopped, metrics) == _results(straight, metrics)
