"""`kotel up`'s state file, so that another process (`kotel status`) can find what runs where.

One JSON document, ``$KOTEL_HOME/up/state.json``, replaced atomically (temporary file, fsync, rename) so
a reader never sees half of it, rewritten whenever a child starts or exits, and removed when `kotel up`
stops cleanly. After a ``kill -9`` the file stays behind; readers tell it is stale because the
``kotel up`` process it names is gone (pid plus start time, so a reused pid does not fool them).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil

from kotel.paths import home

# A process whose start time differs from the recorded one by more than this is another process.
_START_TOLERANCE_S = 2.0


@dataclass
class ChildState:
    name: str
    role: str  # agent | stage | sink
    command: list[str]
    log_file: str
    pid: int | None = None
    state: str = "starting"  # starting | running | restarting | refused | stopped
    started_at: float | None = None  # unix time the current process started
    restarts: int = 0
    metrics_url: str | None = None
    group: str | None = None  # its Kafka consumer group, for the broker's view of its lag


@dataclass
class UpState:
    pid: int
    started_at: float
    topology: str
    bootstrap: str
    prefix: str
    children: list[ChildState] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> UpState:
        data = json.loads(text)
        children = [ChildState(**_known(ChildState, c)) for c in data.get("children", [])]
        return cls(**{**_known(cls, data), "children": children})


def _known(kind: type, data: dict[str, Any]) -> dict[str, Any]:
    """Only the fields this version knows: a newer `kotel up` may write more."""
    names = {f.name for f in fields(kind)}
    return {k: v for k, v in data.items() if k in names}


def state_path() -> Path:
    return home() / "up" / "state.json"


def write_state(state: UpState, path: Path | None = None) -> None:
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(state.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: Path | None = None) -> UpState | None:
    """The state, or None when there is no file; ValueError when the file is not a state file."""
    path = path or state_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return UpState.from_json(text)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a kotel up state file: {exc}") from exc


def remove_state(path: Path | None = None) -> None:
    (path or state_path()).unlink(missing_ok=True)


def is_alive(pid: int | None, started_at: float | None) -> bool:
    """True when ``pid`` runs and is the process that started at ``started_at`` (unix time)."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except psutil.Error:
        return False
    return started_at is None or abs(created - started_at) <= _START_TOLERANCE_S
