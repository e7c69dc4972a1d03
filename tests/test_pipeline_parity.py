"""dvc.yaml and the Snakefile must describe the same pipeline: stages, commands, code and
data deps, params and outputs. Any drift between the two engines fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pipeline_spec import ROOT, dvc_stages


def test_same_stages(snakemake_rules: dict[str, dict[str, Any]]) -> None:
    assert set(dvc_stages()) == set(snakemake_rules)


@pytest.mark.parametrize("field", ["cmd", "deps", "params", "outs"])  # "matrix" is DVC's
def test_same_declarations(snakemake_rules: dict[str, dict[str, Any]], field: str) -> None:
    for name, stage in dvc_stages().items():
        assert stage[field] == snakemake_rules[name][field], f"{name}: {field} differ"


def test_every_stage_command_is_the_cli() -> None:
    """``python -m mfm <stage>`` plus one ``--option {option}`` per matrix dimension, whose
    values are exactly the CLI's choices (and Snakemake's wildcard values)."""
    from mfm.cli import STAGES, VARIANTS

    for name, stage in dvc_stages("dvc.yaml").items():
        assert name in STAGES
        variants = VARIANTS.get(name, {})
        options = "".join(f" --{option} {{{option}}}" for option in variants)
        assert stage["cmd"] == f"python -m mfm {name}{options}"
        assert {k: tuple(v) for k, v in stage["matrix"].items()} == variants


def test_init_wildcards_expand_to_the_cli_choices() -> None:
    """The default target runs finetune and segment once per CLI choice of --init, as DVC's
    matrix does."""
    from mfm.cli import VARIANTS

    out = dry_run("--forceall")
    for rule in ("finetune", "segment"):
        jobs = re.findall(rf"rule {rule}:\n(?:.*\n)*?    wildcards: init=(\w+)", out)
        assert sorted(jobs) == sorted(VARIANTS[rule]["init"]), rule


def dry_run(*args: str) -> str:
    """What ``snakemake -n`` prints for ``args``, run with the venv's tools."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["snakemake", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True, env=env
    ).stdout


def test_study_stages_are_the_main_commands_per_variant_and_seed() -> None:
    """study_X runs ``python -m mfm X`` for one variant (its overrides, its params) and seed
    under results/study/runs/{variant}/seed{seed}, over the variants and seeds of params.yaml
    (DVC matrix and Snakemake wildcards alike); study_scratch is finetune from scratch per
    seed."""
    study = yaml.safe_load((ROOT / "study/dvc.yaml").read_text())
    assert study["vars"] == ["../params.yaml:study"]
    run, scratch = (
        "results/study/runs/{variant}/seed{seed}",
        "results/study/runs/scratch/seed{seed}",
    )
    seed = "-S runtime.seed={seed}"
    for name, stage in dvc_stages("study/dvc.yaml").items():
        assert study["stages"][name]["wdir"] == ".."
        if name == "study":
            assert stage["cmd"] == "python -m mfm study"
            assert stage["params"] == {"data.dataset", "study"}
            continue
        if name == "study_scratch":
            assert stage["cmd"] == f"python -m mfm finetune --init scratch --out {scratch} {seed}"
            assert stage["matrix"] == {"seed": "${study.seeds}"}
            continue
        command = name.removeprefix("study_")
        init = " --init mfm" if command == "finetune" else ""
        assert stage["cmd"].startswith(
            f"python -m mfm {command}{init} --variant {{variant}} --out {run} "
        )
        assert stage["cmd"].endswith(seed)
        assert stage["matrix"] == {"variant": "${study.variants}", "seed": "${study.seeds}"}
        assert "study.variants.{variant}" in stage["params"]


def test_study_targets_every_variant_and_seed_of_the_params() -> None:
    """``snakemake -n study`` plans one pretrain per variant x seed and one scratch per seed."""
    out = dry_run("--forceall", "study")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["study"]
    pretrains = set(re.findall(r"runs/(\w+)/seed(\d+)/pretrain/encoder\.pt", out))
    expected = {(name, str(seed)) for name in params["variants"] for seed in params["seeds"]}
    assert pretrains == expected
    scratch = set(re.findall(r"runs/scratch/seed(\d+)/finetune/scratch/classifier\.pt", out))
    assert scratch == {str(seed) for seed in params["seeds"]}


def test_params_listed_in_dvc_exist_in_params_yaml() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in dvc_stages().items():
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                if part == "{variant}":  # a study stage reads its own variant's overrides
                    assert node, f"{name}: params.yaml has no study variants"
                    break
                assert part in node, f"{name}: param {key} missing from params.yaml"
                node = node[part]


def test_training_rules_start_torchrun_with_one_process_per_gpu() -> None:
    """Locally python; with GPUs (the SLURM profile's resources.gpu) torchrun."""
    for gpus, start in (
        (None, "python -m mfm pretrain"),
        (4, "torchrun --standalone --nproc-per-node=4 -m mfm pretrain"),
    ):
        extra = ["--set-resources", f"pretrain:gpu={gpus}"] if gpus else []
        out = dry_run("-p", "-f", "pretrain", *extra)
        assert f"{start} 2> logs/pretrain.log" in out
