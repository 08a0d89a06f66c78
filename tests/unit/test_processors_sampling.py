"""probabilistic_sampler (hash_seed) and the degrade step, on real OTLP requests."""

from __future__ import annotations

import random

import numpy as np
import pytest
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_DEBUG,
    SEVERITY_NUMBER_ERROR,
    SEVERITY_NUMBER_INFO,
    SEVERITY_NUMBER_TRACE,
    SEVERITY_NUMBER_WARN,
)
from opentelemetry.proto.metrics.v1 import metrics_pb2

from agents.processors.degrade import DegradeProcessor, downscale_exponential, merge_explicit_buckets
from agents.processors.sampler import (
    NUM_BUCKETS,
    ProbabilisticSampler,
    fnv1a32,
    scaled_rate,
    trace_buckets,
    value_bytes,
)
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal, count_items
from kotel.topology.exporters import DegradeConfig
from kotel.topology.processors import ProbabilisticSamplerConfig
from tests.unit.otlp_builders import any_value, build, dropped, gauge, histogram, items, log, span

T, M, L = Signal.TRACES, Signal.METRICS, Signal.LOGS


@pytest.fixture
def metrics() -> AgentMetrics:
    return AgentMetrics()


def _ids(count: int, seed: int = 11) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(16) for _ in range(count)]


def _sampler(metrics: AgentMetrics, pct: float, seed: int = 0, **options: object) -> ProbabilisticSampler:
    config = ProbabilisticSamplerConfig(sampling_percentage=pct, hash_seed=seed, **options)
    return ProbabilisticSampler(config, metrics, "probabilistic_sampler")


def _kept_ids(processor, ids: list[bytes]) -> set[bytes]:
    request = build(T, ({}, [[span(trace_id=i) for i in ids]]))
    out = processor.process(T, request)
    return set() if out is None else {s.trace_id for s in items(T, out)}


# --- the hash ------------------------------------------------------------------------------------------


def test_fnv1a_with_the_seed_as_four_little_endian_bytes() -> None:
    # Published FNV-1a 32 vectors: "foob" 0x3f5076ef, "fooba" 0x39aaa18a, "foobar" 0xbf9cf968. The seed is
    # hashed first as four little-endian bytes, so the seed spelling "foob" must reproduce them.
    seed = int.from_bytes(b"foob", "little")
    assert [fnv1a32(tail, seed) for tail in (b"", b"a", b"ar")] == [0x3F5076EF, 0x39AAA18A, 0xBF9CF968]


def test_vectorised_buckets_equal_the_scalar_hash() -> None:
    ids = _ids(500)
    for seed in (0, 1, 0xDEADBEEF):
        expected = [fnv1a32(i, seed) & (NUM_BUCKETS - 1) for i in ids]
        assert trace_buckets(b"".join(ids), seed).tolist() == expected


@pytest.mark.parametrize(("pct", "t_value"), [(100, 0x0), (75, 0x4000), (50, 0x8000), (25, 0xC000),
                                              (10, 0xE668), (100 / 3, 0xAAAC)])  # fmt: skip
def test_threshold_matches_the_collectors_t_values(pct, t_value) -> None:
    # The Collector's hash_seed mode writes the rejection threshold as a t-value: (2**14 - rate) << 2 as
    # 16 bits; its tests expect e668 for 10% and aaac for 33.3% (float32 product, truncated).
    assert (NUM_BUCKETS - scaled_rate(pct)) << 2 == t_value


def test_scaled_rate_edges() -> None:
    assert scaled_rate(0) == 0
    assert scaled_rate(100) == NUM_BUCKETS
    assert scaled_rate(0.001) == 0  # rounds to zero buckets: nothing kept, as the Collector's never-sampler
    assert scaled_rate(0.01) == 1  # 1.6384 truncated, not rounded
    assert scaled_rate(65.802) == 10781  # float32 arithmetic (float64 would give 10780)


# --- traces --------------------------------------------------------------------------------------------


def test_two_samplers_with_the_same_seed_agree(metrics) -> None:
    ids = _ids(5000)
    first = _kept_ids(_sampler(metrics, 25, seed=42), ids)
    second = _kept_ids(_sampler(AgentMetrics(), 25, seed=42), ids)
    other_seed = _kept_ids(_sampler(AgentMetrics(), 25, seed=43), ids)
    assert first == second
    assert first != other_seed
    assert first == {i for i in ids if fnv1a32(i, 42) & (NUM_BUCKETS - 1) < scaled_rate(25)}


def test_share_over_50k_trace_ids_is_within_two_points(metrics) -> None:
    ids = _ids(50_000, seed=3)
    base = build(T, ({}, [[span(trace_id=i) for i in ids]]))
    for pct in (1, 10, 30, 50, 90):
        request = type(base)()
        request.CopyFrom(base)
        kept = count_items(_sampler(metrics, pct, seed=7).process(T, request))
        assert abs(100 * kept / len(ids) - pct) <= 2, pct


def test_lower_percentages_keep_subsets(metrics) -> None:
    ids = _ids(4000)
    kept = [_kept_ids(_sampler(metrics, pct, seed=9), ids) for pct in (5, 20, 60)]
    assert kept[0] < kept[1] < kept[2]


def test_spans_of_one_trace_share_the_decision_and_drops_are_counted(metrics) -> None:
    ids = _ids(200)
    scope = [span(trace_id=i) for i in ids]
    request = build(T, ({"service.name": "a"}, [scope]), ({"service.name": "b"}, [scope, scope]))
    out = _sampler(metrics, 50).process(T, request)
    per_scope = [{s.trace_id for s in scope.spans} for e in out.resource_spans for scope in e.scope_spans]
    assert per_scope[0] == per_scope[1] == per_scope[2]
    assert dropped(metrics, T, "sampled_out") == 3 * (200 - len(per_scope[0]))


def test_zero_drops_everything_and_hundred_keeps_everything(metrics) -> None:
    request = build(T, ({}, [[span(trace_id=i) for i in _ids(300)]]))
    assert _sampler(metrics, 100).process(T, request) is request
    assert count_items(request) == 300
    assert _sampler(metrics, 0).process(T, request) is None
    assert dropped(metrics, T, "sampled_out") == 300


def _one_kept_one_dropped(pct: float, seed: int) -> tuple[bytes, bytes]:
    decided = {fnv1a32(i, seed) & (NUM_BUCKETS - 1) < scaled_rate(pct): i for i in _ids(50, seed=5)}
    return decided[True], decided[False]


def test_empty_scopes_and_resources_are_removed(metrics) -> None:
    keep, drop = _one_kept_one_dropped(50, 0)
    request = build(T, ({"r": 1}, [[span(trace_id=drop)], [span(trace_id=keep)]]),
                    ({"r": 2}, [[span(trace_id=drop)]]))  # fmt: skip
    out = _sampler(metrics, 50).process(T, request)
    assert [(len(e.scope_spans), e.scope_spans[0].scope.name) for e in out.resource_spans] == [(1, "scope-1")]
    assert dropped(metrics, T, "sampled_out") == 2


def test_set_percentage(metrics) -> None:
    sampler = _sampler(metrics, 100)
    ids = _ids(2000)
    assert len(_kept_ids(sampler, ids)) == 2000
    sampler.set_percentage(10)
    assert sampler.percentage == 10
    assert _kept_ids(sampler, ids) == _kept_ids(_sampler(AgentMetrics(), 10), ids)
    with pytest.raises(ValueError) as err:
        sampler.set_percentage(101)
    assert str(err.value) == "sampling percentage must be within 0..100, got 101"


def test_metrics_pass_through(metrics) -> None:
    request = build(M, ({}, [[gauge("g", {})]]))
    assert _sampler(metrics, 0).process(M, request) is request
    assert count_items(request) == 1


# --- logs ----------------------------------------------------------------------------------------------


def test_logs_by_trace_id_follow_the_span_decision(metrics) -> None:
    ids = _ids(1000)
    kept_spans = _kept_ids(_sampler(metrics, 40, seed=5), ids)
    request = build(L, ({}, [[log(trace_id=i) for i in ids]]))
    out = _sampler(metrics, 40, seed=5).process(L, request)
    assert {r.trace_id for r in items(L, out)} == kept_spans
    assert dropped(metrics, L, "sampled_out") == 1000 - len(kept_spans)


@pytest.mark.parametrize("fail_closed", [True, False])
def test_logs_without_trace_id_hash_as_zero_bytes(fail_closed, metrics) -> None:
    # The Collector hashes an empty trace id as 16 zero bytes (no "missing randomness", so fail_closed
    # plays no part): all such records share one decision per seed.
    zero_kept = {seed: fnv1a32(bytes(16), seed) & (NUM_BUCKETS - 1) < scaled_rate(50) for seed in range(40)}
    kept_seed = next(s for s, k in zero_kept.items() if k)
    dropped_seed = next(s for s, k in zero_kept.items() if not k)
    for seed, expected in ((kept_seed, 5), (dropped_seed, 0)):
        request = build(L, ({}, [[log(str(i)) for i in range(5)]]))
        out = _sampler(metrics, 50, seed=seed, fail_closed=fail_closed).process(L, request)
        assert (0 if out is None else count_items(out)) == expected


@pytest.mark.parametrize(("fail_closed", "missing_kept"), [(True, 0), (False, 2)])
def test_logs_by_record_attribute(fail_closed, missing_kept, metrics) -> None:
    values = [f"pod-{i}" for i in range(400)]
    sampler = _sampler(metrics, 30, seed=1, attribute_source="record", from_attribute="pod",
                       fail_closed=fail_closed)  # fmt: skip
    request = build(L, ({}, [[log(v, pod=v) for v in values] + [log("no pod"), log("no pod either")]]))
    out = sampler.process(L, request)
    expected = [v for v in values if fnv1a32(v.encode(), 1) & (NUM_BUCKETS - 1) < scaled_rate(30)]
    bodies = [r.body.string_value for r in items(L, out)]
    assert bodies[:len(expected)] == expected
    assert len(bodies) - len(expected) == missing_kept


def test_attribute_values_hash_as_the_collectors_strings() -> None:
    assert value_bytes(any_value("x")) == b"x"
    assert value_bytes(any_value(b"\x00\x01")) == b"\x00\x01"
    assert value_bytes(any_value(-12)) == b"-12"
    assert value_bytes(any_value(True)) == b"true"
    assert [value_bytes(any_value(f)) for f in (1.0, 0.5, 1e-7, 1.5e21, 1e20)] == [
        b"1", b"0.5", b"1e-7", b"1.5e+21", b"100000000000000000000"]


def test_log_sampling_priority_overrides_the_percentage(metrics) -> None:
    sampler = _sampler(metrics, 100, sampling_priority="priority")
    request = build(L, ({}, [[log("zero", priority=0), log("none"), log("text", priority="0")]]))
    assert [r.body.string_value for r in items(L, sampler.process(L, request))] == ["none", "text"]
    never = _sampler(metrics, 0, sampling_priority="priority")
    request = build(L, ({}, [[log("all", priority=100), log("float", priority=100.0), log("none")]]))
    assert [r.body.string_value for r in items(L, never.process(L, request))] == ["all", "float"]
    assert dropped(metrics, L, "sampled_out") == 2


# --- degrade -------------------------------------------------------------------------------------------


def _degrade(metrics: AgentMetrics, seed: int = 0, **options: object) -> DegradeProcessor:
    return DegradeProcessor(DegradeConfig(**options), metrics, "degrade", hash_seed=seed, active=True)


def test_degrade_is_inert_until_activated(metrics) -> None:
    processor = DegradeProcessor(DegradeConfig(sampling_percentage=0), metrics)
    request = build(T, ({}, [[span(trace_id=i) for i in _ids(10)]]))
    assert processor.process(T, request) is request and count_items(request) == 10
    processor.set_active(True)
    assert processor.process(T, request) is None
    assert dropped(metrics, T, "degraded") == 10


def test_degrade_sampling_composes_with_the_sampler(metrics) -> None:
    ids = _ids(20_000)
    request = build(T, ({}, [[span(trace_id=i) for i in ids]]))
    after_sampler = _sampler(metrics, 50, seed=77).process(T, request)
    out = _degrade(metrics, seed=77, sampling_percentage=10).process(T, after_sampler)
    at_ten = _kept_ids(_sampler(AgentMetrics(), 10, seed=77), ids)
    assert {s.trace_id for s in items(T, out)} == at_ten  # 10% of the traces, not 5%
    assert dropped(metrics, T, "degraded") == 20_000 - dropped(metrics, T, "sampled_out") - len(at_ten)


def test_degrade_drops_logs_below_the_level(metrics) -> None:
    records = [log("trace", SEVERITY_NUMBER_TRACE), log("debug", SEVERITY_NUMBER_DEBUG),
               log("info", SEVERITY_NUMBER_INFO), log("warn", SEVERITY_NUMBER_WARN),
               log("text debug", text="debug"), log("text warning", text="Warning"), log("unknown")]
    out = _degrade(metrics, drop_log_severity_below="INFO").process(L, build(L, ({}, [records])))
    assert [r.body.string_value for r in items(L, out)] == ["info", "warn", "text warning", "unknown"]
    assert dropped(metrics, L, "degraded") == 3
    error_only = _degrade(metrics, drop_log_severity_below="ERROR")
    request = build(L, ({}, [[log("e", SEVERITY_NUMBER_ERROR), log("w", SEVERITY_NUMBER_WARN)]]))
    out = error_only.process(L, request)
    assert [r.body.string_value for r in items(L, out)] == ["e"]
    keep_all = _degrade(metrics, drop_log_severity_below="")
    request = build(L, ({}, [[log("d", SEVERITY_NUMBER_DEBUG)]]))
    assert keep_all.process(L, request) is request


def test_histogram_buckets_merge_exactly() -> None:
    point = histogram("h", [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], 42.5).histogram.data_points[0]
    assert merge_explicit_buckets(point, 3)
    assert list(point.explicit_bounds) == [2, 4]
    assert list(point.bucket_counts) == [3, 7, 11]
    assert (point.count, point.sum, point.min, point.max) == (21, 42.5, 0.001, 99.0)
    assert not merge_explicit_buckets(point, 3)  # already small enough
    single = histogram("h", [1], [4, 5], 1.0).histogram.data_points[0]
    assert merge_explicit_buckets(single, 1)
    assert (list(single.explicit_bounds), list(single.bucket_counts)) == ([], [9])


def test_degrade_cuts_a_hundred_buckets_to_ten_keeping_totals(metrics) -> None:
    bounds = [0.01 * i for i in range(1, 100)]
    counts = [random.Random(i).randrange(50) for i in range(100)]
    metrics_list = [histogram("latency", bounds, counts, 1234.5),
                    histogram("latency", bounds, counts[::-1], 99.5), gauge("g", {})]  # fmt: skip
    request = build(M, ({}, [metrics_list]))
    assert _degrade(metrics, histogram_max_buckets=10).process(M, request) is request
    first, second = (m.histogram.data_points[0] for m in items(M, request)[:2])
    assert items(M, request)[2] == gauge("g", {})
    for point, source in ((first, counts), (second, counts[::-1])):
        assert len(point.bucket_counts) == 10 and len(point.explicit_bounds) == 9
        assert sum(point.bucket_counts) == sum(source) == point.count
        assert set(point.explicit_bounds) <= set(bounds)
    assert list(first.explicit_bounds) == list(second.explicit_bounds)  # same layout, same bounds
    assert first.sum == 1234.5


def test_exponential_histogram_downscale() -> None:
    point = metrics_pb2.ExponentialHistogramDataPoint(scale=3, count=36, zero_count=0)
    point.positive.offset = -3
    point.positive.bucket_counts.extend([1, 2, 3, 4, 5, 6, 7, 8])
    assert downscale_exponential(point, 2)
    # indices -3..4 at scale 3 -> (index >> 3) at scale 0: -1 for -3..-1, 0 for 0..4
    assert (point.scale, point.positive.offset, list(point.positive.bucket_counts)) == (0, -1, [6, 30])
    assert not downscale_exponential(point, 2)


def test_histogram_cut_needs_at_least_one_bucket() -> None:
    point = histogram("h", [1, 2], [1, 1, 1], 1.0).histogram.data_points[0]
    assert not merge_explicit_buckets(point, 0)
    assert np.array_equal(point.bucket_counts, [1, 1, 1])
