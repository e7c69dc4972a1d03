"""Every preset, applied to a project, is a pipeline both engines accept (dry runs only)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mfm.presets import ADE20K_PLACEHOLDER, ROOT_PLACEHOLDER, available
from tests.e2e.conftest import Project

pytestmark = pytest.mark.e2e


def test_every_preset_dry_runs_through_dvc_and_snakemake(
    make_project: Callable[..., Project],
    make_image_tree: Callable[..., Path],
    tmp_path: Path,
) -> None:
    tree = make_image_tree(tmp_path / "imagenet")  # train/ and val/, two classes of PNGs
    project = make_project()
    for name in available():
        preset = yaml.safe_load((project.path / "presets" / f"{name}.yaml").read_text())
        section = "segment" if "segment" in preset else "data"  # whose root is a placeholder
        root = tmp_path / "ADEChallengeData2016" if section == "segment" else tree
        placeholder = preset[section].get("root") in (ROOT_PLACEHOLDER, ADE20K_PLACEHOLDER)
        given = ["-S", f"{section}.root={root}"] if placeholder else []
        project.run("python", "-m", "mfm", "preset", name, *given)
        # DVC reads the preset's values from params.yaml ...
        diff = json.loads(project.run("dvc", "params", "diff", "--all", "--json").stdout)[
            "params.yaml"
        ]
        if "model" in preset:
            assert diff["model.name"]["new"] == preset["model"]["name"], name
        if placeholder:
            assert diff[f"{section}.root"]["new"] == str(root), name
        else:  # a dataset prepare finds or downloads itself
            assert diff[f"{section}.dataset"]["new"] == preset[section]["dataset"], name
        # ... and plans every stage. Plain `dvc repro --dry` stops at the first stage whose
        # upstream output is missing (it hashes deps for the run cache): --force skips that.
        planned = project.run("dvc", "repro", "--dry", "--force").stdout
        stages = re.findall(r"Running stage '([^']+)'", planned)
        assert {"pretrain", "finetune@mfm", "finetune@scratch"} <= set(stages), name
        assert {"segment@mfm", "segment@scratch"} <= set(stages), name
        jobs = project.run("snakemake", "-n").stdout  # the Snakefile validates params.yaml
        assert re.search(r"^pretrain +1$", jobs, re.MULTILINE), name
        assert re.search(r"^finetune +2$", jobs, re.MULTILINE), name
        assert re.search(r"^segment +2$", jobs, re.MULTILINE), name
