"""Fuzzing the receivers: mutated OTLP payloads must be answered with success or a 4xx, never a crash.

Volume goes to the decode + validate step both transports share (thousands of examples in-process);
a smaller run goes over the wire to both servers, which must still serve a valid request afterwards.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agents.contracts import ExportResult, InvalidRequest
from agents.receivers import GrpcReceiver, HttpReceiver
from agents.receivers._common import INVALID, MALFORMED, Encoding, decode
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal, count_items, encode_json
from kotel.topology.exporters import GrpcServerConfig, HttpServerConfig

TRACE_ID = bytes(range(1, 17))
SPAN_ID = bytes(range(1, 9))
HTTP_LIMIT = 64 * 1024


def _traces() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "fuzz"
    rs.resource.attributes.add(key="tenant").value.int_value = 7
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = "lib", "1.0"
    span = ss.spans.add(trace_id=TRACE_ID, span_id=SPAN_ID, parent_span_id=SPAN_ID[::-1], name="GET /",
                        kind=2, start_time_unix_nano=1_700_000_000_000_000_000,
                        end_time_unix_nano=1_700_000_000_500_000_000)
    span.attributes.add(key="ratio").value.double_value = 0.5
    span.attributes.add(key="tags").value.array_value.values.add().string_value = "a"
    span.events.add(name="retry", time_unix_nano=1).attributes.add(key="n").value.bool_value = True
    span.links.add(trace_id=TRACE_ID[::-1], span_id=SPAN_ID)
    span.status.code, span.status.message = 2, "boom"
    return req


def _metrics() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    sm = req.resource_metrics.add().scope_metrics.add()
    gauge = sm.metrics.add(name="temp", unit="C")
    point = gauge.gauge.data_points.add(as_double=21.5, time_unix_nano=5)
    point.exemplars.add(as_int=3, trace_id=TRACE_ID, span_id=SPAN_ID)
    total = sm.metrics.add(name="requests")
    total.sum.is_monotonic, total.sum.aggregation_temporality = True, 2
    total.sum.data_points.add(as_int=10).attributes.add(key="route").value.string_value = "/a"
    hist = sm.metrics.add(name="latency").histogram.data_points.add(count=2, sum=3.0)
    hist.bucket_counts.extend([1, 1])
    hist.explicit_bounds.append(1.0)
    expo = sm.metrics.add(name="size").exponential_histogram.data_points.add(count=1, scale=2)
    expo.positive.bucket_counts.append(1)
    sm.metrics.add(name="q").summary.data_points.add(count=1).quantile_values.add(quantile=0.5, value=1)
    return req


def _logs() -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    sl = req.resource_logs.add().scope_logs.add()
    rec = sl.log_records.add(time_unix_nano=9, severity_number=17, severity_text="ERROR",
                             trace_id=TRACE_ID, span_id=SPAN_ID, flags=1)
    rec.body.kvlist_value.values.add(key="msg").value.string_value = "payment failed"
    sl.log_records.add().body.bytes_value = b"\x00\x01"
    return req


REQUESTS: dict[Signal, Message] = {Signal.TRACES: _traces(), Signal.METRICS: _metrics(), Signal.LOGS: _logs()}
SEEDS: dict[tuple[Signal, Encoding], bytes] = {}
for _sig, _req in REQUESTS.items():
    SEEDS[_sig, Encoding.PROTOBUF] = _req.SerializeToString()
    SEEDS[_sig, Encoding.JSON] = encode_json(_req)
ALL_SEEDS = list(SEEDS.values())
# Tokens that stress the JSON mapping: huge and negative integers, bad surrogates, wrong types.
JSON_TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"true", b"-1", b"1e999", b"NaN",
               b'"\\ud800"', b"18446744073709551616", b'"SPAN_KIND_NOPE"', b'"zz"', b'""', b"{}", b"[]"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Signal, Encoding, bytes]:
    """A valid request of some signal and encoding, then 1-4 mutations (some borrowing other seeds)."""
    signal = draw(st.sampled_from(list(Signal)))
    encoding = draw(st.sampled_from(list(Encoding)))
    data = bytearray(SEEDS[signal, encoding])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "delete", "token", "byte"]))
        if op == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "splice":
            other = draw(st.sampled_from(ALL_SEEDS))
            data[at:] = other[draw(st.integers(0, len(other))):]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "token":
            data[at:at + draw(st.integers(0, 8))] = draw(st.sampled_from(JSON_TOKENS))
        elif data:  # "byte": values that matter to varints and length prefixes
            data[min(at, len(data) - 1)] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12]))
    return signal, encoding, bytes(data)


@st.composite
def odd_ids(draw: st.DrawFn) -> tuple[Signal, Encoding, bytes]:
    """Well-formed requests whose ids have random lengths: validation, not parsing, must answer."""
    signal = draw(st.sampled_from(list(Signal)))
    req = type(REQUESTS[signal])()
    req.CopyFrom(REQUESTS[signal])
    ids = st.binary(max_size=20)
    if signal is Signal.TRACES:
        span = req.resource_spans[0].scope_spans[0].spans[0]
        span.trace_id, span.span_id, span.parent_span_id = draw(ids), draw(ids), draw(ids)
        span.links[0].span_id = draw(ids)
    elif signal is Signal.LOGS:
        rec = req.resource_logs[0].scope_logs[0].log_records[0]
        rec.trace_id, rec.span_id = draw(ids), draw(ids)
    else:
        ex = req.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points[0].exemplars[0]
        ex.trace_id, ex.span_id = draw(ids), draw(ids)
    encoding = draw(st.sampled_from(list(Encoding)))
    return signal, encoding, req.SerializeToString() if encoding is Encoding.PROTOBUF else encode_json(req)


PAYLOADS = st.one_of(mutated(), mutated(), odd_ids(),
                     st.tuples(st.sampled_from(list(Signal)), st.sampled_from(list(Encoding)), st.binary()))


def test_seeds_are_valid() -> None:
    """The fuzz starts from requests that decode: otherwise it would only test the first parse error."""
    for (signal, encoding), data in SEEDS.items():
        assert decode(signal, data, encoding) == REQUESTS[signal]


@settings(max_examples=2500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(PAYLOADS)
def test_decode_answers_every_payload_with_a_request_or_a_reason(
    payload: tuple[Signal, Encoding, bytes],
) -> None:
    # Generating a payload costs far more than decoding it, so each one is also tried as every other
    # signal and encoding (a client posting metrics to /v1/traces is a realistic mistake).
    for signal in Signal:
        for encoding in Encoding:
            _decode_or_reason(signal, encoding, payload[2])


def _decode_or_reason(signal: Signal, encoding: Encoding, data: bytes) -> None:
    try:
        request = decode(signal, data, encoding)
    except InvalidRequest as exc:
        assert exc.reason in (MALFORMED, INVALID)
        assert str(exc).startswith("invalid "), str(exc)
        return
    assert type(request) is type(REQUESTS[signal])
    assert count_items(request) >= 0
    # What passes must survive the trip to Kafka and back unchanged.
    assert decode(signal, request.SerializeToString(), Encoding.PROTOBUF) == request


# --- over the wire -----------------------------------------------------------------------------------


@dataclass
class Servers:
    grpc: GrpcReceiver
    http: HttpReceiver
    session: aiohttp.ClientSession
    channel: grpc.aio.Channel
    exported: list[Signal]


class _Recorder:
    def __init__(self, out: list[Signal]) -> None:
        self.out = out

    async def export(self, signal: Signal, request: Message, size_bytes: int) -> ExportResult:
        self.out.append(signal)
        return ExportResult()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def servers() -> AsyncIterator[Servers]:
    exported: list[Signal] = []
    handler, metrics = _Recorder(exported), AgentMetrics()
    local = "127.0.0.1:0"
    grpc_rx = GrpcReceiver(GrpcServerConfig(max_recv_msg_size_mib=1), handler, metrics, endpoint=local)
    http_cfg = HttpServerConfig(max_request_body_size=HTTP_LIMIT)
    http_rx = HttpReceiver(http_cfg, handler, metrics, endpoint=local)
    await grpc_rx.start()
    await http_rx.start()
    try:
        # Generous timeouts: an answer is what is checked, and a loaded 2-core CI machine can be slow.
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
                    grpc.aio.insecure_channel(f"127.0.0.1:{grpc_rx.port}") as channel):
            yield Servers(grpc_rx, http_rx, session, channel, exported)
    finally:
        await grpc_rx.stop(1)
        await http_rx.stop(1)


async def _post(s: Servers, signal: Signal, encoding: Encoding, body: bytes, zipped: bool,
                damage: int | None = None) -> int:
    """POST body; `damage` flips a bit of the gzip stream at that (wrapped) offset."""
    headers = {"Content-Type": "application/json" if encoding is Encoding.JSON else "application/x-protobuf"}
    if zipped:
        headers["Content-Encoding"] = "gzip"
        body = gzip.compress(body, compresslevel=1)
        if damage is not None:
            broken = bytearray(body)
            broken[damage % len(broken)] ^= 1 << (damage % 8)
            body = bytes(broken)
    async with s.session.post(f"http://127.0.0.1:{s.http.port}/v1/{signal}", data=body, headers=headers) as r:
        answer = await r.read()
        if r.status != 200:  # every failure carries a Status whose message says why
            if encoding is Encoding.JSON:
                assert json.loads(answer)["message"]
            else:
                assert status_pb2.Status.FromString(answer).message
        return r.status


async def _call(s: Servers, signal: Signal, body: bytes) -> grpc.StatusCode:
    try:
        await s.channel.unary_unary(signal.grpc_method)(body, timeout=30)
    except grpc.aio.AioRpcError as exc:
        assert exc.details()
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.asyncio(loop_scope="session")
@settings(max_examples=2000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payload=PAYLOADS, zipped=st.booleans(), damage=st.none() | st.integers(0, 10_000))
async def test_servers_answer_every_payload_with_success_or_4xx(
    servers: Servers, payload: tuple[Signal, Encoding, bytes], zipped: bool, damage: int | None
) -> None:
    signal, encoding, body = payload
    # asyncio.wait_for turns a hang into a failure rather than a stuck run.
    status = await asyncio.wait_for(_post(servers, signal, encoding, body, zipped, damage), 10)
    assert status in (200, 400, 413), status
    if encoding is Encoding.PROTOBUF:
        code = await asyncio.wait_for(_call(servers, signal, body), 10)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
        if not (zipped and damage is not None):
            assert (code is grpc.StatusCode.OK) == (status == 200)


@pytest.mark.asyncio(loop_scope="session")
async def test_servers_still_serve_after_the_fuzz(servers: Servers) -> None:
    before = len(servers.exported)
    for signal, req in REQUESTS.items():
        assert await _call(servers, signal, req.SerializeToString()) is grpc.StatusCode.OK
        for encoding in Encoding:
            assert await _post(servers, signal, encoding, SEEDS[signal, encoding], zipped=True) == 200
    assert servers.exported[before:] == [sig for sig in Signal for _ in range(3)]
