"""The paper's ImageNet-1k recipes as partial params files: ``presets/<name>.yaml``.

``python -m mfm preset NAME [-S key=value ...]`` merges a preset, then the overrides, into
``params.yaml`` in place (comments kept, written atomically, validated first), so ``dvc repro``,
``dvc exp run`` and ``snakemake`` all run the recipe. ``--as-overrides`` prints the same change
as ``-S`` arguments for ``dvc exp run`` instead. Sections merge key by key; a value replaces
what was there, free-form mappings (``model.kwargs``) included, so a preset never inherits
the default job's ViT depth. A preset's ``data.root`` is a placeholder: it must come from
``-S data.root=...``, or from a ``params.yaml`` that already reads an image folder.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.tokens import CommentToken

from mfm.config import Params, validate_params
from mfm.errors import UserError
from mfm.io import atomic_path
from mfm.overrides import apply_overrides

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
ROOT_PLACEHOLDER = "/path/to/imagenet"
ADE20K_PLACEHOLDER = "/path/to/ADEChallengeData2016"
_MISSING = object()


class _Representer(RoundTripRepresenter):
    """Writes ``null`` (not an empty value) and floats PyYAML reads back as floats."""

    def represent_none(self, data: None) -> Any:
        return self.represent_scalar("tag:yaml.org,2002:null", "null")

    def represent_float(self, data: float) -> Any:
        if not math.isfinite(data):
            return super().represent_float(data)
        return self.represent_scalar("tag:yaml.org,2002:float", _float_text(data))


_Representer.add_representer(type(None), _Representer.represent_none)
_Representer.add_representer(float, _Representer.represent_float)


def _float_text(value: float) -> str:
    """``repr`` with a dot before any exponent: YAML 1.1 (PyYAML) reads ``1e-06`` as a string."""
    text = repr(value)
    return text.replace("e", ".0e") if "e" in text and "." not in text else text


def _round_trip() -> YAML:
    rt = YAML()
    rt.Representer = _Representer
    rt.width = 4096  # never re-wrap long lines
    return rt


@dataclass
class _Plan:
    """What a preset does to a params file: the file as read and the validated result."""

    path: Path
    document: CommentedMap  # the params file, comments and all
    current: dict[str, Any]  # the same, as plain values
    preset: dict[str, Any]
    target: dict[str, Any]  # merged, overridden, validated: the new file's values


def available() -> list[str]:
    """Names of the presets under ``presets/``."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_file(name: str) -> Path:
    """The file of preset ``name``; an unknown name is a ``UserError`` listing the choices."""
    if name not in available():
        choices = ", ".join(available())
        raise UserError(f"unknown preset {name!r}; choose one of: {choices} (or --list)")
    return PRESETS_DIR / f"{name}.yaml"


def listing() -> str:
    """One line per preset: its name and the first line of its header comment."""
    lines, names = [], available()
    width = max(map(len, names), default=0)
    for name in names:
        text = preset_file(name).read_text()
        summary = next((ln.lstrip("# ") for ln in text.splitlines() if ln.startswith("#")), "")
        lines.append(f"{name:<{width}}  {summary}")
    return "\n".join(lines)


def apply(name: str, params_file: str | Path, overrides: list[str]) -> str:
    """Merge preset ``name`` and ``overrides`` into ``params_file`` in place; returns a report.

    Nothing is written unless the result validates, and then only atomically.
    """
    plan = _plan(name, params_file, overrides)
    changed = _changes(plan.current, plan.target)
    if not changed:
        return f"{plan.path}: already has preset {name}; nothing changed"
    _write(plan)
    head = f"{plan.path}: preset {name} applied, {len(changed)} values changed:"
    tail = "next: dvc repro (or dvc exp run), or snakemake --cores all"
    return "\n".join([head, *changed, tail])


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``  key: old -> new`` for each value that differs, added and removed ones included."""
    keys = dict.fromkeys([key for key, _ in _leaves(old)] + [key for key, _ in _leaves(new)])
    pairs = [(key, _lookup(old, key), _lookup(new, key)) for key in keys]
    return [f"  {key}: {_show(a)} -> {_show(b)}" for key, a, b in pairs if a != b]


def as_overrides(name: str, params_file: str | Path, overrides: list[str]) -> list[str]:
    """The preset and ``overrides`` as ``-S`` values for ``dvc exp run`` (Hydra syntax), which
    ``mfm.config.apply_overrides`` reads the same way; ``params_file`` is not written.

    Every key the preset or an override sets is listed with its final value; a free-form
    mapping is deleted and re-added (``~key``, ``+key={}``), since Hydra merges mappings.
    """
    plan = _plan(name, params_file, overrides)
    keys = [key for key, _ in _leaves(plan.preset)]
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~").strip()
        keys += [path for path, _ in _expand(key, _lookup(plan.target, key))]
    state, args = copy.deepcopy(plan.current), []
    for key in dict.fromkeys(keys):
        new = _override_args(key, _lookup(plan.target, key), _lookup(state, key) is not _MISSING)
        state = apply_overrides(state, new)
        args += new
    return args


def set_values(params_file: str | Path, values: Mapping[str, Any], why: str) -> str:
    """Write dotted-key ``values`` into ``params_file`` (comments kept, validated, atomic),
    the way a preset is merged; returns the changed lines."""
    preset: dict[str, Any] = {}
    for key, value in values.items():
        *sections, last = key.split(".")
        node = preset
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    plan = _plan_from(preset, why, params_file, [])
    changed = _changes(plan.current, plan.target)
    if not changed:
        return f"{plan.path}: already set for {why}; nothing changed"
    _write(plan)
    return "\n".join([f"{plan.path}: {len(changed)} values set for {why}:", *changed])


def _write(plan: _Plan) -> None:
    _sync(plan.document, plan.target)
    text = io.StringIO()
    _round_trip().dump(plan.document, text)
    with atomic_path(plan.path) as tmp:
        tmp.write_text(text.getvalue())


def _plan(name: str, params_file: str | Path, overrides: list[str]) -> _Plan:
    """Read both files, merge, apply the overrides, fill ``data.root`` and validate."""
    return _plan_from(_plain(_read(preset_file(name))), name, params_file, overrides)


def _plan_from(
    preset: dict[str, Any], name: str, params_file: str | Path, overrides: list[str]
) -> _Plan:
    path = Path(params_file)
    if not path.is_file():
        raise UserError(f"{path} not found; run from the project root or pass --params PATH")
    document = _read(path)
    current = _plain(document)
    merged = copy.deepcopy(current)
    merge(merged, preset)
    merged = apply_overrides(merged, overrides)
    _fill_root(merged, current, name)
    params = validate_params(merged, f"{path} with preset {name}", overrides)
    target = _restrict(params.model_dump(mode="json"), merged)
    return _Plan(path, document, current, preset, target)


def _read(path: Path) -> CommentedMap:
    try:
        data = _round_trip().load(path.read_text())
    except YAMLError as err:
        kind = err.__class__.__name__
        raise UserError(f"{path} is not valid YAML ({kind}); fix its syntax") from None
    if data is None:
        return CommentedMap()
    if not isinstance(data, CommentedMap):
        raise UserError(f"{path} must hold a mapping of sections (data, model, pretrain, ...)")
    return data


def _plain(value: Any) -> Any:
    """ruamel's nodes as plain dicts, lists and Python scalars."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _section(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The model of section ``key`` of ``model``; None when ``key`` holds a value."""
    field = model.model_fields.get(key) if model else None
    annotation = getattr(field, "annotation", None)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _model_at(key: str) -> type[BaseModel] | None:
    """The section model at dotted ``key`` (None for a value or an unknown key)."""
    model: type[BaseModel] | None = Params
    for part in key.split("."):
        model = _section(model, part)
    return model


def merge(
    base: dict[str, Any], changes: Mapping[str, Any], model: type[BaseModel] = Params
) -> None:
    """Deep-merge ``changes`` into ``base`` in place: sections merge, values replace."""
    for key, value in changes.items():
        section = _section(model, key)
        if section and isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value, section)
        else:
            base[key] = copy.deepcopy(value)


def _leaves(
    tree: Mapping[str, Any], model: type[BaseModel] | None = Params, prefix: str = ""
) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of each value in ``tree``, walking sections only."""
    for key, value in tree.items():
        section = _section(model, key)
        if section and isinstance(value, Mapping):
            yield from _leaves(value, section, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _expand(key: str, value: Any) -> list[tuple[str, Any]]:
    """The values under dotted ``key``: its leaves for a section, else the key itself."""
    model = _model_at(key)
    if model and isinstance(value, Mapping):
        return list(_leaves(value, model, f"{key}."))
    return [(key, value)]


def _lookup(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _restrict(clean: Any, raw: Any) -> Any:
    """The keys of ``raw`` with their validated values (``clean``): ``-S lr=1e-4``, a string
    to PyYAML, is written as the float it validated to; ``epochs: 20`` stays an int."""
    if isinstance(raw, Mapping) and isinstance(clean, Mapping):
        return {key: _restrict(clean[key], value) for key, value in raw.items()}
    same = raw == clean and isinstance(raw, bool | str) == isinstance(clean, bool | str)
    return raw if same else clean


# section -> (placeholder root, the dataset a real root in params.yaml must be for, what it holds)
PLACEHOLDER_ROOTS = {
    "data": (ROOT_PLACEHOLDER, "imagefolder", "your ImageNet folder (train/ and val/ inside)"),
    "segment": (
        ADE20K_PLACEHOLDER,
        "ade20k",
        "your ADE20K folder (ADEChallengeData2016: images/ and annotations/ inside)",
    ),
}


def _fill_root(merged: dict[str, Any], current: Mapping[str, Any], name: str) -> None:
    """Replace a preset's placeholder root by the folder params.yaml already reads for that
    dataset, or stop and ask for ``-S <section>.root=...``."""
    for section, (placeholder, dataset, holds) in PLACEHOLDER_ROOTS.items():
        values = merged.get(section)
        if not isinstance(values, dict) or values.get("root") != placeholder:
            continue
        old = current.get(section) or {}
        if old.get("dataset") == dataset and old.get("root") not in (None, placeholder):
            values["root"] = old["root"]
            continue
        raise UserError(f"preset {name} needs {holds}: add -S {section}.root={placeholder}")


def _override_args(key: str, value: Any, present: bool) -> list[str]:
    """Hydra ``-S`` arguments that set ``key`` to ``value`` (``present``: key exists now)."""
    if value is _MISSING:
        return [f"~{key}"] if present else []
    if isinstance(value, Mapping):  # free-form: Hydra would merge into the old mapping
        args = [f"~{key}"] if present else []
        args.append(f"+{key}={{}}")
        for sub, item in value.items():
            args += _override_args(f"{key}.{sub}", item, present=False)
        return args
    return [f"{'' if present else '+'}{key}={_format(key, value)}"]


def _format(key: str, value: Any) -> str:
    """``value`` as one shell word that YAML and Hydra both parse back to ``value``."""
    if isinstance(value, str):
        if any(ch.isspace() or ch in "'\"\\$" for ch in value):
            raise UserError(
                f"--as-overrides: {key} = {value!r} has a space, quote, backslash or $ that "
                "`$(...)` would mangle; write params.yaml instead (drop --as-overrides)"
            )
        return f"'{value}'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_format(key, item) for item in value) + "]"
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, Mapping):
        raise UserError(f"--as-overrides: {key} holds a nested mapping; write params.yaml instead")
    return _show(value)


def _show(value: Any) -> str:
    """A value as YAML flow text, for reports."""
    if value is _MISSING:
        return "(absent)"
    return (
        yaml.safe_dump(value, default_flow_style=True, width=4096).removesuffix("\n...\n").strip()
    )


def _sync(node: CommentedMap, target: Mapping[str, Any]) -> None:
    """Make ``node`` equal ``target`` in place, touching only what differs, so comments stay."""
    for key in [key for key in node if key not in target]:
        last = key == list(node)[-1]
        tail = _tail(node, key) if last else ""
        del node[key]
        node.ca.items.pop(key, None)
        if tail and node:
            _add_tail(node, list(node)[-1], tail)
    for key, value in target.items():
        old = node.get(key, _MISSING)
        if old is not _MISSING and old == value:
            continue
        if _is_block_map(old) and isinstance(value, Mapping) and value:
            _sync(old, value)
            continue
        tail = _tail(node, key) if _is_block_map(old) else ""  # else the comment is node's
        node[key] = _node(value)
        if tail:
            _add_tail(node, key, tail)


def _is_block_map(value: Any) -> bool:
    return isinstance(value, CommentedMap) and len(value) > 0 and not value.fa.flow_style()


def _node(value: Any) -> Any:
    """A new YAML node: mappings in block style (``{}`` when empty), lists in flow style."""
    if isinstance(value, Mapping):
        node = CommentedMap((key, _node(item)) for key, item in value.items())
        if not node:
            node.fa.set_flow_style()
        return node
    if isinstance(value, list):
        seq = CommentedSeq(_node(item) for item in value)
        seq.fa.set_flow_style()
        return seq
    return value


def _tail(node: CommentedMap, key: str) -> str:
    """The blank lines and comment lines that follow entry ``key`` (not its own comment)."""
    value = node[key]
    if _is_block_map(value):
        return _tail(value, list(value)[-1])
    token = (node.ca.items.get(key) or [None] * 3)[2]
    return token.value.partition("\n")[2] if token is not None else ""


def _add_tail(node: CommentedMap, key: str, tail: str) -> None:
    """Put ``tail`` (from ``_tail``) after entry ``key``."""
    value = node[key]
    if _is_block_map(value):
        _add_tail(value, list(value)[-1], tail)
        return
    entry = node.ca.items.setdefault(key, [None, None, None, None])
    if entry[2] is None:
        entry[2] = CommentToken("\n" + tail, CommentMark(0), None)
    else:
        entry[2].value = entry[2].value.rstrip("\n") + "\n" + tail
