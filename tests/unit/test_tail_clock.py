"""Tail sampling's event time without a broker: the regroupers' low watermark and the decision clock.

Times are passed in: ``now`` is the wall clock in ms, ``mono`` the monotonic clock in seconds; what the
broker last said of a source partition is a `Poll` (highwater, wall ms of the fetch response).
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from rocksdict import Options, Rdict

from streams.stages.tail_clock import (
    HEARTBEAT_HEADER,
    HOLD_MS,
    OUTAGE_GRACE_MS,
    POLL_GAP_MS,
    REGROUPER_HEADER,
    WATERMARK_HEADER,
    BadWatermark,
    DecisionClock,
    Poll,
    RegroupClock,
    heartbeat_headers,
    is_heartbeat,
    read_watermark,
    watermark_headers,
    without_watermark,
)
from streams.stages.tail_core import fragments
from streams.stages.tail_state import TraceState
from tests.unit.test_tail_core import LIMITS, ErrorsSampled, bundle_of, ids_of, span, tid

T = 1_700_000_000_000  # a wall-clock time, ms
EXPIRY = 60_000


def no_poll(_: Hashable) -> Poll | None:
    return None


# --- regroup side ----------------------------------------------------------------------------------

def test_the_watermark_is_the_slowest_source_partition_capped_at_the_wall_clock() -> None:
    clock = RegroupClock()
    clock.admitted("A", T, 10, T)
    clock.admitted("B", T - 20_000, 5, T)
    assert clock.watermark(T, no_poll) == T - 20_000
    clock.admitted("B", T + 5_000, 6, T)  # a producer's clock ahead of ours
    assert clock.watermark(T, no_poll) == T
    assert RegroupClock().watermark(T, no_poll) == T  # nothing admitted yet: nothing holds it back


def test_without_a_fetch_after_its_record_a_partition_does_not_move() -> None:
    clock = RegroupClock()
    clock.admitted("A", T - 100, 7, T)
    assert clock.watermark(T + 30_000, no_poll) == T - 100  # no fact at all
    assert clock.watermark(T + 30_000, {"A": Poll(8, None)}.get) == T - 100  # never fetched
    assert clock.watermark(T + 30_000, {"A": Poll(None, T + 500)}.get) == T - 100  # highwater unknown
    assert clock.watermark(T + 30_000, {"A": Poll(8, T - 1)}.get) == T - 100  # the fetch that brought it


def test_a_caught_up_partition_advances_only_as_far_as_the_last_fetch() -> None:
    clock = RegroupClock()
    clock.admitted("A", T - 100, 7, T)
    caught_up = {"A": Poll(8, T + 1_500)}
    assert clock.watermark(T + 1_600, caught_up.get) == T + 1_400
    assert clock.watermark(T + 4_000, caught_up.get) == T + 1_400  # no newer fetch: no further
    caught_up["A"] = Poll(8, T + 3_000)
    assert clock.watermark(T + 4_000, caught_up.get) == T + 2_900
    clock.admitted("A", T + 3_900, 8, T + 4_000)  # the next record: its own time, then its fetches
    assert clock.watermark(T + 4_000, caught_up.get) == T + 3_900


def test_a_lagging_partition_holds_the_watermark_at_its_last_record() -> None:
    clock = RegroupClock()
    facts: dict[Hashable, Poll] = {}
    for second in range(30):  # A is caught up, B delivers records 20 s old, both continuously
        now = T + second * 1000
        clock.admitted("A", now - 50, second, now)
        clock.admitted("B", now - 20_000, second, now)
        facts["A"] = Poll(second + 1, now + 100)  # nothing newer on A
        facts["B"] = Poll(second + 500, now + 100)  # B's backlog is still there
        assert clock.watermark(now + 100, facts.get) == now - 20_000
    clock.admitted("B", T + 28_990, 30, T + 29_000)  # B caught up: only the pipeline's latency is left
    facts["B"] = Poll(31, T + 29_040)
    assert clock.watermark(T + 29_040, facts.get) == T + 29_030


def test_fetch_time_across_an_outage_is_no_evidence() -> None:
    clock = RegroupClock()
    clock.admitted("A", T - 100, 7, T)
    facts = {"A": Poll(8, T + 1_500)}
    assert clock.watermark(T + 2_000, facts.get) == T + 1_400
    for now in range(T + 3_000, T + 60_000, 1000):  # the broker is down: no fetch response comes
        assert clock.watermark(now, facts.get) == T + 1_400
    facts["A"] = Poll(8, T + 60_000)  # back, and A has nothing newer: agents may still hold spills
    assert clock.watermark(T + 60_100, facts.get) == T + 1_400
    back = T + 60_000 + OUTAGE_GRACE_MS
    for at in range(T + 61_500, back + 1, 1500):  # the grace: fetches say nothing of the agents' spills
        facts["A"] = Poll(8, at)
        assert clock.watermark(at + 100, facts.get) == T + 1_400
    facts["A"] = Poll(8, back + 1_500)  # then fetch time counts again
    assert clock.watermark(back + 1_600, facts.get) == T + 2_900
    facts["A"] = Poll(8, back + 1_500 + POLL_GAP_MS)  # a pause seen by nobody as an outage still counts
    assert clock.watermark(back + 1_500 + POLL_GAP_MS, facts.get) == T + 2_900 + POLL_GAP_MS


def test_a_record_moves_the_clock_during_an_outage_grace() -> None:
    clock = RegroupClock()
    clock.admitted("A", T - 100, 7, T)
    facts = {"A": Poll(8, T + 1_000)}
    assert clock.watermark(T + 1_000, facts.get) == T + 900
    for now in range(T + 2_000, T + 60_000, 1000):
        clock.watermark(now, facts.get)  # down: the fetch responses stop
    facts["A"] = Poll(8, T + 60_000)
    assert clock.watermark(T + 60_000, facts.get) == T + 900
    clock.admitted("A", T + 5_000, 8, T + 61_000)  # a spilled record, replayed with its own time
    facts["A"] = Poll(9, T + 62_000)
    assert clock.watermark(T + 62_000, facts.get) == T + 5_000  # its time, no fetch time: still the grace
    end = T + 60_000 + OUTAGE_GRACE_MS
    facts["A"] = Poll(9, end + 2_000)
    assert clock.watermark(end + 2_000, facts.get) == T + 7_000


def test_a_record_that_ends_an_outage_does_not_end_its_grace() -> None:
    """The first record after an outage (one the dedup stage retried) used to reset the partition's
    source and with it the outage: fetch time ran on while the agents' spills still held spans."""
    clock = RegroupClock()
    clock.admitted("A", T - 100, 7, T)
    facts = {"A": Poll(8, T + 1_000)}
    for now in range(T + 1_000, T + 60_000, 1000):
        clock.watermark(now, facts.get)  # down from T + 1 s: the fetch responses stop
    clock.admitted("A", T + 900, 8, T + 60_500)  # back: a retried record comes before any watermark
    for at in range(T + 61_000, T + 60_000 + OUTAGE_GRACE_MS, 1500):  # caught up, nothing newer
        facts["A"] = Poll(9, at)
        assert clock.watermark(at, facts.get) == T + 900
    end = T + 61_000 + OUTAGE_GRACE_MS
    facts["A"] = Poll(9, end + 1_000)
    assert clock.watermark(end + 1_000, facts.get) == T + 1_900  # then fetch time counts again


def test_a_short_silence_is_followed_by_as_short_a_grace() -> None:
    """A rebalance or a stalled loop of 8 s must not hold decisions for the 45 s of a long outage."""
    clock = RegroupClock()
    clock.admitted("A", T, 7, T)
    facts = {"A": Poll(8, T + 1_000)}
    assert clock.watermark(T + 1_000, facts.get) == T + 1_000
    clock.watermark(T + 7_000, facts.get)  # silent for more than POLL_GAP_MS
    facts["A"] = Poll(8, T + 9_000)  # back after 8 s: fetch time counts again from T + 17 s
    assert clock.watermark(T + 9_000, facts.get) == T + 1_000
    facts["A"] = Poll(8, T + 16_000)
    assert clock.watermark(T + 16_000, facts.get) == T + 1_000
    facts["A"] = Poll(8, T + 20_000)
    assert clock.watermark(T + 20_000, facts.get) == T + 4_000


def test_revoked_partitions_stop_counting() -> None:
    clock = RegroupClock()
    clock.admitted("A", T, 1, T)
    clock.admitted("B", T - 20_000, 1, T)
    clock.keep(["A", "C"])  # B went to another worker; C is new and has delivered nothing yet
    assert clock.watermark(T, no_poll) == T
    clock.admitted("B", T - 20_000, 2, T)  # assigned back and delivering again
    assert clock.watermark(T, no_poll) == T - 20_000


# --- deciding side ---------------------------------------------------------------------------------

def test_the_decision_clock_is_the_lowest_regrouper_watermark_and_never_runs_on() -> None:
    clock = DecisionClock(EXPIRY)
    clock.heard(b"r1", T, 0.0)
    clock.heard(b"r2", T - 20_000, 0.0)
    assert clock.now(T, 0.0) == T - 20_000
    assert clock.now(T + 30_000, 30.0) == T - 20_000  # nothing heard: nothing moves
    clock.heard(b"r2", T - 17_000, 30.5)  # a later, still lagging watermark of r2
    assert clock.now(T + 31_000, 31.0) == T - 17_000
    clock.heard(b"r2", T - 30_000, 31.0)  # r2 took over a partition further behind: the clock goes back
    assert clock.now(T + 31_000, 31.0) == T - 30_000
    clock.heard(b"r1", T + 90_000, 31.0)  # a producer's clock ahead of ours
    clock.heard(b"r2", T + 90_000, 31.0)
    assert clock.now(T + 31_000, 31.0) == T + 31_000


def test_heartbeats_keep_an_idle_regrouper_live() -> None:
    clock = DecisionClock(EXPIRY)
    for second in range(200):  # r1 writes bundles; r2 is idle, its heartbeats repeat its watermark
        clock.heard(b"r1", T + second * 1000, float(second))
        clock.heard(b"r2", T + 5_000, float(second))
        assert clock.now(T + second * 1000, float(second)) == min(T + second * 1000, T + 5_000)
        assert len(clock) == 2


def test_a_dead_regrouper_expires_after_expire_ms_of_listening() -> None:
    clock = DecisionClock(EXPIRY)
    clock.heard(b"dead", T - 20_000, 0.0)  # it died 20 s behind and is never heard again
    for second in range(1, 60):
        clock.heard(b"live", T + second * 1000, float(second))
        assert clock.now(T + second * 1000, float(second)) == T - 20_000
    assert len(clock) == 2
    clock.heard(b"live", T + 60_000, 60.0)
    assert clock.now(T + 60_000, 60.0) == T + 60_000  # unheard for the expiry: only "live" counts
    assert len(clock) == 1


def test_an_outage_expires_no_one_and_stops_the_clock() -> None:
    clock = DecisionClock(EXPIRY)
    clock.heard(b"r1", T, 0.0)
    clock.heard(b"r2", T - 3_000, 0.0)
    for second in range(1, 300):  # the broker is down: nothing is heard for five minutes
        assert clock.now(T + second * 1000, float(second)) == T - 3_000
    assert len(clock) == 2
    clock.heard(b"r1", T + 1_000, 300.0)  # back: r1 is heard first, r2 (behind) still holds the clock
    assert clock.now(T + 300_000, 300.0) == T - 3_000
    clock.heard(b"r2", T + 500, 300.5)
    assert clock.now(T + 300_500, 300.5) == T + 500


def test_with_no_live_entry_the_clock_stays_where_it_was() -> None:
    clock = DecisionClock(EXPIRY)
    assert clock.now(T, 0.0) == 0  # nothing known yet: nothing is due
    clock.seed(T - 10_000, 0.0)  # a takeover's logged clock, then silence: the seed's hold runs out
    assert clock.now(T + 600_000, 600.0) == T - 10_000
    assert len(clock) == 0
    assert clock.now(T + 900_000, 900.0) == T - 10_000  # not the wall clock
    clock.heard(b"r1", T - 2_000, 900.0)  # a regrouper heard: its watermark moves it on
    assert clock.now(T + 900_000, 900.0) == T - 2_000


def test_a_seeded_clock_holds_until_the_regroupers_were_heard() -> None:
    clock = DecisionClock(EXPIRY)
    clock.heard(b"old", T - 90_000, 0.0)
    clock.seed(T - 10_000, 0.0)  # a takeover: the logged clock, the previous owner's entries gone
    hold = HOLD_MS // 1000
    for second in range(hold):
        clock.heard(b"r1", T + second * 1000, float(second))
        assert clock.now(T + second * 1000, float(second)) == T - 10_000
    clock.heard(b"r1", T + hold * 1000, float(hold))
    assert clock.now(T + hold * 1000, float(hold)) == T + hold * 1000
    assert len(clock) == 1


def test_bundles_without_headers_count_by_their_latest_time_as_before() -> None:
    clock = DecisionClock(EXPIRY)
    clock.unmarked(T, 0.0)
    clock.unmarked(T - 20_000, 1.0)  # an older record does not move it back
    assert clock.now(T + 1_500, 1.5) == T
    clock.unmarked(T + 1_000, 2.0)
    assert clock.now(T + 2_000, 2.0) == T + 1_000
    clock.heard(b"r1", T - 5_000, 2.0)  # a topic with both: the lower one counts
    assert clock.now(T + 2_000, 2.0) == T - 5_000
    for second in range(3, 3 + HOLD_MS // 1000):  # the old writer stopped: its entry goes after the hold
        clock.heard(b"r1", T + 9_000, float(second))
    assert clock.now(T + 9_000, 2.0 + HOLD_MS / 1000) == T + 9_000


# --- headers ---------------------------------------------------------------------------------------

def test_watermark_headers_round_trip_and_are_replaced_not_doubled() -> None:
    headers = [("kotel.tenant", b"a"), *watermark_headers(b"ab12", T)]
    assert headers[1:] == [(WATERMARK_HEADER, b"%d" % T), (REGROUPER_HEADER, b"ab12")]
    assert read_watermark(headers) == (b"ab12", T)
    assert read_watermark([("kotel.tenant", b"a")]) is None
    assert without_watermark(headers) == [("kotel.tenant", b"a")]
    assert not is_heartbeat(headers)


def test_a_heartbeat_carries_the_watermark_and_is_recognised() -> None:
    beat = heartbeat_headers(b"ab12", T)
    assert beat == [(HEARTBEAT_HEADER, b"1"), (WATERMARK_HEADER, b"%d" % T), (REGROUPER_HEADER, b"ab12")]
    assert is_heartbeat(beat) and read_watermark(beat) == (b"ab12", T)
    assert without_watermark([("kotel.tenant", b"a"), *beat]) == [("kotel.tenant", b"a")]


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


# --- the defects, end to end over the pure parts ---------------------------------------------------

class Pipeline:
    """One regrouper over source partitions, one trace partition's state and clock (wait 1 s)."""

    def __init__(self, path: Path) -> None:
        assert LIMITS.decision_wait_ms == 1000
        self.source, self.decision = RegroupClock(), DecisionClock(EXPIRY)
        self.facts: dict[Hashable, Poll] = {}
        self.db = Rdict(str(path), options=Options(raw_mode=True))
        self.state = TraceState(self.db, LIMITS)
        self.offset = 0

    def mark(self, now: int, mono: float) -> None:
        """A heartbeat: the regrouper's watermark, heard by the trace partition."""
        found = read_watermark(heartbeat_headers(b"r1", self.source.watermark(now, self.facts.get)))
        assert found is not None
        self.decision.heard(*found, mono)

    def bundle(self, partition: str, offset: int, stamp: int, now: int, mono: float, *spans: Span) -> None:
        self.source.admitted(partition, stamp, offset, now)
        self.mark(now, mono)
        self.offset += 1
        self.state.commit(self.state.ingest(self.offset, min(now, stamp), "t", fragments(bundle_of(*spans))))

    def due(self, now: int, mono: float) -> list[bytes]:
        return [t for t, _ in self.state.due(self.decision.now(now, mono), 10)]


def test_a_lagging_source_partition_keeps_its_error_span_in_the_decision(tmp_path: Path) -> None:
    """The load-test case: source partition A is caught up, B is 20 s behind; trace 1's ERROR span is
    on B. Deciding on the latest input time dropped it; on the watermark the trace waits for B."""
    run = Pipeline(tmp_path / "p0")
    run.facts["B"] = Poll(1000, T)  # B's backlog
    run.bundle("B", 0, T - 20_000, T, 0.0, span(9, 90))
    run.bundle("A", 0, T, T, 0.0, span(1, 1, parent=0))  # trace 1's root, on the caught-up partition
    for step in range(1, 20):  # B catches up a second per 0.1 s; A stays caught up and idle
        now = T + step * 100
        run.facts["A"] = Poll(1, now)
        run.bundle("B", step, T - 20_000 + step * 1000, now, step / 10, span(9, 90 + step))
    assert run.due(T + 1_900, 1.9) == [tid(9)]  # trace 1 is not due
    run.bundle("B", 30, T, T + 2_000, 2.0, span(1, 2, error=True))  # B reached trace 1
    run.facts.update(A=Poll(1, T + 2_900), B=Poll(31, T + 2_900))  # both caught up, idle
    run.mark(T + 2_900, 2.9)
    assert tid(1) not in run.due(T + 2_900, 2.9)
    run.facts.update(A=Poll(1, T + 3_000), B=Poll(31, T + 3_000))
    run.mark(T + 3_000, 3.0)
    due = run.due(T + 3_000, 3.0)  # B's clock is at T + wait
    assert tid(1) in due
    (out,) = [o for o in run.state.decide(due, ErrorsSampled()).outputs if o.trace_id == tid(1)]
    assert sorted(ids_of(out.value)) == [1, 2]
    run.db.close()


def test_an_outage_stops_the_clocks_and_spilled_spans_still_count(tmp_path: Path) -> None:
    """The outage case: trace 1's root is in before the broker goes down; its ERROR span waits in an
    agent's spill and arrives after it, with its original time. Running on with the wall clock decided
    the trace during the outage and dropped it; on evidence the clocks wait."""
    run = Pipeline(tmp_path / "p0")
    run.bundle("A", 0, T, T, 0.0, span(1, 1, parent=0))
    run.facts["A"] = Poll(1, T + 200)
    run.mark(T + 200, 0.2)
    for second in range(1, 60):  # down for a minute: no fetch response, nothing heard
        run.source.watermark(T + second * 1000, run.facts.get)  # the regrouper still looks
        assert run.due(T + second * 1000, float(second)) == []
    run.facts["A"] = Poll(1, T + 60_000)  # back, A still empty: the regrouper goes on from its clock
    run.mark(T + 60_000, 60.0)
    run.facts["A"] = Poll(1, T + 60_500)
    run.mark(T + 60_500, 60.5)
    assert run.due(T + 60_500, 60.5) == []
    run.bundle("A", 1, T + 10, T + 60_600, 60.6, span(1, 2, error=True))  # replayed from the spill
    run.facts["A"] = Poll(2, T + 62_000)
    run.mark(T + 62_000, 62.0)
    assert run.due(T + 62_000, 62.0) == []  # the outage's grace: only records move the clock
    late = T + 60_000 + OUTAGE_GRACE_MS + LIMITS.decision_wait_ms
    run.facts["A"] = Poll(2, late)
    run.mark(late, late / 1000 - T / 1000)
    due = run.due(late, late / 1000 - T / 1000)
    assert due == [tid(1)]
    (out,) = run.state.decide(due, ErrorsSampled()).outputs
    assert sorted(ids_of(out.value)) == [1, 2]
    run.db.close()
