"""A throwaway copy of the project, with a tiny config, for running the real engines.

Each test gets its own git repository holding the project's files (as `git ls-files` sees
them, so untracked-but-not-ignored work is included) and a params.yaml sized for seconds:
scikit-learn's digits at 16 px and a two-block ViT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY_PARAMS: dict[str, Any] = {
    "data": {"dataset": "digits", "img_size": 16, "train_limit": None, "test_limit": None},
    "model": {
        "name": "vit_tiny_patch16_224",
        "patch_size": 4,
        "kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
    },
    "pretrain": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0.0, "log_every": 5},
    "linprobe": {"train_limit": 400, "c_grid": [0.1, 1.0]},
    "finetune": {"epochs": 1, "batch_size": 64, "log_every": 5},
    "robustness": {"num_images": 16, "severities": [1, 3]},
    "segment": {
        "epochs": 1,
        "batch_size": 16,
        "crop_size": 32,
        "resize": [32, 32],
        "channels": 16,
        "log_every": 2,
        "scenes": {"size": 32, "train": 64, "test": 16, "scale": [1.0, 2.0]},
    },
    "runtime": {"device": "cpu", "seed": 0, "workers": 0},
}


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return [name for name in out if name and (ROOT / name).is_file()]


def tool_env() -> dict[str, str]:
    """The venv's tools first on PATH, a git identity, no telemetry, a quiet progress bar."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="mfm test",
        GIT_AUTHOR_EMAIL="test@mfm.invalid",
        GIT_COMMITTER_NAME="mfm test",
        GIT_COMMITTER_EMAIL="test@mfm.invalid",
        DVC_NO_ANALYTICS="1",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    return env


class Project:
    """A temporary copy of the repository with helpers to run commands in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = tool_env()

    def run(
        self, *args: str, check: bool = True, timeout: int = 600
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            args,
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def set_params(self, changes: dict[str, Any]) -> None:
        path = self.path / "params.yaml"
        params = deep_update(yaml.safe_load(path.read_text()), changes)
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)  # a clean tree is fine


def new_project(dest: Path, changes: dict[str, Any] | None = None) -> Project:
    """A copy of the project at ``dest``, a git repository with the tiny params committed."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    project = Project(dest)
    project.run("git", "init", "-q", "-b", "main")
    project.set_params(deep_update(yaml.safe_load(yaml.safe_dump(TINY_PARAMS)), changes or {}))
    project.commit("tiny project")
    return project


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Project]:
    def make(changes: dict[str, Any] | None = None, name: str = "project") -> Project:
        return new_project(tmp_path / name, changes)

    return make
