"""The agent's batcher and admission control, without a broker (the sink is a recording fake)."""

from __future__ import annotations

import asyncio

import pytest

from agents.admission import Admission
from agents.batcher import Batcher
from agents.contracts import Overloaded
from agents.processors import MemoryLimiter
from agents.telemetry import AgentMetrics
from kotel.otlp import Entry, Signal, decode_protobuf, entries, frame, samples
from kotel.topology.exporters import BackpressureConfig
from kotel.topology.processors import BatchConfig, MemoryLimiterConfig


def _entry(key: str, items: int = 1, tenant: str = "t") -> Entry:
    return Entry(key, tenant, frame(key.encode()), items)


class Sink:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, str, bytes]] = []
        self.fail = fail

    async def __call__(self, signal: Signal, key: str, tenant: str, wire: bytes) -> None:
        self.calls.append((key, tenant, wire))
        if self.fail is not None:
            raise self.fail


async def test_flushes_when_send_batch_size_is_reached_without_waiting_for_the_timer() -> None:
    sink = Sink()
    batcher = Batcher(Signal.TRACES, BatchConfig(send_batch_size=3, timeout="1h", max_ack_delay="1h"), sink)
    await asyncio.wait_for(asyncio.gather(batcher.add([_entry("a", 2)]), batcher.add([_entry("b", 1)])), 5)
    assert sorted(k for k, _, _ in sink.calls) == ["a", "b"]


async def test_max_ack_delay_bounds_the_wait_when_the_timeout_is_long() -> None:
    sink = Sink()
    batcher = Batcher(
        Signal.TRACES, BatchConfig(send_batch_size=1000, timeout="10s", max_ack_delay="20ms"), sink
    )
    await asyncio.wait_for(batcher.add([_entry("a")]), 2)  # would hang for 10 s without the ack delay
    assert len(sink.calls) == 1


def test_a_batch_is_due_at_the_next_tick_of_timeout_as_in_the_collector() -> None:
    """The Collector's timer runs whatever waits, so a request waits 0..timeout (half on average), not a
    whole timeout from the first item; max_ack_delay still bounds it."""
    batcher = Batcher(Signal.TRACES, BatchConfig(timeout="5ms", max_ack_delay="1s"), Sink())
    assert batcher.flush_at(100.0001) == pytest.approx(100.005)
    assert batcher.flush_at(100.0049) == pytest.approx(100.005)
    assert batcher.flush_at(100.0051) == pytest.approx(100.010)
    slow = Batcher(Signal.TRACES, BatchConfig(timeout="10s", max_ack_delay="20ms"), Sink())
    assert slow.flush_at(100.001) == pytest.approx(100.021)
    at_once = Batcher(Signal.TRACES, BatchConfig(timeout="0s"), Sink())
    assert at_once.flush_at(100.0013) == 100.0013


async def test_entries_of_one_key_are_joined_into_one_record_in_arrival_order() -> None:
    sink = Sink()
    batcher = Batcher(Signal.TRACES, BatchConfig(send_batch_size=0, timeout="0s"), sink)
    await asyncio.gather(batcher.add([_entry("k1"), _entry("k2")]), batcher.add([_entry("k1")]))
    by_key = {key: wire for key, _, wire in sink.calls}
    assert by_key["k1"] == frame(b"k1") + frame(b"k1")
    assert by_key["k2"] == frame(b"k2")


async def test_joined_entries_are_a_valid_request_with_every_item() -> None:
    sink = Sink()
    batcher = Batcher(Signal.TRACES, BatchConfig(send_batch_size=0, timeout="0s"), sink)
    request = samples.traces(100, services=1)
    await batcher.add(list(entries(Signal.TRACES, request, "host", "tenant")))
    ((_, _, wire),) = sink.calls
    assert decode_protobuf(Signal.TRACES, wire) == request


async def test_send_batch_max_size_splits_a_backlog_into_whole_requests() -> None:
    sink = Sink()
    batcher = Batcher(
        Signal.TRACES, BatchConfig(send_batch_size=0, send_batch_max_size=5, timeout="0s"), sink
    )
    await asyncio.gather(*(batcher.add([_entry(f"k{i}", 3)]) for i in range(4)))
    assert len(sink.calls) == 4  # 3+3 > 5, so every request goes in its own batch


async def test_a_failing_sink_fails_every_waiter_of_that_batch() -> None:
    batcher = Batcher(
        Signal.TRACES, BatchConfig(send_batch_size=0, timeout="0s"), Sink(RuntimeError("kafka"))
    )
    results = await asyncio.gather(
        batcher.add([_entry("a")]), batcher.add([_entry("b")]), return_exceptions=True
    )
    assert [str(r) for r in results] == ["kafka", "kafka"]


async def test_close_flushes_what_is_pending() -> None:
    sink = Sink()
    batcher = Batcher(Signal.TRACES, BatchConfig(send_batch_size=100, timeout="1h", max_ack_delay="1h"), sink)
    waiting = asyncio.ensure_future(batcher.add([_entry("a")]))
    await asyncio.sleep(0)
    await batcher.close()
    await asyncio.wait_for(waiting, 1)
    assert len(sink.calls) == 1
    with pytest.raises(RuntimeError, match="batcher is closed"):
        await batcher.add([_entry("b")])


def test_admission_degrades_above_the_high_water_mark_and_refuses_at_capacity() -> None:
    metrics = AgentMetrics()
    admission = Admission(BackpressureConfig(max_in_flight_mib=1, high_water_mark=0.8), metrics)
    admission.acquire(700_000)
    assert not admission.degraded
    admission.acquire(200_000)
    assert admission.degraded
    assert metrics.registry.get_sample_value("kotel_agent_degraded") == 1
    with pytest.raises(Overloaded) as info:
        admission.acquire(200_000)
    assert str(info.value) == ("the agent's in-flight budget is full (900000 of 1048576 bytes); retry later")
    assert info.value.retry_after == 5.0 and info.value.reason == "backpressure"
    admission.release(900_000)
    assert admission.in_flight == 0 and not admission.degraded
    assert metrics.registry.get_sample_value("kotel_agent_queue_utilisation") == 0


def test_admission_refuses_while_the_memory_limiter_does() -> None:
    usage = [100 * 2**20]
    limiter = MemoryLimiter(
        MemoryLimiterConfig(limit_mib=400, spike_limit_mib=100), rss_reader=lambda: usage[0]
    )
    admission = Admission(BackpressureConfig(), AgentMetrics(), limiter)
    limiter.check()
    admission.acquire(10)
    usage[0] = 350 * 2**20  # above the soft limit (400 - 100 MiB)
    limiter.check()
    with pytest.raises(Overloaded, match="memory_limiter") as info:
        admission.acquire(10)
    assert info.value.reason == "memory_limiter"
