"""The main job, shrunk: every stage through DVC and Snakemake on digits."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.e2e.conftest import Project, new_project

pytestmark = pytest.mark.e2e

OUTPUTS = [
    "data/prepared/meta.json",
    "data/prepared/train_images.npy",
    "results/pretrain/encoder.pt",
    "results/pretrain/reconstruction.png",
    "metrics/prepare.json",
    "metrics/pretrain.json",
    "metrics/linprobe.json",
    "metrics/finetune_mfm.json",
    "metrics/finetune_scratch.json",
    "results/finetune/mfm/classifier.pt",
    "results/finetune/scratch/predictions.csv",
    "metrics/scenes.json",
    "data/scenes/classes.txt",
    "metrics/segment_mfm.json",
    "metrics/segment_scratch.json",
    "results/segment/mfm/model.pt",
    "results/segment/scratch/overlay.png",
    "metrics/corrupt.json",
    "data/corrupted/glass_blur.npy",
    "metrics/robustness_mfm.json",
    "metrics/robustness_scratch.json",
    "results/robustness/mfm/heatmap.png",
    "results/export/model.onnx",
    "metrics/export.json",
]
STAGES = (
    "prepare",
    "pretrain",
    "linprobe",
    "finetune_mfm",
    "finetune_scratch",
    "scenes",
    "segment_mfm",
    "segment_scratch",
    "corrupt",
    "robustness_mfm",
    "robustness_scratch",
    "export",
)


def metrics(project: Project, stage: str) -> dict:
    return json.loads((project.path / "metrics" / f"{stage}.json").read_text())


TIMING_KEYS = {
    "images_per_second",
    "eval_images_per_second",
    "seconds",
    "train_seconds",
    "latency",
}


def untimed(stage_metrics: dict) -> dict:
    """A stage's metrics without the wall-clock ones, which no seed can fix."""
    return {key: value for key, value in stage_metrics.items() if key not in TIMING_KEYS}


@dataclass(frozen=True)
class DvcRun:
    """The main job's one shared ``dvc repro``: the project, what it printed, and every
    stage's metrics as that run left them (tests may change the project afterwards)."""

    project: Project
    stdout: str
    metrics: dict[str, dict]


@pytest.fixture(scope="module")
def dvc_run(tmp_path_factory: pytest.TempPathFactory) -> DvcRun:
    project = new_project(tmp_path_factory.mktemp("dvc") / "project")
    first = project.run("dvc", "repro")
    return DvcRun(project, first.stdout, {stage: metrics(project, stage) for stage in STAGES})


def test_dvc_repro_caches_and_reruns_only_what_changed(dvc_run: DvcRun) -> None:
    project, first = dvc_run.project, dvc_run.stdout
    for stage in (
        "prepare",
        "pretrain",
        "linprobe",
        "finetune@mfm",
        "finetune@scratch",
        "scenes",
        "segment@mfm",
        "segment@scratch",
        "corrupt",
        "robustness",
        "export",
    ):
        assert f"Running stage '{stage}'" in first
    export = metrics(project, "export")
    assert export["top1_agreement"] == 100.0 and export["max_abs_diff"] <= 1e-4
    assert metrics(project, "robustness_scratch")["mce"] == pytest.approx(100.0)
    for rel in OUTPUTS:
        assert (project.path / rel).is_file(), rel
    pretrain = metrics(project, "pretrain")
    assert pretrain["epochs"] == 1 and pretrain["final_loss"] > 0
    assert (project.path / "results/pretrain/live/plots/metrics/train/loss.tsv").is_file()
    blob = torch.load(project.path / "results/pretrain/encoder.pt", weights_only=True)
    assert blob["spec"]["name"] == "vit_tiny_patch16_224"

    again = project.run("dvc", "repro")
    assert "Running stage" not in again.stdout
    assert "up to date" in project.run("dvc", "status", "dvc.yaml").stdout

    # The models are artifacts: fetched by name from the repository, as a deployer does.
    project.commit("tiny run")
    project.run("git", "tag", "-a", "mfm-onnx@v0.1.0", "-m", "register the tiny model")
    fetched = project.path.parent / "fetched.onnx"
    project.run("dvc", "artifacts", "get", str(project.path), "mfm-onnx", "-o", str(fetched))
    assert fetched.read_bytes() == (project.path / "results/export/model.onnx").read_bytes()
    png = project.path.parent / "digit.png"
    Image.fromarray(np.load(project.path / "data/prepared/test_images.npy")[0, ..., 0]).save(png)
    shown = project.run("python", "-m", "mfm", "predict", str(png), "--model", str(fetched))
    assert shown.stdout.startswith(str(png))

    project.set_params({"pretrain": {"lr": 3e-3}})
    changed = project.run("dvc", "repro")
    assert "Running stage 'prepare'" not in changed.stdout
    assert "Running stage 'corrupt'" not in changed.stdout  # model-independent, built once
    assert "Running stage 'pretrain'" in changed.stdout
    shown = project.run("dvc", "params", "diff").stdout
    assert "pretrain.lr" in shown


def test_snakemake_writes_the_same_outputs(
    dvc_run: DvcRun, make_project: Callable[..., Project]
) -> None:
    by_snakemake = make_project(name="snakemake")
    by_snakemake.run("snakemake", "--cores", "2")
    for rel in OUTPUTS:
        assert (by_snakemake.path / rel).is_file(), rel
    # Same seed, same machine: the same numbers, to the last bit, in every stage but the clocks.
    for stage in STAGES:
        assert untimed(metrics(by_snakemake, stage)) == untimed(dvc_run.metrics[stage]), stage
    again = by_snakemake.run("snakemake", "--cores", "2")
    assert "Nothing to be done" in again.stdout + again.stderr


def _pretrain_pid(project: Project) -> int | None:
    import psutil

    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "mfm" in cmdline and "pretrain" in cmdline and proc.info["cwd"] == str(project.path):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killed_pretrain_resumes_from_checkpoint(make_project: Callable[..., Project]) -> None:
    project = make_project({"pretrain": {"epochs": 30, "checkpoint_every": 1}})
    project.run("dvc", "repro", "prepare")
    checkpoint = project.path / "results/pretrain/checkpoint.pt"
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=project.path,
        env=project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _pretrain_pid(project)
    assert pid is not None, "pretrain finished before it could be killed"
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (project.path / "metrics/pretrain.json").exists()
    state = torch.load(checkpoint, weights_only=True)
    assert not state["complete"]

    rerun = project.run("dvc", "repro")
    assert f"resuming from epoch {state['epoch']}" in rerun.stdout + rerun.stderr
    assert metrics(project, "pretrain")["resumed_from_epoch"] == state["epoch"]


def _experiments(shown: list[dict]) -> dict[str, dict]:
    """``dvc exp show --json`` rows (baseline and experiments) keyed by pretext, with the
    metrics files each one reports."""
    rows: dict[str, dict] = {}

    def visit(entry: dict) -> None:
        data = entry.get("data") or {}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        pretext = params.get("pretrain", {}).get("pretext")
        if pretext and data.get("metrics"):
            rows[pretext] = {path: m.get("data", {}) for path, m in data["metrics"].items()}
        for child in entry.get("experiments") or []:
            for revision in child.get("revs") or []:
                visit(revision)

    for entry in shown:
        visit(entry)
    return rows


def test_experiment_with_another_pretext_is_diffable(dvc_run: DvcRun) -> None:
    project = dvc_run.project  # whatever an earlier test left: reproduced, then committed
    project.run("dvc", "repro")
    project.commit("baseline run")
    project.run("dvc", "exp", "run", "-S", "pretrain.pretext=sr", "--name", "sr-pretext")

    shown = _experiments(json.loads(project.run("dvc", "exp", "show", "--json").stdout))
    assert {"mfm", "sr"} <= set(shown)
    for pretext in ("mfm", "sr"):
        assert shown[pretext]["metrics/pretrain.json"]["pretext"] == pretext
        assert "top1" in shown[pretext]["metrics/finetune_mfm.json"]
        assert "gain" in shown[pretext]["metrics/linprobe.json"]
    # scratch does not depend on the pretext: same recipe, same seed, same number
    assert (
        shown["sr"]["metrics/finetune_scratch.json"]["top1"]
        == shown["mfm"]["metrics/finetune_scratch.json"]["top1"]
    )

    diff = json.loads(project.run("dvc", "metrics", "diff", "--json").stdout)
    assert "metrics/pretrain.json" in diff
    assert (
        diff["metrics/pretrain.json"]["final_loss"]["old"]
        != (diff["metrics/pretrain.json"]["final_loss"]["new"])
    )
    params = project.run("dvc", "params", "diff").stdout
    assert "pretrain.pretext" in params and "sr" in params


def test_a_shared_remote_gives_a_fresh_clone_every_result_without_rerunning(
    dvc_run: DvcRun, tmp_path: Path
) -> None:
    """A team's remote: push from one clone, pull in another, and nothing retrains there.
    Resumable checkpoints are not outputs, so they are neither pushed nor missed."""
    project = dvc_run.project  # whatever an earlier test left: reproduced, then committed
    project.run("dvc", "repro")
    project.commit("results to share")
    remote = tmp_path / "remote"
    project.run("dvc", "remote", "add", "--default", "team", str(remote))
    project.commit("the team's remote")
    project.run("dvc", "push", "dvc.yaml")  # the main job (study/dvc.yaml: the study)
    pushed = {p.name for p in remote.rglob("*") if p.is_file()}
    assert pushed, "nothing was pushed"

    clone = Project(tmp_path / "clone")
    clone.env = project.env
    project.run("git", "clone", "-q", str(project.path), str(clone.path))
    clone.run("dvc", "pull", "dvc.yaml")
    for rel in OUTPUTS:
        assert (clone.path / rel).is_file(), rel
    assert not (clone.path / "results/pretrain/checkpoint.pt").exists()
    assert "up to date" in clone.run("dvc", "status", "dvc.yaml").stdout
    again = clone.run("dvc", "repro", "dvc.yaml")
    assert "Running stage" not in again.stdout
    # Snakemake in the pulled clone: --touch takes the pulled files as its own, then nothing
    # is left to do, and its markers in directory outputs do not disturb DVC.
    clone.run("snakemake", "--touch", "--cores", "1")
    planned = clone.run("snakemake", "-n")
    assert "Nothing to be done" in planned.stdout + planned.stderr
    assert "up to date" in clone.run("dvc", "status", "dvc.yaml").stdout
    same = "results/pretrain/encoder.pt", "results/export/model.onnx", "data/corrupted/info.json"
    for rel in same:
        assert (clone.path / rel).read_bytes() == (project.path / rel).read_bytes(), rel


def _queue_done(project: Project, wanted: int, timeout: float = 900) -> str:
    """``dvc queue status`` once ``wanted`` queued experiments have ended (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        status = project.run("dvc", "queue", "status").stdout
        ended = status.count("Success") + status.count("Failed")
        if ended >= wanted or time.monotonic() > deadline:
            return status
        time.sleep(2)


def test_a_queued_grid_runs_in_parallel_without_clobbering_and_reads_back(
    dvc_run: DvcRun,
) -> None:
    """``dvc exp run --queue`` with a two-value grid, two workers at once: each experiment
    trains in its own workspace (its own checkpoint and dvclive folder), and exp show,
    metrics and plots give both back."""
    project = dvc_run.project  # whatever an earlier test left: reproduced, then committed
    project.run("dvc", "repro")
    project.commit("baseline for the sweep")
    project.run(
        "dvc", "exp", "run", "--queue", "linprobe",
        "-S", "pretrain.pretext=mfm", "-S", "pretrain.mask.radius=2,6",
    )  # fmt: skip
    project.run("dvc", "queue", "start", "-j", "2")
    status = _queue_done(project, 2)
    project.run("dvc", "queue", "stop", check=False)
    assert status.count("Success") == 2, status

    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    runs: dict[int, dict] = {}
    for entry in shown:
        for child in entry.get("experiments") or []:
            for revision in child.get("revs") or []:
                data = revision.get("data") or {}
                params = data["params"]["params.yaml"]["data"]["pretrain"]
                runs[params["mask"]["radius"]] = {"name": revision["name"], **data}
    assert set(runs) >= {2, 6}, sorted(runs)
    losses = {r: runs[r]["metrics"]["metrics/pretrain.json"]["data"]["final_loss"] for r in (2, 6)}
    assert losses[2] != losses[6]  # two different runs, not one result twice
    for radius in (2, 6):
        assert "top1" in json.dumps(runs[radius]["metrics"]["metrics/linprobe.json"]["data"])

    names = [runs[2]["name"], runs[6]["name"]]
    changed = project.run("dvc", "exp", "show", "--only-changed", "--csv").stdout
    header = changed.splitlines()[0].split(",")
    assert "pretrain.mask.radius" in header and "pretrain.epochs" not in header
    plots = project.run("dvc", "plots", "diff", *names, "--json").stdout
    assert "train/loss.tsv" in plots and all(name in plots for name in names)
