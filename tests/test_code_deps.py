"""Each stage's declared code dependencies are exactly the mfm modules its command runs.

A stage's command is ``python -m mfm <stage>``, which runs ``mfm/<stage>.py``: its module
closure (every ``mfm`` module it imports, at the top or inside a function, followed
transitively) is derived here from the source and compared with the ``mfm/`` deps that
dvc.yaml, study/dvc.yaml and the Snakefile declare. A missing entry would let DVC or
Snakemake serve a stale result after a code change; an extra one reruns a stage for nothing.
The CLI itself (argument parsing, writing the returned metrics) is not part of a stage's
closure.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_spec import ROOT, dvc_stages

PACKAGE = "mfm"


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file defining module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py), if any."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The ``mfm`` modules ``path`` imports anywhere in its body.

    ``from a import b`` names module ``a.b`` when that is a module, else module ``a`` (b is
    a name defined there). Relative imports are resolved against the importing module.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(root).with_suffix("").parts
    package = ".".join(parts[:-1])  # the package a module (or an __init__) belongs to
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if module_file(submodule, root) else base)
    return {name for name in found if name == PACKAGE or name.startswith(f"{PACKAGE}.")}


@cache
def closure(start: str, root: Path = ROOT) -> frozenset[str]:
    """Root-relative files of ``start`` and every mfm module it imports, transitively."""
    seen: set[Path] = set()
    todo = [module_file(start, root)]
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += [module_file(name, root) for name in imported_modules(path, root)]
    return frozenset(str(p.relative_to(root)) for p in seen)


def stage_module(cmd: str) -> str:
    """``python -m mfm finetune --init {init}`` -> ``mfm.finetune``."""
    words = cmd.split()
    assert words[:3] == ["python", "-m", PACKAGE], cmd
    return f"{PACKAGE}.{words[3]}"


def declared_code(deps: set[str]) -> set[str]:
    return {dep for dep in deps if dep.split("/")[0] == PACKAGE}


def _mismatches(engine: str, stages: dict[str, dict[str, Any]]) -> list[str]:
    """One line per stage whose declared code deps differ from its import closure."""
    lines = []
    for name, stage in stages.items():
        expected = closure(stage_module(stage["cmd"]))
        declared = declared_code(stage["deps"])
        if declared != expected:
            missing, extra = sorted(expected - declared), sorted(declared - expected)
            lines.append(
                f"{engine} {name}: add {missing or 'nothing'}, remove {extra or 'nothing'}"
            )
    return lines


@pytest.mark.parametrize("pipeline", ["dvc.yaml", "study/dvc.yaml"])
def test_dvc_code_deps_are_the_import_closure(pipeline: str) -> None:
    problems = _mismatches(pipeline, dvc_stages(pipeline))
    assert not problems, "\n".join(problems)


def test_snakemake_code_deps_are_the_import_closure(
    snakemake_rules: dict[str, dict[str, Any]],
) -> None:
    problems = _mismatches("Snakefile rule", snakemake_rules)
    assert not problems, "\n".join(problems)


def test_unlisted_package_inits_hold_no_code() -> None:
    """A package's ``__init__.py`` runs on every import of a submodule but is only listed
    when imported by name, which is safe only while the others hold nothing but a docstring."""
    listed = set().union(*(closure(stage_module(s["cmd"])) for s in dvc_stages().values()))
    for init in ROOT.joinpath(PACKAGE).rglob("__init__.py"):
        if str(init.relative_to(ROOT)) in listed:
            continue
        body = ast.parse(init.read_text()).body
        code = [node for node in body if not isinstance(node, ast.Expr)]
        assert not code, f"{init} holds code; import it by name where it is used, or empty it"


def test_the_closure_follows_every_kind_of_import(tmp_path: Path) -> None:
    """The resolver itself, on a package built here: a lazy import inside a function counts,
    a name imported from a module maps to that module, a submodule imported from a package
    maps to the submodule, relative imports resolve, and outside packages are ignored."""
    files = {
        "mfm/__init__.py": '__version__ = "1"\n',
        "mfm/stage.py": "import numpy\nfrom mfm.helper import thing\n\n\n"
        "def run():\n    from mfm.pkg import sub\n    return sub, thing, numpy\n",
        "mfm/helper.py": "from . import leaf\nthing = leaf\n",
        "mfm/leaf.py": "from mfm import __version__\n",
        "mfm/pkg/__init__.py": '"""Docs only."""\n',
        "mfm/pkg/sub.py": "from .other import x\n",
        "mfm/pkg/other.py": "x = 1\n",
        "mfm/unused.py": "x = 2\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert closure("mfm.stage", tmp_path) == {
        "mfm/stage.py",
        "mfm/helper.py",
        "mfm/leaf.py",
        "mfm/__init__.py",
        "mfm/pkg/sub.py",
        "mfm/pkg/other.py",
    }
