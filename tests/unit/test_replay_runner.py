"""The replay loop without Kafka: checkpoint only after acknowledgement, retries, dead letters, dry run.

The source is an in-memory list and the targets are scripted Deliverers: what is under test is the
loop's ordering (deliver, dead-letter, then checkpoint) and its counting, which a broker would only
make slower to observe. tests/integration/test_replay.py runs the same loop against the real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from kotel.kafka.deadletter import dead_letter_headers
from kotel.otlp import samples
from kotel.topology.exporters import RetryConfig
from streams.replay.checkpoint import Checkpoint
from streams.replay.plan import Unit
from streams.replay.progress import RateLimiter
from streams.replay.records import Filters, make_record
from streams.replay.runner import Interrupted, TargetRefused, replay
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord

FAST = RetryConfig(
    initial_interval="10ms", max_interval="20ms", max_elapsed_time="150ms", randomization_factor=0
)
VALUE = samples.traces(3).SerializeToString()


class ListSource:
    """Units of records in memory, read ``max_records`` at a time across units in turn."""

    def __init__(self, units: Sequence[Unit], records: dict[str, list[SinkRecord]]) -> None:
        self.units, self.records = list(units), records
        self.position = {u.key: u.next for u in units}

    def read(self, max_records: int, timeout: float) -> list[tuple[Unit, int, SinkRecord]] | None:
        out: list[tuple[Unit, int, SinkRecord]] = []
        for unit in self.units:
            while self.position[unit.key] < unit.end and len(out) < max_records:
                pos = self.position[unit.key]
                out.append((unit, pos, self.records[unit.key][pos - unit.start]))
                self.position[unit.key] = pos + 1
        return out or None

    def positions(self) -> dict[str, int]:
        return dict(self.position)

    def close(self) -> None:
        return None


def _data(tenants: Sequence[str] = ("acme", "beta")) -> tuple[list[Unit], dict[str, list[SinkRecord]]]:
    units = [Unit("0", 0, 0, 6), Unit("1", 1, 10, 14)]
    records = {
        u.key: [
            make_record(
                "kt.raw.traces", u.partition, o, b"k", VALUE,
                [("kotel.tenant", tenants[o % len(tenants)].encode()), ("id", f"{u.key}-{o}".encode())],
                1000 + o, "kt",
            )
            for o in range(u.start, u.end)
        ]
        for u in units
    }  # fmt: skip
    return units, records


class Scripted:
    """Answers per call from a script (then OK); remembers what it was sent."""

    name = "scripted"
    signals = ("traces", "metrics", "logs")

    def __init__(self, script: Sequence[Outcome | dict[str, Outcome]] = ()) -> None:
        self.script = list(script)
        self.calls: list[list[SinkRecord]] = []

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        self.calls.append(list(records))
        step = self.script.pop(0) if self.script else Outcome.OK
        out = []
        for r in records:
            ident = dict(r.headers).get("id", b"").decode()
            outcome = step.get(ident, Outcome.OK) if isinstance(step, dict) else step
            out.append(OK if outcome is Outcome.OK else Result(outcome, f"said {outcome.value}"))
        return out

    async def close(self) -> None:
        return None

    def ids(self) -> list[str]:
        return [dict(r.headers)["id"].decode() for call in self.calls for r in call]


class DeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[SinkRecord, str]] = []

    def send(self, failed: Sequence[tuple[SinkRecord, str]]) -> None:
        self.sent.extend(failed)


async def test_everything_is_delivered_once_and_the_checkpoint_ends_done(tmp_path: Path) -> None:
    units, records = _data()
    target = Scripted()
    checkpoint = Checkpoint(tmp_path / "c.json", "job", units)
    result = await replay(
        ListSource(units, records), units, Filters(), target, checkpoint=checkpoint, batch=4
    )
    assert result.complete and sorted(target.ids()) == sorted(
        [f"0-{o}" for o in range(6)] + [f"1-{o}" for o in range(10, 14)]
    )
    assert [len(c) for c in target.calls] == [4, 4, 2]
    saved = Checkpoint.load(tmp_path / "c.json")
    assert saved.done and [(u.next, u.stats.records, u.stats.items) for u in saved.units] == [
        (6, 6, 18),
        (14, 4, 12),
    ]
    assert (saved.units[1].stats.first_offset, saved.units[1].stats.last_offset) == (10, 13)
    assert (saved.units[0].stats.first_ts, saved.units[0].stats.last_ts) == (1000, 1005)


async def test_the_checkpoint_moves_only_past_acknowledged_chunks(tmp_path: Path) -> None:
    units, records = _data()
    target = Scripted([Outcome.OK] + [Outcome.RETRY] * 50)
    checkpoint = Checkpoint(tmp_path / "c.json", "job", units)
    with pytest.raises(TargetRefused) as err:
        await replay(ListSource(units, records), units, Filters(), target, checkpoint=checkpoint, batch=4,
                     retry=FAST)  # fmt: skip
    assert str(err.value).startswith("scripted kept refusing for ") and str(err.value).endswith(
        "(said retry)"
    )
    saved = Checkpoint.load(tmp_path / "c.json")
    assert [u.next for u in saved.units] == [4, 10]  # the first chunk only
    assert saved.units[0].stats.records == 4 and not saved.done

    resumed = Checkpoint.load(tmp_path / "c.json")
    again = Scripted()
    result = await replay(
        ListSource(resumed.units, records), resumed.units, Filters(), again, checkpoint=resumed
    )
    assert again.ids() == ["0-4", "0-5", "1-10", "1-11", "1-12", "1-13"]  # nothing skipped, nothing repeated
    assert result.totals().records == 10 and result.totals().delivered == 10


async def test_retried_records_are_sent_again_and_counted_once() -> None:
    units, records = _data()
    target = Scripted([{"0-1": Outcome.RETRY}, Outcome.OK])
    result = await replay(ListSource(units, records), units, Filters(), target, batch=4, retry=FAST)
    assert [[dict(r.headers)["id"] for r in c] for c in target.calls[:2]] == [
        [b"0-0", b"0-1", b"0-2", b"0-3"], [b"0-1"],
    ]  # fmt: skip
    assert result.totals().records == 10 and result.totals().delivered == 10


async def test_refused_for_good_goes_to_the_dead_letter_topic_and_the_replay_goes_on() -> None:
    units, records = _data()
    target = Scripted([{"0-2": Outcome.PERMANENT, "0-3": Outcome.PERMANENT}])
    dead = DeadLetters()
    result = await replay(ListSource(units, records), units, Filters(), target, dead_letter=dead, batch=4)
    assert [(r.offset, reason) for r, reason in dead.sent] == [
        (2, "replay to scripted: said permanent"), (3, "replay to scripted: said permanent"),
    ]  # fmt: skip
    assert result.complete and units[0].stats.dead_lettered == 2 and units[0].stats.delivered == 4
    assert result.summary()["totals"]["dead_lettered"] == 2


async def test_without_kafka_a_refusal_stops_the_replay() -> None:
    units, records = _data()
    with pytest.raises(RuntimeError) as err:
        await replay(ListSource(units, records), units, Filters(), Scripted([Outcome.PERMANENT]), batch=4)
    assert str(err.value) == (
        "scripted refused 4 record(s) for good and there is no Kafka to dead-letter them: "
        "replay to scripted: said permanent"
    )


async def test_dry_run_figures_equal_the_real_run() -> None:
    units, records = _data()
    dry = await replay(ListSource(units, records), units, Filters(tenant="acme"), None, batch=3)
    units2, records2 = _data()
    target = Scripted()
    real = await replay(ListSource(units2, records2), units2, Filters(tenant="acme"), target, batch=3)
    strip = ("seconds",)
    assert {k: v for k, v in dry.summary().items() if k not in strip} == {
        k: v for k, v in real.summary().items() if k not in strip
    }
    assert dry.totals().skipped == 5 and dry.totals().delivered == 5 and len(target.ids()) == 5


async def test_redrive_sends_the_original_and_dead_letters_the_dead_letter() -> None:
    unit = Unit("0", 0, 0, 2)
    headers = dead_letter_headers("loki: 500", "kt.tenant.acme.logs", 1, 7, [("id", b"x")])
    recs = [make_record("kt.deadletter", 0, o, b"k", b"v", headers, 0, "kt") for o in range(2)]
    target = Scripted([{"x": Outcome.PERMANENT}, Outcome.OK])
    dead = DeadLetters()
    source = ListSource([unit], {"0": recs})
    await replay(source, [unit], Filters(redrive=True), target, dead_letter=dead)
    sent = target.calls[0][0]
    assert sent.topic == "kt.tenant.acme.logs" and list(sent.headers) == [("id", b"x")]
    assert dead.sent[0][0].topic == "kt.deadletter" and dead.sent[0][0].headers == tuple(headers)


async def test_a_stop_during_retries_leaves_the_chunk_unacknowledged(tmp_path: Path) -> None:
    units, records = _data()
    stop = asyncio.Event()
    target = Scripted([Outcome.RETRY] * 100)
    checkpoint = Checkpoint(tmp_path / "c.json", "job", units)
    checkpoint.save()
    forever = RetryConfig(initial_interval="50ms", max_elapsed_time="0s")
    source = ListSource(units, records)
    task = asyncio.create_task(
        replay(source, units, Filters(), target, checkpoint=checkpoint, stop=stop, retry=forever)
    )
    await asyncio.sleep(0.2)
    stop.set()
    with pytest.raises(Interrupted):
        await asyncio.wait_for(task, 5)
    assert [u.next for u in Checkpoint.load(tmp_path / "c.json").units] == [0, 10]


async def test_rate_limiter_holds_the_average_rate() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = RateLimiter(100, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        await limiter.take(20)
    # 1000 records at 100/s: 10 s, less the 0.1 s burst the bucket starts with
    assert now[0] == pytest.approx(9.9)
    assert limiter.burst == 10
