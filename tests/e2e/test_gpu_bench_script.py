"""workflow/scripts/gpu-bench.sh, the one call that measures the GPU rows, runs every row (a
CPU smoke run at 32 px, compile rows eager) and prints their table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mfm import throughput
from tests.e2e.conftest import ROOT, Project

pytestmark = pytest.mark.e2e

ROWS = {
    "vit_b16": "vit_base_patch16_224",
    "vit_b16_compile": "vit_base_patch16_224",
    "vit_b16_jpeg_pil": "vit_base_patch16_224",
    "vit_b16_jpeg_device": "vit_base_patch16_224",
    "resnet50_channels_last": "resnet50",
    "resnet50_compile": "resnet50",
}
SMOKE = {
    "DEVICE": "cpu",
    "BATCH": "2",
    "STEPS": "1",
    "WARMUP": "0",
    "IMAGES": "16",
    "IMG_SIZE": "32",
    "COMPILE": "",
}


def test_every_row_runs_and_lands_in_the_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu-bench"
    runner = Project(ROOT)  # reads the project's params.yaml, writes only under tmp_path
    runner.env.update(SMOKE)
    done = runner.run("bash", "workflow/scripts/gpu-bench.sh", str(out), timeout=900)
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(ROWS)
    for name, model in ROWS.items():
        row = json.loads((out / f"{name}.json").read_text())
        assert (row["model"], row["img_size"], row["batch_size"]) == (model, 32, 2)
        assert row["device"] == "cpu" and row["images_per_second"] > 0
        assert row["channels_last"] is name.startswith("resnet50")
        fed = "jpeg" in name
        assert (row["data"] is not None) is fed
        if fed:
            assert row["data"] == str((out / "jpegs").resolve()) and row["data_images"] == 16
            assert row["loader"] == name.rpartition("_")[2]  # pil or device
            assert row["end_to_end_over_synthetic"] > 0
        assert set(throughput.DATA_KEYS) <= set(row)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(ROWS)  # the header, then one line per row
    assert all(any(line.startswith(f"| {name} (") for line in table) for name in ROWS)
