"""The dedup stage's batch buffer: it waits for records Faust already fetched, never for ones to come."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from streams.stages import dedup


def event(value: bytes = b"x") -> Any:
    return SimpleNamespace(message=SimpleNamespace(value=value))


@pytest.fixture(autouse=True)
def long_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """An hour: a take that waited for the window would never come back within the test."""
    monkeypatch.setattr(dedup, "_WITHIN_SECONDS", 3600.0)


def test_with_nothing_queued_a_record_is_taken_at_once() -> None:
    async def run() -> list[Any]:
        buffer = dedup._Buffer(lambda _: False)
        first = event()
        await buffer.put(first)
        return await asyncio.wait_for(buffer.take(), 10)

    assert len(asyncio.run(run())) == 1


def test_records_still_queued_are_waited_for_and_taken_together() -> None:
    queued = [2]

    async def run() -> list[Any]:
        buffer = dedup._Buffer(lambda _: queued[0] > 0)
        await buffer.put(event(b"a"))
        taking = asyncio.ensure_future(buffer.take())
        await asyncio.sleep(0.05)
        assert not taking.done()  # two more were fetched: it waits for them
        queued[0] = 1
        await buffer.put(event(b"b"))
        await asyncio.sleep(0.05)
        assert not taking.done()
        queued[0] = 0
        await buffer.put(event(b"c"))  # the queue is drained: the batch is complete
        return await asyncio.wait_for(taking, 10)

    assert [e.message.value for e in asyncio.run(run())] == [b"a", b"b", b"c"]


def test_a_batch_worth_taking_is_taken_while_more_are_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedup, "_EAGER_BYTES", 4)

    async def run() -> list[Any]:
        buffer = dedup._Buffer(lambda _: True)
        await buffer.put(event(b"abcd"))
        return await asyncio.wait_for(buffer.take(), 10)

    assert len(asyncio.run(run())) == 1
