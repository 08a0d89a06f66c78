"""The regroup side's binding without a broker: fetch facts from aiokafka's consumer, and heartbeats.

Faust's app, its producer and aiokafka's consumer are stand-ins that record what they are asked and
answer what a broker's fetch responses would have left in aiokafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from faust.exceptions import ConsumerNotStarted
from prometheus_client import CollectorRegistry, Counter

from streams.stages.tail_clock import (
    HEARTBEAT_HEADER,
    REGROUPER_HEADER,
    WATERMARK_HEADER,
    read_watermark,
)
from streams.stages.tail_heartbeat import Watermarker, watermark_of

TOPIC = "app-traces-repartition"


class Producer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.futures: list[asyncio.Future[None]] = []

    async def send(self, topic: str, key: bytes, value: bytes, *, partition: int, timestamp: float | None,
                   headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
        self.sent.append({"topic": topic, "key": key, "value": value, "partition": partition,
                          "timestamp": timestamp, "headers": headers})
        self.futures.append(asyncio.get_running_loop().create_future())
        return self.futures[-1]


class Aiokafka:
    """aiokafka's consumer as fetch responses left it: partition -> (highwater, last poll wall ms)."""

    def __init__(self) -> None:
        self.facts: dict[Any, tuple[int, int]] = {}

    def highwater(self, tp: Any) -> int:
        if tp not in self.facts:
            raise AssertionError("Partition is not assigned")
        return self.facts[tp][0]

    def last_poll_timestamp(self, tp: Any) -> int:
        return self.facts[tp][1]


class Thread:
    def __init__(self, consumer: Aiokafka | None) -> None:
        self.consumer = consumer

    def _ensure_consumer(self) -> Aiokafka:
        if self.consumer is None:
            raise ConsumerNotStarted("Consumer thread not yet started")
        return self.consumer


class FaustConsumer:
    def __init__(self, thread: Thread | None, highwaters: dict[Any, int] | None = None) -> None:
        if thread is not None:
            self._thread = thread
        self.highwaters = highwaters or {}

    def highwater(self, tp: Any) -> int:
        return self.highwaters[tp]


class App:
    def __init__(self, consumer: FaustConsumer) -> None:
        self.consumer = consumer
        self.producer = Producer()

    async def maybe_start_producer(self) -> Producer:
        return self.producer


def now_ms() -> int:
    return int(time.time() * 1000)


def marker(app: App, partitions: int = 4) -> Watermarker:
    return Watermarker(app, TOPIC, partitions)  # type: ignore[arg-type]


async def test_heartbeats_go_to_the_partitions_written_nothing_for_a_second_and_never_pile_up() -> None:
    app = App(FaustConsumer(Thread(Aiokafka())))
    marks = marker(app)
    marks.admitted(("deduped", 0), now_ms() - 30_000, 5)  # its last record is 30 s old
    marks.wrote([1])  # a bundle just went to partition 1
    mono = time.monotonic()
    await marks.beat(mono)
    sent = app.producer.sent
    assert [s["partition"] for s in sent] == [0, 2, 3]
    first = sent[0]
    assert (first["topic"], first["key"], first["value"], first["timestamp"]) == (TOPIC, marks.regrouper, b"",
                                                                                   None)
    assert [k for k, _ in first["headers"]] == [HEARTBEAT_HEADER, WATERMARK_HEADER, REGROUPER_HEADER]
    regrouper, mark = read_watermark(first["headers"]) or (b"", 0)
    assert regrouper == marks.regrouper and abs(mark - (now_ms() - 30_000)) < 1000

    await marks.beat(mono + 2)  # the broker has not taken the last round: none more
    assert len(sent) == 3
    for future in app.producer.futures:
        future.set_exception(OSError("broker down"))  # a lost heartbeat is only logged
    await marks.beat(mono + 2)
    assert [s["partition"] for s in sent[3:]] == [0, 1, 2, 3]
    for future in app.producer.futures[3:]:
        future.set_result(None)
    marks.wrote([2], mono + 2.6)  # a bundle
    await marks.beat(mono + 2.9)  # each was written to less than a second ago
    assert len(sent) == 7
    await marks.beat(mono + 3.0)
    assert [s["partition"] for s in sent[7:]] == [0, 1, 3]


async def test_bundle_headers_carry_our_watermark_instead_of_the_inputs() -> None:
    marks = marker(App(FaustConsumer(Thread(Aiokafka()))))
    given = [("kotel.tenant", b"a"), (WATERMARK_HEADER, b"5"), (REGROUPER_HEADER, b"someone-else")]
    headers = marks.headers(given)
    assert headers[0] == ("kotel.tenant", b"a") and len(headers) == 3
    found = read_watermark(headers)
    assert found is not None and found[0] == marks.regrouper and abs(found[1] - now_ms()) < 1000


def test_source_clocks_move_on_aiokafkas_fetch_facts_only() -> None:
    aiokafka = Aiokafka()
    marks = marker(App(FaustConsumer(Thread(aiokafka))))
    stamp = now_ms() - 60_000
    before = now_ms()
    marks.admitted(("deduped", 0), stamp, 9)
    after = now_ms()
    assert marks.watermark() == stamp  # not assigned in aiokafka (yet): no evidence
    aiokafka.facts[("deduped", 0)] = (12, after + 3_000)  # three newer records wait
    assert marks.watermark() == stamp
    aiokafka.facts[("deduped", 0)] = (10, after + 3_000)  # caught up, as of a fetch 3 s on
    assert stamp + 3_000 <= marks.watermark() <= stamp + 3_000 + after - before


def test_without_aiokafkas_consumer_clocks_hold_and_a_warning_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    tp = ("deduped", 0)
    stamp = now_ms() - 60_000
    not_started = marker(App(FaustConsumer(Thread(None))))
    not_started.admitted(tp, stamp, 9)
    with caplog.at_level(logging.WARNING, logger="kotel.tail"):
        assert not_started.watermark() == stamp
    assert caplog.records == []  # before the consumer started: nothing to warn about

    elsewhere = marker(App(FaustConsumer(None, highwaters={tp: 10})))  # another Faust: no _thread
    elsewhere.admitted(tp, stamp, 9)
    with caplog.at_level(logging.WARNING, logger="kotel.tail"):
        assert elsewhere.watermark() == stamp
        assert elsewhere.watermark() == stamp
    assert [r.getMessage() for r in caplog.records] == [
        "aiokafka's consumer is not reachable through Faust: source partitions' clocks stay at their last "
        "record until the next one (decisions wait longer)"]


class Message:
    def __init__(self, headers: list[tuple[str, bytes]]) -> None:
        self.headers, self.topic, self.partition, self.offset = headers, TOPIC, 0, 7


def test_a_malformed_watermark_is_counted_and_ignored() -> None:
    bad = Counter("bad", "bad", registry=CollectorRegistry())
    assert watermark_of(Message([(WATERMARK_HEADER, b"12x"), (REGROUPER_HEADER, b"r")]), bad) is None
    assert watermark_of(Message([("kotel.tenant", b"a")]), bad) is None  # none at all: not counted
    assert watermark_of(Message([(WATERMARK_HEADER, b"12"), (REGROUPER_HEADER, b"r")]), bad) == (b"r", 12)
    assert bad._value.get() == 1


async def test_a_send_stuck_on_the_broker_does_not_stop_the_clock_from_looking() -> None:
    """Faust's producer waits out a full buffer: the source clock must still notice the broker gone."""
    aiokafka = Aiokafka()
    app = App(FaustConsumer(Thread(aiokafka)))
    stuck = asyncio.Event()
    sends: list[int] = []

    async def send(*_: Any, partition: int, **__: Any) -> asyncio.Future[None]:
        sends.append(partition)
        await stuck.wait()  # never set: the broker is gone
        raise AssertionError("unreachable")

    app.producer.send = send  # type: ignore[method-assign]
    marks = marker(app, partitions=1)
    tp = ("deduped", 0)
    stamp = now_ms() - 10_000
    marks.admitted(tp, stamp, 4)
    looked: list[int] = []
    real = marks.sources.watermark

    def watermark(now_ms: int, poll: Any) -> int:
        looked.append(now_ms)
        return real(now_ms, poll)

    marks.sources.watermark = watermark  # type: ignore[method-assign]
    mono = time.monotonic()
    for round_ in range(3):
        marks.tick(mono + round_)
        await asyncio.sleep(0)
    assert sends == [0]  # one round in flight, none piled up behind it
    assert len(looked) >= 3  # but the clock looked every round
    assert marks._beating is not None and not marks._beating.done()
    marks._beating.cancel()
