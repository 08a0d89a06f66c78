"""Per-record work: tenant and signal of a record, the filters, dead-letter re-drive, item counting."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from kotel.kafka.deadletter import dead_letter_headers
from kotel.otlp import Signal, count_items, samples
from streams.replay.records import Filters, make_record, redriven
from streams.replay.records import count_items as skeleton_count
from streams.sinks.runtime import SinkRecord

PREFIX = "kt"
AGENT = [("kotel.tenant", b"acme"), ("kotel.signal", b"logs"), ("kotel.seq", b"7")]


def record(topic: str, headers: list[tuple[str, bytes]], value: bytes = b"v") -> SinkRecord:
    return make_record(topic, 1, 42, b"key", value, headers, 1000, PREFIX)


def test_headers_say_tenant_and_signal_first() -> None:
    r = record("kt.raw.traces", AGENT)
    assert (r.tenant, r.signal, r.partition, r.offset, r.key, r.timestamp_ms) == (
        "acme",
        "logs",
        1,
        42,
        b"key",
        1000,
    )


def test_else_the_topic_name_says_them() -> None:
    r = record("kt.tenant.team.eu.metrics", [])
    assert (r.tenant, r.signal) == ("team.eu", "metrics")
    r = record("kt.raw.traces", [])
    assert (r.tenant, r.signal) == ("", "traces")
    r = record("other.tenant.x.logs", [])  # another prefix: not a tenant topic of ours
    assert (r.tenant, r.signal) == ("", "logs")
    assert record("orders", []).signal == ""


def test_a_dead_letter_is_classified_by_its_origin_topic() -> None:
    headers = dead_letter_headers("prw: 400", "kt.tenant.acme.metrics", 2, 9)
    r = record("kt.deadletter", headers)
    assert (r.tenant, r.signal) == ("acme", "metrics")


def test_redrive_restores_the_origin_topic_and_headers() -> None:
    original = [("kotel.tenant", b"acme"), ("id", b"17")]
    dlq = record("kt.deadletter", dead_letter_headers("loki: 400 bad", "kt.tenant.acme.logs", 2, 9, original))
    again = redriven(dlq)
    assert again.topic == "kt.tenant.acme.logs"
    assert list(again.headers) == original
    assert (again.value, again.key) == (dlq.value, dlq.key)


def test_filters() -> None:
    acme = record("kt.raw.logs", AGENT)
    beta = record("kt.tenant.beta.traces", [])
    assert Filters().accepts(acme) and Filters().accepts(beta)
    assert Filters(tenant="acme").accepts(acme) and not Filters(tenant="acme").accepts(beta)
    assert Filters(signal="traces").accepts(beta) and not Filters(signal="traces").accepts(acme)
    assert not Filters(target_signals=("metrics", "logs")).accepts(beta)
    assert Filters(target_signals=("metrics", "logs")).accepts(acme)


def test_reason_filter_and_redrive_need_a_dead_letter() -> None:
    dlq = record(
        "kt.deadletter", dead_letter_headers("prometheus: 400 out of order sample", "kt.raw.metrics", 0, 1)
    )
    plain = record("kt.raw.metrics", [])
    assert Filters(reason="out of order").accepts(dlq)
    assert not Filters(reason="too old").accepts(dlq)
    assert not Filters(reason="out of order").accepts(plain)
    assert Filters(redrive=True).accepts(dlq) and not Filters(redrive=True).accepts(plain)


@pytest.mark.parametrize(
    ("signal", "request_"),
    [("traces", samples.traces(37)), ("logs", samples.logs(23)), ("metrics", samples.metrics(41))],
)
def test_skeleton_count_equals_a_full_decode(signal: str, request_: Message) -> None:
    value = request_.SerializeToString()
    assert skeleton_count(signal, value) == count_items(request_) > 0


def test_every_metric_kind_counts_its_points() -> None:
    request = ExportMetricsServiceRequest()
    metrics = request.resource_metrics.add().scope_metrics.add().metrics
    metrics.add(name="g").gauge.data_points.add()
    for _ in range(2):
        metrics.add(name="s").sum.data_points.add()
    h = metrics.add(name="h").histogram
    h.data_points.add()
    h.data_points.add()
    metrics.add(name="e").exponential_histogram.data_points.add()
    metrics.add(name="q").summary.data_points.add()
    value = request.SerializeToString()
    assert skeleton_count("metrics", value) == count_items(request) == 7
    assert skeleton_count("traces", samples.traces(3).SerializeToString()) == 3


def test_bad_bytes_or_an_unknown_signal_count_zero() -> None:
    assert skeleton_count("traces", b"\xff\xff\xff garbage") == 0
    assert skeleton_count("", samples.traces(5).SerializeToString()) == 0
    assert skeleton_count(Signal.LOGS.value, b"") == 0
