"""The study, shrunk: two variants x three seeds through both engines, one table, and the
caching that makes a study cheap to extend."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
import yaml

from tests.e2e.conftest import Project

pytestmark = pytest.mark.e2e
# Six variant runs and three scratch classifiers per engine, smaller still than the main
# job's tiny config.
SMALLER = {
    "data": {"train_limit": 400, "test_limit": 200},
    "linprobe": {"train_limit": 200},
    "robustness": {"num_images": 8, "severities": [1]},
    "study": {"seeds": [0, 1, 2]},
}
VARIANTS, SEEDS = ("mfm", "mim"), (0, 1, 2)
STAGES = ("pretrain", "linprobe", "finetune", "robustness")  # per variant and seed


def study_project(make_project: Callable[..., Project], name: str) -> Project:
    """The tiny project with only the ``mfm`` and ``mim`` variants (replacing the five
    defaults rather than merging into them)."""
    project = make_project(SMALLER, name=name)
    path = project.path / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["study"]["variants"] = {name: {"pretrain.pretext": name} for name in VARIANTS}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    project.commit("two study variants")
    return project


def undeclared_files(project: Project, under: str = "results/study") -> list[str]:
    """Files the study wrote that git would take up but no stage in ``study/dvc.lock`` declares
    (dvclive's ``live/metrics.json`` summaries aside, kept in git as the main job's are)."""
    lock = yaml.safe_load((project.path / "study/dvc.lock").read_text())
    declared = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    untracked = project.run(
        "git", "ls-files", "--others", "--exclude-standard", under
    ).stdout.split()
    return [
        path
        for path in untracked
        if not path.endswith("/live/metrics.json")
        and not any(path == out or path.startswith(out + "/") for out in declared)
    ]


def planned(output: str) -> set[str]:
    """The study stages ``dvc repro --dry`` would run."""
    return set(re.findall(r"Running stage 'study/dvc.yaml:(study\w*@[\w-]+)'", output))


def test_dvc_and_snakemake_produce_the_same_study_with_seeds(
    make_project: Callable[..., Project],
) -> None:
    by_dvc = study_project(make_project, "dvc")
    ran = by_dvc.run("dvc", "repro", "study/dvc.yaml").stdout
    for variant in VARIANTS:
        for seed in SEEDS:
            assert f"Running stage 'study/dvc.yaml:study_pretrain@{variant}-{seed}'" in ran
    for seed in SEEDS:
        assert f"Running stage 'study/dvc.yaml:study_scratch@{seed}'" in ran
    assert "Running stage 'study/dvc.yaml:study'" in ran
    assert "Running stage 'finetune@" not in ran  # the main job is not needed
    assert undeclared_files(by_dvc) == []  # e.g. the pretrain stage's timm folder
    study = json.loads((by_dvc.path / "metrics/study.json").read_text())
    assert study["seeds"] == list(SEEDS) and set(study["variants"]) == set(VARIANTS)
    for variant in VARIANTS:
        row = study["variants"][variant]
        assert row["finetune_top1"]["n"] == 3 and row["finetune_top1"]["std"] is not None
        low, high = row["difference"]["finetune_top1"]["ci95"]
        assert low <= row["difference"]["finetune_top1"]["mean"] <= high
    assert study["baseline"]["mce"]["values"] == pytest.approx([100.0] * 3)
    assert study["pixels"]["probe_top1"]["n"] == 3
    table = (by_dvc.path / "results/study/study.md").read_text()
    assert "Mean ± std over 3 seed(s)" in table and "[95 % CI]" in table
    assert "| raw pixels (no encoder) |" in table
    assert "| mfm - mim |" in table  # frequency vs spatial masking, head to head
    assert study["versus_first"]["differences"]["mim"]["finetune_top1"]["n"] == 3
    shown = json.loads(by_dvc.run("dvc", "metrics", "show", "--json").stdout)
    assert "metrics/study.json" in json.dumps(shown)
    assert "Running stage" not in by_dvc.run("dvc", "repro", "study/dvc.yaml").stdout

    # editing one variant reruns that variant only; a new seed runs only the new runs
    by_dvc.set_params({"study": {"variants": {"mim": {"pretrain.mim.mask_ratio": 0.5}}}})
    edited = planned(by_dvc.run("dvc", "repro", "--dry", "study/dvc.yaml").stdout)
    assert edited and all("@mim-" in stage for stage in edited), edited
    by_dvc.run("git", "checkout", "params.yaml")
    by_dvc.set_params({"study": {"seeds": [0, 1, 2, 3]}})
    # (a dry repro stops at the first stage whose input the new runs have not written yet)
    stale = json.loads(by_dvc.run("dvc", "status", "--json", "study/dvc.yaml").stdout)
    new_runs = {name.partition(":")[2] for name in stale} - {"study"}
    assert new_runs == {
        *(f"study_{stage}@{variant}-3" for stage in STAGES for variant in VARIANTS),
        "study_scratch@3",
    }, sorted(stale)
    by_dvc.run("git", "checkout", "params.yaml")

    by_snakemake = study_project(make_project, "snakemake")
    by_snakemake.run("snakemake", "--cores", "2", "study")
    assert (by_snakemake.path / "results/study/study.md").read_text() == table
    by_snakemake.set_params({"study": {"variants": {"mim": {"pretrain.mim.mask_ratio": 0.5}}}})
    rerun = by_snakemake.run("snakemake", "-n", "study").stdout
    variants = set(re.findall(r"wildcards: .*variant=(\w+)", rerun))
    assert variants == {"mim"}, rerun[-3000:]
