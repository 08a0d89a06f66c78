"""The checkpoint: round trip, refusal of a missing or torn file, atomic replacement.

A process killed mid-save is the failed-write case: the new content is complete in a temporary file
before it replaces the old one, so an interruption anywhere before the rename leaves the old checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streams.replay.checkpoint import Checkpoint, default_path, job_id
from streams.replay.plan import Unit
from streams.replay.timespec import ReplayError


def _checkpoint(path: Path, next_offset: int = 40) -> Checkpoint:
    unit = Unit("0", 0, 10, 100, next_offset)
    unit.stats.records = next_offset - 10
    return Checkpoint(path, "abc", [unit, Unit("1", 1, 0, 0)], {"source": "topic t"})


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "replay" / "abc.json"
    _checkpoint(path).save()
    again = Checkpoint.load(path)
    assert again.job == "abc" and not again.done and again.about == {"source": "topic t"}
    assert again.units == _checkpoint(path).units
    assert [p.name for p in path.parent.iterdir()] == ["abc.json"]  # no temporary file left


def test_a_missing_checkpoint_cannot_be_resumed(tmp_path: Path) -> None:
    with pytest.raises(ReplayError) as err:
        Checkpoint.load(tmp_path / "none.json")
    assert str(err.value) == f"no checkpoint to resume at {tmp_path / 'none.json'}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"version": 1, "job": "a", "units": [{"key"', "Expecting"),
        ('{"version": 9, "job": "a", "units": []}', "version 9, expected 1"),
        ('{"version": 1, "units": []}', "'job'"),
    ],
)
def test_an_unreadable_checkpoint_is_refused(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ReplayError) as err:
        Checkpoint.load(path)
    assert str(err.value).startswith(f"checkpoint {path} is unreadable: ") and why in str(err.value)


def test_a_failed_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "abc.json"
    _checkpoint(path, 40).save()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        _checkpoint(path, 70).save()
    assert Checkpoint.load(path).units[0].next == 40


def test_job_ids_are_stable_and_tell_replays_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a = job_id({"topic": "t", "range": ["-2h", None]})
    assert a == job_id({"range": ["-2h", None], "topic": "t"}) and len(a) == 12
    assert a != job_id({"topic": "t", "range": ["-3h", None]})
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    assert default_path(a) == tmp_path / "replay" / f"{a}.json"
