"""The replay's checkpoint: per unit, the first position the target has not acknowledged yet.

Written after every acknowledged chunk to a temporary file that is fsynced and renamed over the old
one (then the directory is fsynced), so a kill -9 leaves either the previous or the new checkpoint,
never a torn one; and since a chunk is written only once all of its records are acknowledged, a
resumed replay may send the chunk in flight again but never skips a record. The statistics travel in
the same file, so the totals of an interrupted and resumed replay are those of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kotel import paths
from streams.replay.plan import Unit
from streams.replay.timespec import ReplayError

VERSION = 1


def job_id(options: Mapping[str, Any]) -> str:
    """The same replay asked again (same source, range words, target, filters) has the same id."""
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_path(job: str) -> Path:
    return paths.home() / "replay" / f"{job}.json"


@dataclass
class Checkpoint:
    path: Path
    job: str
    units: list[Unit]
    about: dict[str, Any] = field(default_factory=dict)  # source, target, filters: for people reading it
    done: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "job": self.job,
            "about": self.about,
            "done": self.done,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "units": [u.to_json() for u in self.units],
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        data = json.dumps(self.to_json(), indent=1).encode()
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            units = [Unit.from_json(u) for u in data["units"]]
            return cls(path, str(data["job"]), units, dict(data.get("about", {})), bool(data.get("done")))
        except FileNotFoundError:
            raise ReplayError(f"no checkpoint to resume at {path}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplayError(f"checkpoint {path} is unreadable: {exc}") from None
