"""Tail-sampling policies against the Collector's tailsamplingprocessor rules, on real OTLP spans."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from kotel.topology import TopologyError, load_topology, parse_topology
from kotel.topology.tail_sampling import TailSamplingConfig
from streams.stages import tail_policy_leaves
from streams.stages.tail_policies import TailSampler, TraceDecision
from streams.stages.tail_policy_leaves import (
    DEFAULT_HASH_SALT,
    NOT_SAMPLED,
    SAMPLED,
    OttlCondition,
    PolicyError,
    TraceData,
    fnv1a_64,
    sampling_threshold,
)
from tests.unit.otlp_builders import kvs

TID = bytes(range(16))
T0 = 1_700_000_000_000_000_000  # ns
MS = 1_000_000
ERROR, OK = Status.STATUS_CODE_ERROR, Status.STATUS_CODE_OK
TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sp(start_ms: float = 0, dur_ms: float = 1, status: int = 0, state: str = "", **attrs: Any) -> Span:
    start, end = T0 + int(start_ms * MS), T0 + int((start_ms + dur_ms) * MS)
    span = Span(trace_id=TID, span_id=b"\x01" * 8, name="op", trace_state=state,
                start_time_unix_nano=start, end_time_unix_nano=end)  # fmt: skip
    span.status.code = status  # type: ignore[assignment]
    span.attributes.extend(kvs(attrs))
    return span


def res(*spans: Span, **attrs: Any) -> ResourceSpans:
    entry = ResourceSpans()
    entry.resource.attributes.extend(kvs(attrs))
    half = len(spans) // 2  # two scopes, so every policy has to look past the first one
    entry.scope_spans.add().spans.extend(spans[:half])
    entry.scope_spans.add().spans.extend(spans[half:])
    return entry


def sampler(*policies: dict[str, Any], clock: Clock | None = None) -> TailSampler:
    return TailSampler(TailSamplingConfig.model_validate({"policies": list(policies)}), clock or Clock())


def pol(name: str, ptype: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "type": ptype, **({ptype: options} if options else {})}


def spans(n: int, **attrs: Any) -> list[ResourceSpans]:
    return [res(*(sp(**attrs) for _ in range(n)))]


def yes(name: str) -> TraceDecision:
    return TraceDecision(True, name)


NO = TraceDecision(False, "")
ALWAYS = pol("always", "always_sample")


# --- leaves -----------------------------------------------------------------------------------------------


def test_always_sample_and_policy_names_in_config_order() -> None:
    s = sampler(ALWAYS, pol("d", "drop", drop_sub_policy=[pol("x", "span_count", min_spans=99)]))
    assert s.policy_names == ("always", "d")
    assert s.decide(TID, spans(1)) == yes("always")


def test_latency_is_earliest_start_to_latest_end_across_every_resource() -> None:
    s = sampler(pol("slow", "latency", threshold_ms=1000))
    # No span lasts long, but the trace spans 1000 ms from the first start to the last end.
    assert s.decide(TID, [res(sp(0, 10)), res(sp(500, 10)), res(sp(990, 10))]) == yes("slow")
    late_end = sp(990, 10)
    late_end.end_time_unix_nano -= 1  # 999.999999 ms: Go's Milliseconds() truncates
    assert s.decide(TID, [res(sp(0, 10)), res(late_end)]) == NO
    assert s.decide(TID, [res(sp(0, 5000))]) == yes("slow")


def test_latency_threshold_zero_keeps_every_trace_even_without_timestamps() -> None:
    unset = Span(trace_id=TID, span_id=b"\x01" * 8)
    assert sampler(pol("any", "latency", threshold_ms=0)).decide(TID, [res(unset)]) == yes("any")
    assert sampler(pol("any", "latency", threshold_ms=1)).decide(TID, [res(unset)]) == NO


@pytest.mark.parametrize(("duration", "sampled"), [(100, False), (101, True), (200, True), (201, False)])
def test_latency_upper_threshold_is_exclusive_below_inclusive_above(duration: int, sampled: bool) -> None:
    s = sampler(pol("band", "latency", threshold_ms=100, upper_threshold_ms=200))
    assert s.decide(TID, [res(sp(0, duration))]).sampled is sampled


def test_latency_upper_threshold_judges_the_whole_trace_not_a_prefix() -> None:
    s = sampler(pol("band", "latency", threshold_ms=100, upper_threshold_ms=200))
    assert s.decide(TID, [res(sp(0, 150)), res(sp(0, 300))]) == NO


@pytest.mark.parametrize(("codes", "statuses", "sampled"), [
    (["ERROR"], [OK, ERROR, OK], True),
    (["ERROR"], [OK, 0, OK], False),
    (["UNSET"], [OK, 0], True),  # a span without a status is UNSET
    (["OK", "ERROR"], [0, OK], True),
])  # fmt: skip
def test_status_code_matches_any_span(codes: list[str], statuses: list[int], sampled: bool) -> None:
    s = sampler(pol("st", "status_code", status_codes=codes))
    assert s.decide(TID, [res(sp(status=c)) for c in statuses]).sampled is sampled


def test_probabilistic_uses_the_collectors_hash_and_threshold_bit_for_bit() -> None:
    # Reference values printed by Go 1.x: fnv.New64a over salt + id, and big.Float MaxUint64 * ratio.
    go_thresholds = {
        0.1: 18446744073709551, 10: 1844674407370955263, 33.3: 6142765776545279999,
        50: 9223372036854775807, 66.7: 12303978297164271615, 100: 18446744073709551615,
    }  # fmt: skip
    assert {p: sampling_threshold(p / 100) for p in go_thresholds} == go_thresholds
    seed = fnv1a_64(DEFAULT_HASH_SALT.encode())
    assert fnv1a_64(TID, seed) == 11989194628990176781
    assert fnv1a_64(b"\xff" * 16, seed) == 1711019809656077869
    assert fnv1a_64(TID, fnv1a_64(b"tenant-salt")) == 2504796723717168096
    # So this trace id is kept at 66.7 % (hash below threshold) and not at 50 %.
    assert sampler(pol("p", "probabilistic", sampling_percentage=66.7)).decide(TID, spans(1)) == yes("p")
    assert sampler(pol("p", "probabilistic", sampling_percentage=50)).decide(TID, spans(1)) == NO


def _kept(s: TailSampler, ids: list[bytes]) -> set[bytes]:
    trace = spans(1)
    return {i for i in ids if s.decide(i, trace).sampled}


_RNG = random.Random(8)
IDS = [_RNG.randbytes(16) for _ in range(20_000)]
assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("percentage", [10, 33.3])
def test_probabilistic_share_is_within_two_points(percentage: float) -> None:
    kept = _kept(sampler(pol("p", "probabilistic", sampling_percentage=percentage)), IDS)
    assert abs(100 * len(kept) / len(IDS) - percentage) <= 2


def test_probabilistic_choice_is_stable_per_trace_id_and_moves_with_the_salt() -> None:
    ten = pol("p", "probabilistic", sampling_percentage=10)
    first = _kept(sampler(ten), IDS)
    assert _kept(sampler(ten), IDS) == first  # a fresh sampler (another worker) picks the same traces
    assert _kept(sampler(pol("p", "probabilistic", sampling_percentage=10, hash_salt=DEFAULT_HASH_SALT)),
                 IDS) == first  # fmt: skip
    salted = _kept(sampler(pol("p", "probabilistic", sampling_percentage=10, hash_salt="other")), IDS)
    assert abs(len(salted) - len(first)) < 400
    assert len(salted & first) < len(first) / 3  # independent picks overlap ~10 %, not ~100 %


def test_string_attribute_reads_resource_and_span_attributes_exactly() -> None:
    s = sampler(pol("s", "string_attribute", key="tier", values=["gold", "platinum"]))
    assert s.decide(TID, [res(sp(), tier="gold")]) == yes("s")
    assert s.decide(TID, [res(sp()), res(sp(), sp(tier="platinum"))]) == yes("s")
    assert s.decide(TID, [res(sp(tier="gold-ish"), tier=7)]) == NO
    empty = sampler(pol("s", "string_attribute", key="tier", values=["", "x"]))
    assert empty.decide(TID, [res(sp(tier=""), tier="")]) == NO  # an empty value never matches
    assert empty.decide(TID, [res(sp(), tier=7)]) == NO  # nor does a non-string (read as "" like pdata)


def test_string_attribute_regex_matches_unanchored_like_gos_matchstring() -> None:
    health = pol("h", "string_attribute", key="rpc", values=["^http", r"v[0-9]+.HealthCheck$"],
                 enabled_regex_matching=True, cache_max_size=2)  # fmt: skip
    s = sampler(health)
    for _ in range(3):  # repeated values come from the LRU, with the same answer
        assert s.decide(TID, [res(sp(rpc="grpc.health.v1.HealthCheck"))]) == yes("h")
        assert s.decide(TID, [res(sp(rpc="grpc.health.vX.HealthCheck"))]) == NO
    assert s.decide(TID, [res(sp(rpc="https://x"))]) == yes("h")


def test_invert_match_excludes_even_after_a_sampling_policy() -> None:
    no_health = pol("no-health", "string_attribute", key="route", values=["/health"], invert_match=True)
    s = sampler(ALWAYS, no_health)
    assert s.decide(TID, [res(sp(route="/health"))]) == TraceDecision(False, "no-health")
    assert s.decide(TID, [res(sp(route="/cart"))]) == yes("always")  # SAMPLED names the deciding policy


def test_inverted_sample_counts_only_when_no_policy_said_no() -> None:
    no_health = pol("no-health", "string_attribute", key="route", values=["/health"], invert_match=True)
    assert sampler(no_health).decide(TID, [res(sp(route="/cart"))]) == yes("no-health")
    errors = pol("errors", "status_code", status_codes=["ERROR"])
    s = sampler(errors, no_health)
    assert s.decide(TID, [res(sp(route="/cart"))]) == NO
    assert s.decide(TID, [res(sp(route="/cart", status=ERROR))]) == yes("errors")


@pytest.mark.parametrize(("bounds", "value", "sampled"), [
    ({"min_value": 50, "max_value": 100}, 50, True),
    ({"min_value": 50, "max_value": 100}, 100, True),
    ({"min_value": 50, "max_value": 100}, 101, False),
    ({"min_value": 50, "max_value": 100}, 49, False),
    ({"min_value": 50}, 10**15, True),
    ({"max_value": 0}, -(10**15), True),
    ({"max_value": 0}, 1, False),
])  # fmt: skip
def test_numeric_attribute_bounds_are_inclusive_and_may_be_open(bounds: dict[str, int], value: int,
                                                                sampled: bool) -> None:  # fmt: skip
    s = sampler(pol("n", "numeric_attribute", key="http.status_code", **bounds))
    assert s.decide(TID, [res(sp(), sp(**{"http.status_code": value}))]).sampled is sampled


def test_numeric_and_boolean_attributes_on_resources_and_inverted() -> None:
    numeric = pol("n", "numeric_attribute", key="shard", min_value=1, max_value=3, invert_match=True)
    assert sampler(numeric).decide(TID, [res(sp(), shard=2)]) == TraceDecision(False, "n")
    assert sampler(numeric).decide(TID, [res(sp(), shard=4)]) == yes("n")
    debug = pol("b", "boolean_attribute", key="debug", value=True)
    assert sampler(debug).decide(TID, [res(sp(debug=False)), res(sp(debug=True))]) == yes("b")
    assert sampler(debug).decide(TID, [res(sp(debug=False), debug=False)]) == NO
    not_debug = pol("b", "boolean_attribute", key="debug", value=True, invert_match=True)
    assert sampler(not_debug).decide(TID, [res(sp(), debug=True)]) == TraceDecision(False, "b")


@pytest.mark.parametrize(("count", "sampled"), [(1, False), (2, True), (3, True), (4, False)])
def test_span_count_counts_every_resource(count: int, sampled: bool) -> None:
    s = sampler(pol("c", "span_count", min_spans=2, max_spans=3))
    assert s.decide(TID, [res(sp()) for _ in range(count)]).sampled is sampled


def test_span_count_max_zero_has_no_upper_bound() -> None:
    assert sampler(pol("c", "span_count", min_spans=2)).decide(TID, spans(500)) == yes("c")


@pytest.mark.parametrize(("state", "sampled"), [
    ("vendor=a,sampling=priority", True),
    ("vendor=a, sampling=priority ", True),
    ("sampling=normal", False),
    ("xsampling=priority", False),
    ("sampling=priority,Bad Key=1", False),  # an invalid header is ignored whole
    ("sampling=priority,sampling=other", False),  # duplicate keys make it invalid
])  # fmt: skip
def test_trace_state_key_value_of_any_span(state: str, sampled: bool) -> None:
    s = sampler(pol("ts", "trace_state", key="sampling", values=["priority"]))
    assert s.decide(TID, [res(sp()), res(sp(state=state))]).sampled is sampled


def test_rate_limiting_is_a_token_bucket_of_twice_the_rate() -> None:
    clock = Clock()
    s = sampler(pol("rl", "rate_limiting", spans_per_second=10), clock=clock)
    assert [s.decide(TID, spans(n)).sampled for n in (15, 6, 5, 1)] == [True, False, True, False]
    clock.now += 0.5  # refills 5 spans
    assert [s.decide(TID, spans(n)).sampled for n in (6, 5, 1)] == [False, True, False]
    clock.now += 60  # full again, but never above the burst of 20
    assert [s.decide(TID, spans(n)).sampled for n in (21, 20, 1)] == [False, True, False]


def test_rate_limiting_keeps_the_rate_over_clock_seconds() -> None:
    clock = Clock()
    s = sampler(pol("rl", "rate_limiting", spans_per_second=100), clock=clock)
    per_second = []
    for second in range(10):  # 1000 one-span traces per second for 10 s
        kept = 0
        for ms in range(1000):
            clock.now = 1000 + second + ms / 1000
            kept += s.decide(TID, spans(1)).sampled
        per_second.append(kept)
    # The full bucket (twice the rate) plus 99.9 refilled within the first second, then the rate.
    assert per_second == [200 + 99] + [100] * 9


def test_ottl_condition_sees_span_scope_and_resource() -> None:
    conditions = ['attributes["route"] == "/checkout"', 'resource.attributes["env"] == "prod" and kind == 2']
    s = sampler(pol("o", "ottl_condition", span=conditions))
    assert s.decide(TID, [res(sp(route="/"), sp(route="/checkout"))]) == yes("o")
    server = sp()
    server.kind = Span.SPAN_KIND_SERVER
    assert s.decide(TID, [res(server, env="prod")]) == yes("o")
    assert s.decide(TID, [res(server, env="dev"), res(sp(), env="prod")]) == NO


def _raises(*_: Any) -> bool:
    raise KeyError("boom")


def _is_cart(span: Span, *_: Any) -> bool:
    return any(kv.key == "route" and kv.value.string_value == "/cart" for kv in span.attributes)


@pytest.mark.parametrize("mode", ["ignore", "silent"])
def test_ottl_error_modes_ignore_and_silent_count_a_failing_condition_as_false(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    ottl = OttlCondition([("bad", _raises), ("cart", _is_cart)], _raises, mode)
    assert ottl.evaluate(TraceData(TID, [res(sp(route="/cart"))])) is SAMPLED
    assert ottl.evaluate(TraceData(TID, [res(sp(route="/"))])) is NOT_SAMPLED
    assert ("OTTL condition 'bad' failed: KeyError: 'boom'" in caplog.text) is (mode == "ignore")


def test_ottl_error_mode_propagate_fails_the_policy_which_is_counted_and_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ottl = OttlCondition([("bad", _raises), ("cart", _is_cart)], _raises, "propagate")
    with pytest.raises(PolicyError, match=r"^OTTL condition 'bad' failed: KeyError: 'boom'$"):
        ottl.evaluate(TraceData(TID, [res(sp(route="/cart"))]))
    monkeypatch.setattr(tail_policy_leaves, "compile_conditions", lambda texts, ctx: _raises)
    monkeypatch.setattr(tail_policy_leaves, "compile_condition", lambda text, ctx: _raises)
    s = sampler(pol("o", "ottl_condition", span=["true"]), pol("e", "status_code", status_codes=["ERROR"]))
    assert s.decide(TID, [res(sp(status=ERROR))]) == yes("e")
    assert s.decide(TID, [res(sp())]) == NO
    assert dict(s.evaluation_errors) == {"o": 2}


# --- nested policies and the final decision -----------------------------------------------------------------

GOLD = pol("gold", "string_attribute", key="tier", values=["gold"])
BIG = pol("big", "span_count", min_spans=3)


def test_and_samples_only_when_every_sub_policy_does() -> None:
    s = sampler({"name": "both", "type": "and", "and": {"and_sub_policy": [GOLD, BIG]}})
    assert s.decide(TID, spans(3, tier="gold")) == yes("both")
    assert s.decide(TID, spans(2, tier="gold")) == NO
    assert s.decide(TID, spans(3, tier="silver")) == NO
    not_gold = pol("ng", "string_attribute", key="tier", values=["gold"], invert_match=True)
    s = sampler({"name": "both", "type": "and", "and": {"and_sub_policy": [BIG, not_gold]}})
    assert s.decide(TID, spans(3, tier="gold")) == NO  # an inverted no inside and is a plain no
    assert s.decide(TID, spans(3, tier="silver")) == yes("both")


def test_drop_wins_over_everything_and_names_itself() -> None:
    drop = {"name": "drop-big-gold", "type": "drop", "drop": {"drop_sub_policy": [GOLD, BIG]}}
    s = sampler(ALWAYS, drop)
    assert s.decide(TID, spans(3, tier="gold")) == TraceDecision(False, "drop-big-gold")
    assert s.decide(TID, spans(2, tier="gold")) == yes("always")


def test_a_dropped_trace_ends_evaluation_before_stateful_policies_spend_budget() -> None:
    drop = {"name": "drop-gold", "type": "drop", "drop": {"drop_sub_policy": [GOLD]}}
    s = sampler(pol("rl", "rate_limiting", spans_per_second=1), drop)  # burst of 2 spans
    for _ in range(5):
        assert s.decide(TID, spans(2, tier="gold")) == TraceDecision(False, "drop-gold")
    assert s.decide(TID, spans(2)) == yes("rl")


def test_stateful_policies_still_run_after_the_outcome_is_known() -> None:
    # As in the Collector, every policy sees every trace: error traces spend the rate limiter's budget.
    errors = pol("errors", "status_code", status_codes=["ERROR"])
    s = sampler(errors, pol("rl", "rate_limiting", spans_per_second=1))
    assert s.decide(TID, spans(2, status=ERROR)) == yes("errors")
    assert s.decide(TID, spans(1)) == NO


def composite(total: int, order: list[str], allocation: dict[str, int], *subs: Any) -> dict[str, Any]:
    return {"name": "comp", "type": "composite", "composite": {
        "max_total_spans_per_second": total, "policy_order": order, "composite_sub_policy": list(subs),
        "rate_allocation": [{"policy": k, "percent": v} for k, v in allocation.items()]}}  # fmt: skip


ROUTE_B = pol("b", "string_attribute", key="route", values=["/b"])
REST = pol("rest", "always_sample")


def test_composite_follows_policy_order_and_each_budget_without_overflow() -> None:
    clock = Clock()
    policy = composite(100, ["b", "gold", "rest"], {"gold": 50, "b": 25}, GOLD, ROUTE_B, REST)
    s = sampler(policy, clock=clock)
    assert s.decide(TID, spans(25, tier="gold", route="/b")) == yes("comp")  # b is asked first: its 25 spans
    assert s.decide(TID, spans(1, tier="gold", route="/b")) == NO  # b is full; gold's budget is not used
    assert s.decide(TID, spans(50, tier="gold")) == yes("comp")
    assert s.decide(TID, spans(1, tier="gold")) == NO
    clock.now += 1  # a new second: every budget is back
    assert s.decide(TID, spans(1, tier="gold", route="/b")) == yes("comp")


def test_composite_sub_policy_without_allocation_gets_an_equal_share_capped_by_the_total() -> None:
    clock = Clock(5.5)
    s = sampler(composite(90, [], {"gold": 50}, GOLD, REST), clock=clock)
    assert s.decide(TID, spans(46)) == NO  # rest: 90 / 2 sub-policies = 45
    assert s.decide(TID, spans(45)) == yes("comp")
    assert s.decide(TID, spans(45, tier="gold")) == yes("comp")  # gold: 50 % of 90 = 45
    clock.now = 6.0
    assert s.decide(TID, spans(45)) == yes("comp")
    assert s.decide(TID, spans(45, tier="gold")) == yes("comp")
    s = sampler(composite(10, [], {"gold": 100, "rest": 100}, GOLD, REST), clock=clock)
    assert s.decide(TID, spans(10, tier="gold")) == yes("comp")
    assert s.decide(TID, spans(1)) == NO  # rest has budget left, the composite's total does not


# --- the seed's policies, through the real topology loader ------------------------------------------------


def test_seed_gateway_policies_keep_errors_slow_traces_and_ten_percent() -> None:
    config = load_topology(TOPOLOGIES / "seed-gateway.yaml").gateway.tail_sampling  # type: ignore[union-attr]
    assert config is not None
    s = TailSampler(config)
    assert s.policy_names == ("errors", "slow", "probabilistic")
    fast = [res(sp(0, 30), service="a"), res(sp(10, 200), sp(20, 5), service="b")]
    error = [res(sp(0, 30), service="a"), res(sp(10, 20, status=ERROR), service="b")]
    slow = [res(sp(0, 30), service="a"), res(sp(900, 150), service="b")]
    ids = IDS[:5000]
    assert all(s.decide(i, error) == yes("errors") for i in ids)
    assert all(s.decide(i, slow) == yes("slow") for i in ids)
    decisions = [s.decide(i, fast) for i in IDS]
    assert {d.policy for d in decisions if d.sampled} == {"probabilistic"}
    assert abs(100 * sum(d.sampled for d in decisions) / len(IDS) - 10) <= 2


def test_policy_config_errors_are_reported_with_their_path() -> None:
    base = "gateway:\n  processors:\n    tail_sampling:\n      policies:\n        - "
    regex = ("{name: s, type: string_attribute, "
             "string_attribute: {key: k, values: [ok, 'a(b'], enabled_regex_matching: true}}")  # fmt: skip
    alloc = ("{name: c, type: composite, composite: {max_total_spans_per_second: 9, composite_sub_policy: "
             "[{name: a, type: always_sample}], rate_allocation: [{policy: a, percent: %s}]}}")  # fmt: skip
    errors = []
    for policy in (regex, alloc % "150", alloc % "10, share: 1"):
        with pytest.raises(TopologyError) as info:
            parse_topology(base + policy + "\n", "t.yaml")
        errors.append(str(info.value))
    assert errors == [
        "t.yaml:5: gateway.processors.tail_sampling.policies[0].string_attribute: values[1] is not a valid "
        "regular expression: missing ), unterminated subpattern at position 1",
        "t.yaml:5: gateway.processors.tail_sampling.policies[0]: rate_allocation[0].percent must be a number "
        "from 0 to 100",
        "t.yaml:5: gateway.processors.tail_sampling.policies[0]: rate_allocation[0] takes a policy and a "
        "percent, no more",
    ]
