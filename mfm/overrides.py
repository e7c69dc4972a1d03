"""``-S key=value`` overrides on a raw params mapping, read the way ``dvc exp run -S`` reads
them (values parsed as YAML, ``~key`` deletes, ``+key`` adds), before any validation."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from mfm.errors import UserError


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML), like ``dvc exp run -S``."""
    result = copy.deepcopy(raw)
    for item in overrides:
        if item.startswith("~"):  # Hydra's deletion: the key falls back to its default
            _delete_key(result, item)
            continue
        key, sep, text = item.partition("=")
        key = key.lstrip("+").strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value; write e.g. -S pretrain.epochs=3")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return result


def _delete_key(raw: dict[str, Any], item: str) -> None:
    """Apply ``~key`` (or Hydra's ``~key=value``): remove ``key`` from ``raw``."""
    key = item[1:].partition("=")[0].strip()
    *sections, last = key.split(".")
    node: Any = raw
    for part in sections:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise UserError(f"override {item!r}: {key!r} is not set, so it cannot be deleted")
    del node[last]


def override_of(key: Sequence[int | str], overrides: Sequence[str]) -> str | None:
    """The last ``-S`` override that set ``key`` (a path of sections; or a section above it),
    so an error can blame the option rather than the file."""
    loc = tuple(str(part) for part in key)
    for item in reversed(overrides):
        parts = tuple(item.partition("=")[0].lstrip("+").strip().split("."))
        if loc[: len(parts)] == parts:
            return item
    return None
