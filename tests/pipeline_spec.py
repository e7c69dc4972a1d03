"""The pipeline as both engines declare it, read into one comparable shape: each DVC stage
and each Snakemake rule as {cmd, deps, params, outs}. Shared by the parity and code-deps tests."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOG_REDIRECT = " 2> {log}"
# Training rules start with the launcher (python, or torchrun with one process per GPU).
LAUNCH = "{params.launch}"


def _out_path(entry: str | dict[str, Any]) -> str:
    """An out's path, whether listed bare or with options (``cache: false``, ...)."""
    path = entry if isinstance(entry, str) else next(iter(entry))
    return _placeholders(path)


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


PIPELINES = ("dvc.yaml", "study/dvc.yaml")  # the main job, and the study (variants x seeds)


def dvc_stages(*files: str) -> dict[str, dict[str, Any]]:
    """Each DVC stage (of ``files``, default: every pipeline) as {cmd, deps, params, outs}."""
    spec = {}
    for file in files or PIPELINES:
        spec.update(yaml.safe_load((ROOT / file).read_text())["stages"])
    stages = {}
    for name, stage in spec.items():
        outs = {
            _out_path(entry)
            for kind in ("outs", "metrics", "plots")
            for entry in stage.get(kind, [])
        }
        stages[name] = {
            "cmd": _placeholders(stage["cmd"]),
            "deps": {_placeholders(dep) for dep in stage.get("deps", [])},
            "matrix": stage.get("matrix", {}),
            "params": {_placeholders(key) for key in stage.get("params", [])},
            "outs": outs,
        }
    return stages


# A study rule's own variant's overrides (a function of the wildcard), as DVC lists them.
STUDY_VARIANT_PARAM = ("study_variant", "study.variants.{variant}")
# The study summary depends on every run: Snakemake lists their files, DVC the folder.
STUDY_RUNS = "results/study/runs"


def _input_path(path: str) -> str:
    """A concrete file under the study's runs folder stands for the folder (DVC's dep)."""
    concrete = "{" not in path
    return STUDY_RUNS if concrete and path.startswith(f"{STUDY_RUNS}/") else _placeholders(path)


def _param_keys(name: str, value: Any, config: dict[str, Any]) -> set[str]:
    """A rule param holding a whole params.yaml section maps to the section's name, one
    holding a subset to ``section.key`` for each key, as DVC lists them."""
    if value == config.get(name):
        return {name}
    return {f"{name}.{key}" for key in value}


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
                    elif name == STUDY_VARIANT_PARAM[0]:
                        params.add(STUDY_VARIANT_PARAM[1])
                shell = rule.shellcmd.replace(LOG_REDIRECT, "").replace(LAUNCH, "python")
                rules[rule.name] = {
                    "cmd": _placeholders(shell),
                    "deps": {_input_path(str(path)) for path in rule.input},
                    "params": params,
                    "outs": {_placeholders(str(path)) for path in rule.output},
                }
    finally:
        os.chdir(cwd)
    return rules
