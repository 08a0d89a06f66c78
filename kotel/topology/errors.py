"""Topology errors that say which file, which line, which key and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def format_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


@dataclass(frozen=True)
class Issue:
    path: tuple[str | int, ...]
    message: str
    line: int | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {format_path(self.path)}: {self.message}"


class TopologyError(ValueError):
    """Every problem found in one topology file; ``str()`` is ready to show a user."""

    def __init__(self, file: str, issues: Sequence[Issue]) -> None:
        self.file = file
        self.issues = list(issues)
        super().__init__("\n".join(i.render(file) for i in self.issues))

    @property
    def messages(self) -> list[str]:
        return [i.render(self.file) for i in self.issues]
