"""streams.kafka_stage.Ledger: what a stage without Faust may commit. An input is done once its outputs are
acknowledged and every input before it is done; a failed output stops everything behind it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from kotel.topology import parse_topology
from streams.kafka_stage import KafkaStage
from streams.ledger import Ledger, StageFailed


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


async def _settled() -> None:
    for _ in range(5):  # gather's and the ledger's wake-ups take a few loop turns
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running(ledger: Ledger) -> Any:
    task = asyncio.ensure_future(ledger.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StageFailed):
            await task


async def test_an_input_is_done_only_when_every_earlier_one_is() -> None:
    seen: list[str] = []
    ledger = Ledger(seen.append)
    first, second, third = _future(), _future(), _future()
    async with running(ledger):
        await ledger.add("in", 0, 10, [first], "a")
        await ledger.add("in", 1, 4, [second], "b")
        await ledger.add("in", 0, 11, [third], "c")
        second.set_result("ok")
        third.set_result("ok")
        await _settled()
        assert ledger.done == {} and seen == []  # the first input's output is still out
        first.set_result("ok")
        await _settled()
        assert ledger.done == {("in", 0): 12, ("in", 1): 5}  # the next offset to read, per partition
        assert seen == ["a", "b", "c"]
        await asyncio.wait_for(ledger.drained(), 1)


async def test_an_input_with_several_outputs_waits_for_all_of_them() -> None:
    ledger = Ledger(lambda _: None)
    outputs = [_future(), _future()]
    async with running(ledger):
        await ledger.add("in", 0, 0, outputs, None)
        outputs[0].set_result("ok")
        await _settled()
        assert ledger.done == {}
        outputs[1].set_result("ok")
        await _settled()
        assert ledger.done == {("in", 0): 1}


async def test_a_failed_output_stops_the_ledger_before_that_input() -> None:
    ledger = Ledger(lambda _: None)
    ok, failed, later = _future(), _future(), _future()
    task = asyncio.ensure_future(ledger.run())
    await ledger.add("in", 0, 0, [ok], None)
    await ledger.add("in", 0, 1, [failed], None)
    await ledger.add("in", 0, 2, [later], None)
    ok.set_result("ok")
    later.set_result("ok")
    failed.set_exception(RuntimeError("MSG_TIMED_OUT"))
    with pytest.raises(StageFailed, match=r"in\[0\]@1 was not acknowledged: MSG_TIMED_OUT"):
        await asyncio.wait_for(task, 1)
    assert ledger.done == {("in", 0): 1}  # offset 1 and everything after it are read again


async def test_adding_waits_while_max_in_flight_inputs_are_unacknowledged() -> None:
    ledger = Ledger(lambda _: None, max_in_flight=2)
    outputs = [_future() for _ in range(3)]
    async with running(ledger):
        await ledger.add("in", 0, 0, [outputs[0]], None)
        await ledger.add("in", 0, 1, [outputs[1]], None)
        third = asyncio.ensure_future(ledger.add("in", 0, 2, [outputs[2]], None))
        await _settled()
        assert not third.done() and len(ledger) == 2
        outputs[0].set_result("ok")
        await asyncio.wait_for(third, 1)
        assert len(ledger) == 2


async def test_inputs_holding_too_many_bytes_wait_for_earlier_ones_to_be_done() -> None:
    ledger = Ledger(lambda _: None, max_in_flight=100, max_bytes=1000)
    outputs = [_future() for _ in range(3)]
    async with running(ledger):
        await ledger.add("in", 0, 0, [outputs[0]], None, 5000)  # alone, any size goes
        second = asyncio.ensure_future(ledger.add("in", 0, 1, [outputs[1]], None, 600))
        await _settled()
        assert not second.done()
        outputs[0].set_result("ok")
        await asyncio.wait_for(second, 1)
        third = asyncio.ensure_future(ledger.add("in", 0, 2, [outputs[2]], None, 600))
        await _settled()
        assert not third.done()  # 600 + 600 > 1000
        outputs[1].set_result("ok")
        await asyncio.wait_for(third, 1)


class _Message:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def value(self) -> bytes:
        return b""

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None


async def test_polls_handed_over_before_a_revoke_are_dropped_not_handled() -> None:
    """Their partitions may be someone else's now, who reads them from the commit."""
    handled: list[int] = []

    async def handle(message: Any) -> tuple[list[asyncio.Future[Any]], None]:
        handled.append(message.offset())
        done = _future()
        done.set_result("ok")
        return [done], None

    topology = parse_topology("kafka: {bootstrap_servers: '127.0.0.1:9'}\n")
    stage = KafkaStage(topology, "route", ["in"], handle, lambda _: None)
    process = asyncio.ensure_future(stage._process())
    try:
        stage._polls.put_nowait((0, [_Message(0), _Message(1)], 0))
        stage._polls.put_nowait((0, [_Message(2)], 0))  # polled before the revoke
        stage._generation = 1  # the revoke
        stage._polls.put_nowait((1, [_Message(2), _Message(3)], 0))  # read again from the commit
        for _ in range(20):
            await asyncio.sleep(0)
        assert handled == [2, 3]
    finally:
        process.cancel()
        stage.consumer.close()


def test_the_consumer_thread_waits_while_handed_over_polls_hold_too_many_bytes() -> None:
    import threading

    from streams import kafka_stage

    handoff, stop = kafka_stage._Handoff(), threading.Event()
    big = kafka_stage.MAX_HANDOFF_BYTES
    assert handoff.reserve(big + 1, stop)  # one poll always goes, however large
    went = threading.Event()
    waiter = threading.Thread(target=lambda: handoff.reserve(10, stop) and went.set())
    waiter.start()
    assert not went.wait(0.3)  # the first still holds more than the bound
    handoff.release(big + 1)
    assert went.wait(5)
    waiter.join()
    stop.set()
    for _ in range(kafka_stage.MAX_HANDOFF_BATCHES - 1):
        assert handoff.reserve(0, stop)
    assert not handoff.reserve(0, stop)  # too many polls, and stopped meanwhile
