"""``${VAR}`` / ``${VAR:-default}`` / ``${env:VAR}`` expansion inside YAML string scalars.

Expansion happens after parsing, on values only, so a variable can never inject YAML structure.
A scalar made of exactly one reference is re-read as a YAML scalar (``${ENABLED}`` -> bool,
``${PORT}`` -> int), which is what the Collector does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

_REF = re.compile(r"\$\$|\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Path = tuple[str | int, ...]


class UndefinedVariable(ValueError):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(
            f"environment variable {name} is not set and has no default "
            f"(write ${{{name}:-value}} to give one)"
        )
        self.name = name
        self.path = path


def _expand_str(text: str, env: Mapping[str, str], path: Path) -> Any:
    whole = _REF.fullmatch(text)

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise UndefinedVariable(name, path)

    expanded = _REF.sub(repl, text)
    if whole is not None and whole.group(0) != "$$":
        try:
            value = yaml.safe_load(expanded) if expanded else ""
        except yaml.YAMLError:
            return expanded
        return value if isinstance(value, str | int | float | bool) or value is None else expanded
    return expanded


def expand(
    data: Any, env: Mapping[str, str] | None = None, path: Path = (), on_error: Callable | None = None
) -> Any:
    """Return ``data`` with references expanded; undefined ones go to ``on_error`` (or raise)."""
    env = os.environ if env is None else env
    if isinstance(data, dict):
        return {k: expand(v, env, (*path, k), on_error) for k, v in data.items()}
    if isinstance(data, list):
        return [expand(v, env, (*path, i), on_error) for i, v in enumerate(data)]
    if isinstance(data, str) and "$" in data:
        try:
            return _expand_str(data, env, path)
        except UndefinedVariable as exc:
            if on_error is None:
                raise
            on_error(exc)
            return data
    return data
