"""A failed metadata update waits out the client's retry backoff before the next (aiokafka spun)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import streams.metadata_pacing as pacing


class _Client:
    def __init__(self, outcomes: list[bool]) -> None:
        self._retry_backoff = 0.1
        self.outcomes = outcomes
        self.calls = 0

    async def _metadata_update(self, cluster: Any, topics: Any) -> bool:
        self.calls += 1
        return self.outcomes.pop(0)


async def test_only_an_update_after_a_failure_waits_and_only_for_what_is_left_of_the_backoff(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [50.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 3))
        now[0] += seconds

    monkeypatch.setattr(pacing.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(pacing.asyncio, "sleep", sleep)
    pacing.pace_metadata_retries(_Client)
    pacing.pace_metadata_retries(_Client)  # twice: still paced once
    client = _Client([True, False, False, True, True])
    assert await client._metadata_update(None, None)  # no failure before: at once
    assert not await client._metadata_update(None, None)  # fails: at once too
    now[0] += 0.03
    assert not await client._metadata_update(None, None)  # 30 ms later: waits the other 70
    assert await client._metadata_update(None, None)  # waits a full backoff after the failure
    assert await client._metadata_update(None, None)  # after a success: at once
    assert waits == [0.07, 0.1] and client.calls == 5


def test_workers_pace_aiokafka_itself(tmp_path: Path) -> None:
    from aiokafka.client import AIOKafkaClient

    from kotel.topology import parse_topology
    from streams.app import create_app

    create_app(parse_topology('kafka: {bootstrap_servers: "127.0.0.1:1"}\n'), "dedup", data_dir=tmp_path)
    assert getattr(AIOKafkaClient._metadata_update, "_kotel_paced", False)
