"""The SLURM profile, end to end, against stand-in SLURM commands on this machine.

``tests/e2e/fake_slurm/`` answers sbatch, sacct, srun, ... the way a cluster would and runs
each submitted job here, so ``snakemake --profile profiles/slurm`` goes through the
real executor plugin: account check, one sbatch per job with the profile's resources,
status polling, then the job step (srun) that runs the rule. The GPU rules ask for the
profile's GPUs and start torchrun with one process per GPU; torchrun on one CPU process
trains as plain python would, so the tiny job needs no GPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.e2e.conftest import Project
from tests.e2e.test_pretrain_pipeline import OUTPUTS, STAGES

pytestmark = pytest.mark.e2e
pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")

FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"
PROFILE = "profiles/slurm"
GPU_RULES = ("pretrain", "finetune", "segment")
# The job names the plugin gives sbatch's --comment: rule_<rule>[_wildcards_<values>].
JOBS = {
    "rule_prepare": "prepare",
    "rule_pretrain": "pretrain",
    "rule_linprobe": "linprobe",
    "rule_finetune_wildcards_mfm": "finetune",
    "rule_finetune_wildcards_scratch": "finetune",
    "rule_scenes": "scenes",
    "rule_segment_wildcards_mfm": "segment",
    "rule_segment_wildcards_scratch": "segment",
    "rule_corrupt": "corrupt",
    "rule_robustness": "robustness",
    "rule_export": "export",
}


def submit_options(argv: list[str]) -> dict[str, str]:
    """sbatch's arguments as {option: value} ('' for a flag), --wrap left out."""
    opts: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg.startswith("--wrap"):
            continue
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif arg in ("--job-name", "--output", "--comment", "-A", "-p", "-t", "--mem", "-D"):
            key, value = arg, next(args)
        else:
            key, value = arg, ""
        opts[key] = value
    return opts


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_slurm_profile_submits_one_job_per_rule_with_its_resources(
    make_project: Callable[..., Project], tmp_path: Path
) -> None:
    project = make_project()
    log = tmp_path / "slurm_calls.jsonl"
    project.env.update(
        PATH=f"{FAKE_SLURM}{os.pathsep}{project.env['PATH']}",
        FAKE_SLURM_LOG=str(log),
        FAKE_SLURM_ACCOUNTS="test",
        FAKE_SLURM_PARTITIONS="cpu*,short,gpu",  # cpu is the default: short must be asked for
        FAKE_SLURM_SYNC="1",  # sbatch returns when the job has run: no polling back-off
    )
    # The README's command (with a CPU partition that is not the default); then, for a 2-core
    # machine: two jobs at a time, the first status check after 1 s instead of 40, and the
    # SLURM logs of successful jobs kept.
    command = (
        "snakemake",
        "--profile",
        PROFILE,
        "--default-resources",
        "slurm_account=test",
        "slurm_partition=short",
        "--jobs",
        "2",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
    )
    project.run(*command)

    for rel in OUTPUTS:
        assert (project.path / rel).is_file(), rel
    for stage in STAGES:
        assert json.loads((project.path / f"metrics/{stage}.json").read_text()), stage

    assert any(c.get("cmd") == "sacctmgr" for c in calls(log))  # the account was checked
    submitted = [c for c in calls(log) if c.get("cmd") == "sbatch"]
    assert sorted(c["comment"] for c in submitted) == sorted(JOBS)  # one sbatch per job
    wanted = yaml.safe_load((project.path / PROFILE / "profile.yaml").read_text())["set-resources"]
    job_name = submitted[0]["name"]
    logs = project.path.resolve() / ".snakemake/slurm_logs"
    for call in submitted:
        rule = JOBS[call["comment"]]
        res = wanted[rule]
        opts = submit_options(call["argv"])
        assert "--parsable" in opts and opts["--job-name"] == job_name  # the run's uuid
        assert Path(opts["-D"]).resolve() == project.path.resolve()
        assert Path(opts["--output"]).resolve().is_relative_to(logs / f"rule_{rule}"), rule
        assert opts["-A"] == "test", rule
        assert opts["-p"] == res.get("slurm_partition", "short"), rule
        assert opts["-t"] == str(res["runtime"]), rule
        assert opts["--mem"] == str(res["mem_mb"]), rule
        if rule in GPU_RULES:
            assert opts["--gpus"] == str(res["gpu"]), rule
            assert opts["--cpus-per-gpu"] == str(res["cpus_per_gpu"]), rule
            assert res["slurm_extra"].strip("'\"") in call["argv"], rule
            assert "--cpus-per-task" not in opts and "--ntasks" not in opts, rule
        else:
            assert opts["--cpus-per-task"] == str(res["cpus_per_task"]), rule
            assert opts["--ntasks"] == "1", rule
            assert "--gpus" not in opts and "--gres" not in opts, rule

    # Inside each job, the plugin's job step asks srun for the same GPUs and CPUs.
    steps = {c["job_id"]: c["argv"] for c in calls(log) if c.get("cmd") == "srun"}
    for call in submitted:
        rule = JOBS[call["comment"]]
        step = steps[call["job_id"]]
        if rule in GPU_RULES:
            assert f"--gpus={wanted[rule]['gpu']}" in step, step[:8]
            assert f"--cpus-per-gpu={wanted[rule]['cpus_per_gpu']}" in step, step[:8]
        else:
            assert f"--cpus-per-task={wanted[rule]['cpus_per_task']}" in step, step[:8]
    # ... and the rule starts torchrun with one process per GPU (the job's SLURM log).
    pretrain = next(c for c in submitted if c["comment"] == "rule_pretrain")
    slurm_log = logs / f"rule_pretrain/{pretrain['job_id']}.log"
    nproc = wanted["pretrain"]["gpu"]
    assert f"torchrun --standalone --nproc-per-node={nproc} -m mfm pretrain" in (
        slurm_log.read_text()
    )

    again = project.run(*command)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert len([c for c in calls(log) if c.get("cmd") == "sbatch"]) == len(JOBS)


def test_fake_slurm_answers_in_the_formats_the_plugin_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-ins, read by the plugin's own parsers: job ids, states, accounts, partitions."""
    from snakemake_executor_plugin_slurm.accounts import validate_account
    from snakemake_executor_plugin_slurm.job_status_query import (
        get_min_job_age,
        query_job_status,
        query_job_status_sacct,
        query_job_status_squeue,
    )
    from snakemake_executor_plugin_slurm.partitions import get_default_partition
    from snakemake_executor_plugin_slurm.validation import validate_or_get_slurm_job_id
    from snakemake_interface_common.exceptions import WorkflowError

    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_SLURM_ACCOUNTS", "test,other")
    monkeypatch.delenv("FAKE_SLURM_SYNC", raising=False)
    logger = logging.getLogger("test_slurm")

    def submit(command: str) -> str:
        out = subprocess.run(
            f"sbatch --parsable --job-name run1 --output {tmp_path}/%j.log -D {tmp_path}"
            f' --wrap="{command}"',
            shell=True,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return validate_or_get_slurm_job_id(out.strip().split(";")[0], out)

    def states(query: str) -> dict[str, str]:
        return asyncio.run(query_job_status(query, logger))[0]

    done, failed, slow = submit(r"echo \$SLURM_JOB_ID"), submit("exit 3"), submit("sleep 60")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = states(query_job_status_sacct("run1"))
        if now.get(done) == "COMPLETED" and now.get(failed) == "FAILED":
            break
        time.sleep(0.1)
    assert now == {done: "COMPLETED", failed: "FAILED", slow: "RUNNING"}
    assert states(query_job_status_squeue("run1")) == now
    assert states(query_job_status_sacct("another-run")) == {}
    assert (tmp_path / f"{done}.log").read_text().strip() == done

    subprocess.run(["scancel", slow], check=True)
    deadline = time.monotonic() + 30
    while states(query_job_status_sacct("run1"))[slow] != "CANCELLED":
        assert time.monotonic() < deadline, "scancel did not end the job"
        time.sleep(0.1)

    assert validate_account("other", logger) == "other"
    with pytest.raises(WorkflowError, match="appears to be invalid"):
        validate_account("nope", logger)
    assert get_default_partition("job", logger) == "cpu"
    assert get_min_job_age() == 300


# The README's block for a training rule on several nodes (GPUs per node in gres), as the
# profile's pretrain entry holds it with gpu left out.
TWO_NODES = {"nodes": 2, "tasks": 2, "mpi": "srun", "tasks_per_gpu": 0, "gres": "gpu:1"}


def test_pretrain_on_two_nodes_trains_what_two_processes_on_one_node_train(
    make_project: Callable[..., Project], tmp_path: Path
) -> None:
    """2 stand-in nodes x 1 process: one sbatch for both nodes, one srun task per node, each a
    torchrun agent at a c10d rendezvous on the batch host; the weights are those of
    ``torchrun --standalone --nproc-per-node 2`` on one node."""
    project = make_project()
    profile = yaml.safe_load((project.path / PROFILE / "profile.yaml").read_text())
    pretrain = {k: v for k, v in profile["set-resources"]["pretrain"].items() if k != "gpu"}
    profile["set-resources"]["pretrain"] = {**pretrain, **TWO_NODES}
    (project.path / "profiles/two-nodes").mkdir()
    (project.path / "profiles/two-nodes/profile.yaml").write_text(yaml.safe_dump(profile))
    log = tmp_path / "slurm_calls.jsonl"
    project.env.update(
        PATH=f"{FAKE_SLURM}{os.pathsep}{project.env['PATH']}",
        FAKE_SLURM_LOG=str(log),
        FAKE_SLURM_SYNC="1",
    )
    project.run(
        "snakemake",
        "--profile",
        "profiles/two-nodes",
        "--default-resources",
        "slurm_account=test",
        "slurm_partition=cpu",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
        "--",
        "pretrain",
    )
    metrics = json.loads((project.path / "metrics/pretrain.json").read_text())
    assert metrics["processes"] == 2

    job = next(c for c in calls(log) if c.get("comment") == "rule_pretrain")
    opts = submit_options(job["argv"])
    assert opts["--nodes"] == "2" and opts["--ntasks"] == "2" and opts["--gres"] == "gpu:1"
    assert "--gpus" not in opts and "--ntasks-per-gpu" not in opts
    steps = [
        c["argv"] for c in calls(log) if c.get("cmd") == "srun" and c["job_id"] == job["job_id"]
    ]
    assert len(steps) == 1, steps  # the rule's own step, not the plugin's one-task step
    step = steps[0]
    assert "--nodes=2" in step and "--ntasks-per-node=1" in step and "--kill-on-bad-exit=1" in step
    launcher = step[step.index("torchrun") :]
    assert "--nnodes=2" in launcher and "--nproc-per-node=1" in launcher
    assert "--rdzv-backend=c10d" in launcher and launcher[-3:] == ["-m", "mfm", "pretrain"]
    assert any(arg == f"--rdzv-id=mfm-{job['job_id']}" for arg in launcher)

    # One node, two processes, with the threads Snakemake gave the job (its OMP_NUM_THREADS).
    job_log = (
        project.path / f".snakemake/slurm_logs/rule_pretrain/{job['job_id']}.log"
    ).read_text()
    project.env["OMP_NUM_THREADS"] = re.findall(r"threads: (\d+)", job_log)[-1]
    torchrun = ("python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    project.run(*torchrun, "-m", "mfm", "pretrain", "--out", "one-node")
    nodes = torch.load(project.path / "results/pretrain/encoder.pt", weights_only=True)
    one = torch.load(project.path / "one-node/pretrain/encoder.pt", weights_only=True)
    assert nodes["spec"] == one["spec"] and nodes["state_dict"].keys() == one["state_dict"].keys()
    for key, value in one["state_dict"].items():
        assert torch.equal(nodes["state_dict"][key], value), key
    assert json.loads((project.path / "one-node/metrics/pretrain.json").read_text())[
        "final_loss"
    ] == pytest.approx(metrics["final_loss"], abs=0)


def test_fake_srun_runs_a_task_per_node_and_a_failed_task_ends_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "calls.jsonl"))
    step = ("srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "sh", "-c")
    both = subprocess.run(
        [*step, "echo $SLURM_NODEID/$SLURM_NNODES"], capture_output=True, text=True
    )
    assert both.returncode == 0 and sorted(both.stdout.split()) == ["0/2", "1/2"]
    started = time.monotonic()
    lost = subprocess.run([*step, '[ "$SLURM_NODEID" = 0 ] && exit 3; sleep 60'])
    assert lost.returncode == 3 and time.monotonic() - started < 30  # node 1 did not wait
