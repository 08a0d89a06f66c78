"""Read a topology file: YAML with line numbers, ``${VAR}`` expansion, then the pydantic model.

Every problem is reported at once, each with the file, the line where known, the key path and
what was expected, because a user fixing a config wants the whole list, not one error per run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kotel.topology.envsubst import UndefinedVariable, expand
from kotel.topology.errors import Issue, TopologyError
from kotel.topology.model import Topology

KeyPath = tuple[str | int, ...]


def _line_index(node: yaml.Node, path: KeyPath, out: dict[KeyPath, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_index(value_node, (*path, key), out)
            out[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out)


def _nearest_line(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def _describe(err: dict[str, Any]) -> str:
    kind, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (not part of this section; check the spelling)"
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        return str(error) if error is not None else msg.removeprefix("Value error, ")
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), got {got!r}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"expected a number {bounds[kind]} {limit}, got {got!r}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {got!r}"
    return f"{msg[0].lower()}{msg[1:]}, got {got!r}" if msg else f"invalid value {got!r}"


def _loc_path(loc: tuple[Any, ...]) -> KeyPath:
    # Pydantic puts union member names and function names into loc; keep only real keys.
    return tuple(p for p in loc if isinstance(p, int) or "[" not in str(p))


def parse_topology(text: str, file: str = "<string>", env: Mapping[str, str] | None = None) -> Topology:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark else None
        raise TopologyError(file, [Issue((), f"not valid YAML: {problem}", line)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        found = type(data).__name__
        raise TopologyError(file, [Issue((), f"expected a mapping at the top level, got {found}", 1)])
    lines: dict[KeyPath, int] = {}
    if root is not None:
        _line_index(root, (), lines)

    issues: list[Issue] = []

    def undefined(exc: UndefinedVariable) -> None:
        issues.append(Issue(exc.path, str(exc), _nearest_line(lines, exc.path)))

    data = expand(data, os.environ if env is None else env, on_error=undefined)
    if issues:
        raise TopologyError(file, issues)
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            path = _loc_path(err["loc"])
            issues.append(Issue(path, _describe(err), _nearest_line(lines, path)))
        raise TopologyError(file, issues) from None


def load_topology(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Topology:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(str(path), [Issue((), f"cannot read the file: {exc.strerror}")]) from None
    return parse_topology(text, str(path), env)
