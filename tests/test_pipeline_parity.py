"""dvc.yaml and the Snakefile must describe the same pipeline: stages, commands, code and
data deps, params and outputs. Any drift between the two engines fails here."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOG_REDIRECT = " 2> {log}"
# Training rules start with the launcher (python, or torchrun with one process per GPU).
LAUNCH = "{params.launch}"


def _out_path(entry: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return _placeholders(entry), {}
    ((path, options),) = entry.items()
    return _placeholders(path), options or {}


def _params_value(match: re.Match[str]) -> str:
    """DVC's ``${section.key}`` templating reads params.yaml, as Snakemake's config does."""
    node: Any = yaml.safe_load((ROOT / "params.yaml").read_text())
    for part in match.group(1).split("."):
        node = node[part]
    return str(node)


def _placeholders(text: str) -> str:
    """DVC's ``${item.init}``, Snakemake's ``{wildcards.init}`` and its constrained
    ``{init,mfm|scratch}`` all become ``{init}``; other ``${...}`` take params.yaml's value."""
    text = text.replace("${item.", "{").replace("{wildcards.", "{")
    text = re.sub(r"\$\{([\w.]+)\}", _params_value, text)
    return re.sub(r"\{(\w+),[^}]*\}", r"{\1}", text)


PIPELINES = ("dvc.yaml", "study/dvc.yaml")  # the main job, and the pretext study


def dvc_stages(*files: str) -> dict[str, dict[str, Any]]:
    """Each DVC stage (of ``files``, default: every pipeline) as {cmd, deps, params, outs};
    persisted outs (resume checkpoints) are engine-private state, so they are left out."""
    spec = {}
    for file in files or PIPELINES:
        spec.update(yaml.safe_load((ROOT / file).read_text())["stages"])
    stages = {}
    for name, stage in spec.items():
        outs = set()
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, options = _out_path(entry)
                if not options.get("persist"):
                    outs.add(path)
        stages[name] = {
            "cmd": _placeholders(stage["cmd"]),
            "deps": {_placeholders(dep) for dep in stage.get("deps", [])},
            "matrix": stage.get("matrix", {}),
            "params": set(stage.get("params", [])),
            "outs": outs,
        }
    return stages


def _param_keys(name: str, value: Any, config: dict[str, Any]) -> set[str]:
    """A rule param holding a whole params.yaml section maps to the section's name, one
    holding a subset to ``section.key`` for each key, as DVC lists them."""
    if value == config.get(name):
        return {name}
    return {f"{name}.{key}" for key in value}


@pytest.fixture(scope="module")
def snakemake_rules() -> dict[str, dict[str, Any]]:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    cwd = os.getcwd()
    try:
        with SnakemakeApi() as api:
            workflow_api = api.workflow(
                resource_settings=ResourceSettings(), snakefile=ROOT / "Snakefile", workdir=ROOT
            )
            workflow = workflow_api._workflow
            config = dict(workflow.config)
            rules = {}
            for rule in workflow.rules:
                if rule.shellcmd is None:
                    continue
                assert list(rule.log), f"rule {rule.name} has no log:"
                params: set[str] = set()
                for name, value in rule.params.items():
                    if name in config:  # params.yaml sections (not e.g. the launcher)
                        params |= _param_keys(name, value, config)
                shell = rule.shellcmd.replace(LOG_REDIRECT, "").replace(LAUNCH, "python")
                rules[rule.name] = {
                    "cmd": _placeholders(shell),
                    "deps": {_placeholders(str(path)) for path in rule.input},
                    "params": params,
                    "outs": {_placeholders(str(path)) for path in rule.output},
                }
    finally:
        os.chdir(cwd)
    return rules


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


def test_wildcard_values_match_the_cli_choices() -> None:
    from mfm.cli import VARIANTS

    rules = (ROOT / "workflow" / "rules" / "evaluate.smk").read_text()
    for choices in VARIANTS["finetune"].values():
        assert f"INITS = {list(choices)!r}".replace("'", '"') in rules


def test_study_stages_are_the_main_commands_per_pretext() -> None:
    """study_X runs ``python -m mfm X`` with its results under results/study/{pretext}, over
    exactly the pretexts the config allows (DVC matrix and Snakemake wildcard alike)."""
    from mfm.study import PRETEXTS

    study = yaml.safe_load((ROOT / "study/dvc.yaml").read_text())["stages"]
    for name, stage in dvc_stages("study/dvc.yaml").items():
        assert study[name]["wdir"] == ".."
        if name == "study":
            assert stage["cmd"] == "python -m mfm study"
            continue
        assert stage["cmd"].startswith(f"python -m mfm {name.removeprefix('study_')} ")
        assert "--out results/study/{pretext}" in stage["cmd"]
        assert tuple(stage["matrix"]["pretext"]) == PRETEXTS
    rules = (ROOT / "workflow" / "rules" / "study.smk").read_text()
    assert f"PRETEXTS = {list(PRETEXTS)!r}".replace("'", '"') in rules


def test_params_listed_in_dvc_exist_in_params_yaml() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in dvc_stages().items():
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                assert part in node, f"{name}: param {key} missing from params.yaml"
                node = node[part]


def test_training_rules_start_torchrun_with_one_process_per_gpu() -> None:
    """Locally python; with GPUs (the SLURM profile's resources.gpu) torchrun."""
    import subprocess

    for gpus, start in (
        (None, "python -m mfm pretrain"),
        (4, "torchrun --standalone --nproc-per-node=4 -m mfm pretrain"),
    ):
        extra = ["--set-resources", f"pretrain:gpu={gpus}"] if gpus else []
        out = subprocess.run(
            ["snakemake", "-n", "-p", "-f", "pretrain", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        ).stdout
        assert f"{start} 2> logs/pretrain.log" in out
