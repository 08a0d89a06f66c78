"""Tail sampling's event time without a broker: the regroupers' low watermark and the decision clock.

Times are passed in: ``now`` is the wall clock in ms, ``mono`` the monotonic clock in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from rocksdict import Options, Rdict

from streams.stages.tail_clock import (
    REGROUPER_HEADER,
    WATERMARK_HEADER,
    BadWatermark,
    DecisionClock,
    RegroupClock,
    read_watermark,
    watermark_headers,
    without_watermark,
)
from streams.stages.tail_core import fragments
from streams.stages.tail_state import TraceState
from tests.unit.test_tail_core import LIMITS, ErrorsSampled, bundle_of, ids_of, span, tid

T = 1_700_000_000_000  # a wall-clock time, ms
EXPIRY = 60_000


# --- regroup side ----------------------------------------------------------------------------------

def test_the_watermark_is_the_slowest_source_partition_capped_at_the_wall_clock() -> None:
    clock = RegroupClock()
    clock.admitted("A", T, 0.0)
    clock.admitted("B", T - 20_000, 0.0)
    assert clock.watermark(T, 0.0) == T - 20_000
    clock.admitted("B", T + 5_000, 0.0)  # a producer's clock ahead of ours
    assert clock.watermark(T, 0.0) == T
    assert RegroupClock().watermark(T, 0.0) == T  # nothing admitted yet: nothing holds it back


def test_an_idle_caught_up_partition_moves_on_with_the_clock() -> None:
    clock = RegroupClock()
    clock.admitted("A", T - 100, 10.0)
    assert clock.watermark(T + 5_000, 15.0) == T + 4_900
    assert clock.watermark(T + 9_000, 19.0) == T + 8_900


def test_a_lagging_partition_holds_the_watermark_back_while_it_delivers() -> None:
    clock = RegroupClock()
    for second in range(30):  # A is caught up, B delivers records 20 s old, both continuously
        now, mono = T + second * 1000, 100.0 + second
        clock.admitted("A", now - 50, mono)
        clock.admitted("B", now - 20_000, mono)
        assert clock.watermark(now + 100, mono + 0.1) == now - 19_900
    clock.admitted("B", T + 28_990, 129.0)  # B caught up: only the pipeline's latency is left
    assert clock.watermark(T + 29_040, 129.04) == T + 28_990


def test_revoked_partitions_stop_counting() -> None:
    clock = RegroupClock()
    clock.admitted("A", T, 0.0)
    clock.admitted("B", T - 20_000, 0.0)
    clock.keep(["A", "C"])  # B went to another worker; C is new and has delivered nothing yet
    assert clock.watermark(T, 0.0) == T
    clock.admitted("B", T - 20_000, 0.0)  # assigned back and delivering again
    assert clock.watermark(T, 0.0) == T - 20_000


# --- deciding side ---------------------------------------------------------------------------------

def test_the_decision_clock_is_the_lowest_regrouper_watermark_moving_on_since_heard() -> None:
    clock = DecisionClock(EXPIRY)
    clock.heard(b"r1", T, 0.0)
    clock.heard(b"r2", T - 20_000, 0.0)
    assert clock.now(T, 0.0) == T - 20_000
    assert clock.now(T + 2_000, 2.0) == T - 18_000
    clock.heard(b"r2", T - 17_000, 2.5)  # a later, still lagging bundle of r2
    assert clock.now(T + 3_000, 3.0) == T - 16_500
    clock.heard(b"r2", T - 30_000, 3.0)  # r2 took over a partition further behind: the clock goes back
    assert clock.now(T + 3_000, 3.0) == T - 30_000


def test_a_dead_regrouper_never_stalls_decisions_and_is_forgotten() -> None:
    clock = DecisionClock(EXPIRY)
    clock.heard(b"dead", T - 20_000, 0.0)  # it died 20 s behind and is never heard again
    for second in range(1, 60):
        clock.heard(b"live", T + second * 1000 - 100, float(second))
        assert clock.now(T + second * 1000, float(second)) == T - 20_000 + second * 1000
    assert len(clock) == 2
    assert clock.now(T + 60_000, 60.0) == T + 59_900  # unheard for the expiry: only "live" counts
    assert len(clock) == 1
    clock.heard(b"idle", T + 60_000, 60.0)  # caught up, then idle: gone once at the wall clock
    clock.heard(b"live", T + 60_000, 60.0)
    assert clock.now(T + 61_000, 61.0) == T + 61_000 and len(clock) == 0


def test_bundles_without_headers_count_by_their_latest_time_as_before() -> None:
    clock = DecisionClock(EXPIRY)
    clock.unmarked(T, 0.0)
    clock.unmarked(T - 20_000, 1.0)  # an older record does not move it back
    assert clock.now(T + 1_500, 1.5) == T + 500
    clock.heard(b"r1", T - 5_000, 1.5)  # a topic with both: the lower one counts
    assert clock.now(T + 1_500, 1.5) == T - 5_000


def test_a_seeded_clock_holds_until_it_expires_or_reaches_the_wall_clock() -> None:
    clock = DecisionClock(EXPIRY)
    clock.heard(b"old", T - 90_000, 0.0)
    clock.seed(T - 10_000, 0.0)  # a takeover: the logged clock, the previous owner's entries gone
    clock.heard(b"r1", T, 0.0)
    assert clock.now(T + 3_000, 3.0) == T - 7_000
    assert clock.now(T + 61_000, 61.0) == T + 61_000  # the seed expired and r1 is at the wall clock


def test_watermark_headers_round_trip_and_are_replaced_not_doubled() -> None:
    headers = [("kotel.tenant", b"a"), *watermark_headers(b"ab12", T)]
    assert headers[1:] == [(WATERMARK_HEADER, b"%d" % T), (REGROUPER_HEADER, b"ab12")]
    assert read_watermark(headers) == (b"ab12", T)
    assert read_watermark([("kotel.tenant", b"a")]) is None
    assert without_watermark(headers) == [("kotel.tenant", b"a")]


@pytest.mark.parametrize(("headers", "message"), [
    ([(WATERMARK_HEADER, b"12x"), (REGROUPER_HEADER, b"r")],
     "kotel.watermark header b'12x' is not a decimal number of milliseconds"),
    ([(WATERMARK_HEADER, b"-5"), (REGROUPER_HEADER, b"r")],
     "kotel.watermark header b'-5' is not a decimal number of milliseconds"),
    ([(WATERMARK_HEADER, b"9" * 19), (REGROUPER_HEADER, b"r")],
     f"kotel.watermark header {b'9' * 19!r} is not a decimal number of milliseconds"),
    ([(WATERMARK_HEADER, None), (REGROUPER_HEADER, b"r")],
     "kotel.watermark header None is not a decimal number of milliseconds"),
    ([(WATERMARK_HEADER, b"12"), (REGROUPER_HEADER, b"")],
     "kotel.regrouper header b'' is not an id of 1 to 64 bytes"),
    ([(WATERMARK_HEADER, b"12"), (REGROUPER_HEADER, b"r" * 65)],
     f"kotel.regrouper header {b'r' * 65!r} is not an id of 1 to 64 bytes"),
    ([(WATERMARK_HEADER, b"12")], "bundle has only one watermark header: kotel.regrouper is missing"),
    ([(REGROUPER_HEADER, b"r")], "bundle has only one watermark header: kotel.watermark is missing"),
])
def test_malformed_watermark_headers_are_refused_with_the_reason(
        headers: list[tuple[str, bytes | None]], message: str) -> None:
    with pytest.raises(BadWatermark) as info:
        read_watermark(headers)
    assert str(info.value) == message


# --- the defect, end to end over the pure parts ----------------------------------------------------

def test_a_lagging_source_partition_keeps_its_error_span_in_the_decision(tmp_path: Path) -> None:
    """The load-test case: source partition A is caught up, B is 20 s behind; trace 1's ERROR span is
    on B. Deciding on the latest input time dropped it; on the watermark the trace waits for B."""
    assert LIMITS.decision_wait_ms == 1000
    source, decision = RegroupClock(), DecisionClock(EXPIRY)
    db = Rdict(str(tmp_path / "p0"), options=Options(raw_mode=True))
    state = TraceState(db, LIMITS)

    def bundle(offset: int, partition: str, stamp: int, now: int, mono: float, *spans: Span) -> None:
        source.admitted(partition, stamp, mono)
        mark = read_watermark(watermark_headers(b"r1", source.watermark(now, mono)))
        assert mark is not None
        decision.heard(*mark, mono)
        state.commit(state.ingest(offset, min(now, stamp), "t", fragments(bundle_of(*spans))))

    bundle(0, "B", T - 20_000, T, 0.0, span(9, 90))  # B delivering its backlog
    bundle(1, "A", T, T, 0.0, span(1, 1, parent=0))  # trace 1's root, on the caught-up partition
    for step in range(1, 20):  # B catches up a second per 0.1 s; the wall clock goes on
        mono = step / 10
        bundle(1 + step, "B", T - 20_000 + step * 1000, T + int(mono * 1000), mono, span(9, 90 + step))
    assert state.due(decision.now(T + 1_900, 1.9), 10) == [(tid(9), "deadline")]  # trace 1 is not due
    bundle(30, "B", T, T + 2_000, 2.0, span(1, 2, error=True))  # B reached trace 1
    assert tid(1) not in [t for t, _ in state.due(decision.now(T + 2_900, 2.9), 10)]
    due = [t for t, _ in state.due(decision.now(T + 3_000, 3.0), 10)]  # B's clock is at T + wait
    assert tid(1) in due
    plan = state.decide(due, ErrorsSampled())
    (out,) = [o for o in plan.outputs if o.trace_id == tid(1)]
    assert sorted(ids_of(out.value)) == [1, 2]
    db.close()
