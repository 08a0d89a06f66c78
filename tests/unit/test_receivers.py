"""The OTLP receivers end to end over loopback: real SDK exporters in, a recording ExportHandler behind."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.contracts import ExportResult, InvalidRequest, Overloaded, Unavailable
from agents.receivers import GrpcReceiver, HttpReceiver, build_receivers
from agents.receivers.http_server import HttpError, gunzip
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal, count_items, encode_json
from kotel.topology.exporters import GrpcServerConfig, HttpServerConfig, OtlpProtocols

pytestmark = pytest.mark.asyncio(loop_scope="session")

HTTP_LIMIT = 256 * 1024
PB = "application/x-protobuf"
JS = "application/json"
TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN_ID = bytes.fromhex("0102030405060708")


@dataclass
class FakeHandler:
    """Records what reaches the pipeline; answers with `result` or raises `error`."""

    result: ExportResult = field(default_factory=ExportResult)
    error: Exception | None = None
    delay: float = 0.0
    calls: list[tuple[Signal, Message, int]] = field(default_factory=list)

    async def export(self, signal: Signal, request: Message, size_bytes: int) -> ExportResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        self.calls.append((signal, request, size_bytes))
        return self.result


@dataclass
class Agent:
    handler: FakeHandler
    metrics: AgentMetrics
    grpc: GrpcReceiver
    http: HttpReceiver

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"kotel_agent_{name}_total", labels) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def agent() -> AsyncIterator[Agent]:
    handler, metrics = FakeHandler(), AgentMetrics()
    local = "127.0.0.1:0"
    grpc_rx = GrpcReceiver(GrpcServerConfig(max_recv_msg_size_mib=1), handler, metrics, endpoint=local)
    http_cfg = HttpServerConfig(max_request_body_size=HTTP_LIMIT)
    http_rx = HttpReceiver(http_cfg, handler, metrics, endpoint=local)
    await grpc_rx.start()
    await http_rx.start()
    try:
        yield Agent(handler, metrics, grpc_rx, http_rx)
    finally:
        await grpc_rx.stop(1)
        await http_rx.stop(1)


@pytest_asyncio.fixture(loop_scope="session")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="session")
async def channel(agent: Agent) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(agent.grpc_target) as ch:
        yield ch


def trace_request(name: str = "op", trace_id: bytes = TRACE_ID, n: int = 1) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    scope = rs.scope_spans.add()
    for i in range(n):
        span = scope.spans.add(trace_id=trace_id, span_id=SPAN_ID, name=name, kind=2)
        span.start_time_unix_nano = 1_700_000_000_000_000_000 + i
    return req


async def grpc_call(channel: grpc.aio.Channel, signal: Signal, body: bytes, **kw: Any) -> bytes:
    call = channel.unary_unary(signal.grpc_method)  # raw bytes both ways
    return await call(body, timeout=10, **kw)


# --- real OpenTelemetry SDK exporters ----------------------------------------------------------------


@dataclass
class SdkData:
    spans: Any
    metrics: Any
    logs: Any


@pytest.fixture(scope="module")
def sdk_data() -> Iterator[SdkData]:
    """Spans, metrics and logs made by the real SDK (with events, links, attributes of several types)."""
    resource = Resource.create({"service.name": "checkout", "service.instance.id": "i-1"})
    spans_out = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans_out))
    tracer = tracer_provider.get_tracer("test.tracer", "1.2.3")
    with tracer.start_as_current_span("parent", attributes={"http.method": "GET", "n": 3}) as parent:
        parent.add_event("cache miss", {"key": "k1"})
        with tracer.start_as_current_span("child", links=[]) as child:
            child.set_attribute("ratio", 0.25)
            child.set_attribute("tags", ["a", "b"])

    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = meter_provider.get_meter("test.meter")
    meter.create_counter("requests").add(5, {"route": "/a"})
    meter.create_histogram("latency", unit="ms").record(12.5, {"route": "/a"})
    meter.create_up_down_counter("queue").add(-2)

    logs_out = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs_out))
    otel_logger = logger_provider.get_logger("test.logger")
    with tracer.start_as_current_span("logged"):
        otel_logger.emit(body="payment failed", severity_number=SeverityNumber.ERROR,
                         attributes={"order": "o-9"})
    otel_logger.emit(body={"structured": True}, severity_number=SeverityNumber.INFO)

    yield SdkData(spans_out.get_finished_spans(), reader.get_metrics_data(), logs_out.get_finished_logs())
    for provider in (tracer_provider, meter_provider, logger_provider):
        provider.shutdown()


def _sdk_exporters(agent: Agent, transport: str, gzip_on: bool) -> tuple[Any, Any, Any]:
    if transport == "grpc":
        comp = grpc.Compression.Gzip if gzip_on else grpc.Compression.NoCompression
        kw: dict[str, Any] = {"endpoint": agent.grpc_target, "insecure": True, "timeout": 5,
                              "compression": comp}
        return GrpcSpanExporter(**kw), GrpcMetricExporter(**kw), GrpcLogExporter(**kw)
    comp = HttpCompression.Gzip if gzip_on else HttpCompression.NoCompression
    base = agent.http_base
    return (HttpSpanExporter(endpoint=f"{base}/v1/traces", timeout=5, compression=comp),
            HttpMetricExporter(endpoint=f"{base}/v1/metrics", timeout=5, compression=comp),
            HttpLogExporter(endpoint=f"{base}/v1/logs", timeout=5, compression=comp))


@pytest.mark.parametrize("gzip_on", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_sdk_exports_reach_the_handler_unchanged(
    agent: Agent, sdk_data: SdkData, transport: str, gzip_on: bool
) -> None:
    span_x, metric_x, log_x = _sdk_exporters(agent, transport, gzip_on)
    try:
        # The SDK exporters block, so they run in a thread while the receivers serve on this loop.
        assert (await asyncio.to_thread(span_x.export, sdk_data.spans)).name == "SUCCESS"
        assert (await asyncio.to_thread(metric_x.export, sdk_data.metrics)).name == "SUCCESS"
        assert (await asyncio.to_thread(log_x.export, sdk_data.logs)).name == "SUCCESS"
    finally:
        for x in (span_x, metric_x, log_x):
            await asyncio.to_thread(x.shutdown)
    expected = {
        Signal.TRACES: encode_spans(sdk_data.spans),
        Signal.METRICS: encode_metrics(sdk_data.metrics),
        Signal.LOGS: encode_logs(sdk_data.logs),
    }
    got = {sig: req for sig, req, _ in agent.handler.calls}
    assert [sig for sig, _, _ in agent.handler.calls] == [Signal.TRACES, Signal.METRICS, Signal.LOGS]
    for sig, want in expected.items():
        assert got[sig] == want, sig
    spans = [s for rs in got[Signal.TRACES].resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["child", "parent", "logged"]
    assert count_items(got[Signal.METRICS]) == 3
    assert count_items(got[Signal.LOGS]) == 2
    for sig, want in expected.items():
        assert agent.count("received_items", signal=sig.value, transport=transport) == count_items(want)


# --- OTLP/JSON, gzip, partial success, empty requests ----------------------------------------------

JSON_TRACES = json.dumps({"resourceSpans": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
    "scopeSpans": [{"spans": [
        {"traceId": "5B8EFFF798038103D269B633813FC60C", "spanId": "0102030405060708", "name": "by-name",
         "kind": "SPAN_KIND_SERVER", "status": {"code": "STATUS_CODE_ERROR"}, "unknownField": 1},
        {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "0807060504030201", "name": "by-number",
         "parentSpanId": "0102030405060708", "kind": 3, "startTimeUnixNano": "1700000000000000000"},
    ]}],
}]}).encode()


async def test_json_request_with_hex_ids_and_enum_names(agent: Agent, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{agent.http_base}/v1/traces", data=JSON_TRACES,
                            headers={"Content-Type": "application/json; charset=utf-8"}) as resp:
        assert resp.status == 200
        assert resp.content_type == JS
        assert await resp.read() == b"{}"
    [(sig, req, size)] = agent.handler.calls
    spans = req.resource_spans[0].scope_spans[0].spans
    assert sig is Signal.TRACES and size == req.ByteSize()
    assert [(s.trace_id, s.span_id, s.name, s.kind) for s in spans] == [
        (TRACE_ID, SPAN_ID, "by-name", 2), (TRACE_ID, SPAN_ID[::-1], "by-number", 3)]
    assert spans[0].status.code == 2 and spans[1].parent_span_id == SPAN_ID
    assert spans[1].start_time_unix_nano == 1_700_000_000_000_000_000


@pytest.mark.parametrize("content_type", [PB, JS])
async def test_gzip_body_in_either_encoding(
    agent: Agent, session: aiohttp.ClientSession, content_type: str
) -> None:
    req = trace_request("zipped")
    raw = req.SerializeToString() if content_type == PB else encode_json(req)
    # Two gzip members: RFC 1952 allows concatenation and `cat a.gz b.gz` makes exactly that.
    body = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    async with session.post(f"{agent.http_base}/v1/traces", data=body,
                            headers={"Content-Type": content_type, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 200, await resp.read()
    assert [r for _, r, _ in agent.handler.calls] == [req]


def _one_item(signal: Signal) -> bytes:
    req = signal.request_class()
    scope = getattr(getattr(req, signal.resource_field).add(), signal.scope_field).add()
    item = getattr(scope, signal.item_field).add()
    if signal is Signal.TRACES:
        item.trace_id, item.span_id, item.name = TRACE_ID, SPAN_ID, "s"
    elif signal is Signal.METRICS:
        item.name = "m"
        item.gauge.data_points.add().as_double = 1.0
    else:
        item.body.string_value = "hello"
    return req.SerializeToString()


RESPONSES = {Signal.TRACES: ExportTraceServiceResponse, Signal.METRICS: ExportMetricsServiceResponse,
             Signal.LOGS: ExportLogsServiceResponse}
REJECTED_FIELD = {Signal.TRACES: "rejected_spans", Signal.METRICS: "rejected_data_points",
                  Signal.LOGS: "rejected_log_records"}


@pytest.mark.parametrize("signal", list(Signal))
async def test_partial_success_reaches_the_client(
    agent: Agent, session: aiohttp.ClientSession, channel: grpc.aio.Channel, signal: Signal
) -> None:
    agent.handler.result = ExportResult(rejected_items=1, error_message="over the attribute limit")
    body = _one_item(signal)
    raw = await grpc_call(channel, signal, body)
    ps = RESPONSES[signal].FromString(raw).partial_success
    assert (getattr(ps, REJECTED_FIELD[signal]), ps.error_message) == (1, "over the attribute limit")

    async with session.post(f"{agent.http_base}/v1/{signal}", data=body, headers={"Content-Type": PB}) as r:
        assert (r.status, r.content_type) == (200, PB)
        ps = RESPONSES[signal].FromString(await r.read()).partial_success
        assert (getattr(ps, REJECTED_FIELD[signal]), ps.error_message) == (1, "over the attribute limit")

    json_body = encode_json(signal.request_class.FromString(body))
    url = f"{agent.http_base}/v1/{signal}"
    async with session.post(url, data=json_body, headers={"Content-Type": JS}) as r:
        assert (r.status, r.content_type) == (200, JS)
        camel = {"rejected_spans": "rejectedSpans", "rejected_data_points": "rejectedDataPoints",
                 "rejected_log_records": "rejectedLogRecords"}[REJECTED_FIELD[signal]]
        assert await r.json() == {"partialSuccess": {camel: "1", "errorMessage": "over the attribute limit"}}
    assert len(agent.handler.calls) == 3


async def test_full_success_leaves_partial_success_unset(agent: Agent, channel: grpc.aio.Channel) -> None:
    raw = await grpc_call(channel, Signal.LOGS, _one_item(Signal.LOGS))
    assert raw == b"" and not ExportLogsServiceResponse.FromString(raw).HasField("partial_success")


async def test_empty_request_succeeds_without_reaching_the_pipeline(
    agent: Agent, session: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    empty_envelope = ExportTraceServiceRequest()
    empty_envelope.resource_spans.add().scope_spans.add()
    for body in (b"", empty_envelope.SerializeToString()):
        assert await grpc_call(channel, Signal.TRACES, body) == b""
        async with session.post(f"{agent.http_base}/v1/traces", data=body, headers={"Content-Type": PB}) as r:
            assert r.status == 200
    assert agent.handler.calls == []


# --- bad input: exact status, exact message, one count, nothing reaches the pipeline ---------------

WRONG_ID = trace_request(trace_id=b"abc").SerializeToString()
BAD_UTF8 = trace_request(name="AAAA").SerializeToString().replace(b"AAAA", b"\xff\xfe\xfd\xfc")
BIG = trace_request(name="x" * HTTP_LIMIT).SerializeToString()
NOT_GZIP = b"plain bytes"
PB_MALFORMED = ("invalid OTLP/protobuf ExportTraceServiceRequest: malformed wire format "
                "(truncated, or not a protobuf message)")
PB_UTF8 = ("invalid OTLP/protobuf ExportTraceServiceRequest: a string field holds invalid UTF-8 "
           "(protobuf string fields must be valid UTF-8)")
ID_LENGTH = ("invalid ExportTraceServiceRequest: resourceSpans[0].scopeSpans[0].spans[0].traceId: "
             "expected 16 bytes, got 3")
TOO_LARGE = f"request body exceeds max_request_body_size ({HTTP_LIMIT} bytes)"


@dataclass(frozen=True)
class Bad:
    body: bytes
    status: int
    reason: str
    message: str
    content_type: str = PB
    encoding: str | None = None
    method: str = "POST"
    path: str = "/v1/traces"


BAD_HTTP = {
    "malformed protobuf": Bad(b"\x0a\x05\x0a", 400, "malformed", PB_MALFORMED),
    "invalid JSON": Bad(b'{"resourceSpans": [', 400, "malformed",
                        "invalid OTLP/JSON ExportTraceServiceRequest: not valid JSON: "
                        "Expecting value at line 1 column 20", JS),
    "JSON of the wrong shape": Bad(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5}]}]}]}', 400,
                                   "malformed", "invalid OTLP/JSON ExportTraceServiceRequest at "
                                   "resourceSpans[0].scopeSpans[0].spans[0].name: expected a string, got 5",
                                   JS),
    "JSON id of the wrong length": Bad(
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "abcd", '
        b'"spanId": "0102030405060708"}]}]}]}',
        400, "malformed", "invalid OTLP/JSON ExportTraceServiceRequest at "
        "resourceSpans[0].scopeSpans[0].spans[0].traceId: expected 32 hex characters, got 4", JS),
    "protobuf id of the wrong length": Bad(WRONG_ID, 400, "invalid", ID_LENGTH),
    "invalid UTF-8 in a string": Bad(BAD_UTF8, 400, "malformed", PB_UTF8),
    "wrong content type": Bad(b"{}", 415, "unsupported_media_type",
                              "unsupported Content-Type 'text/plain' "
                              "(expected application/x-protobuf or application/json)", "text/plain"),
    "unsupported encoding": Bad(b"x", 415, "unsupported_encoding",
                                "unsupported Content-Encoding 'br' (expected gzip or identity)",
                                encoding="br"),
    "body over the limit": Bad(BIG, 413, "too_large", TOO_LARGE),
    "not gzip": Bad(NOT_GZIP, 400, "malformed",
                    "invalid gzip body: Error -3 while decompressing data: incorrect header check",
                    encoding="gzip"),
    "truncated gzip": Bad(gzip.compress(WRONG_ID)[:-6], 400, "malformed", "invalid gzip body: truncated",
                          encoding="gzip"),
    "gzip bomb": Bad(gzip.compress(bytes(20 * HTTP_LIMIT)), 413, "too_large",
                     f"decompressed request body exceeds max_request_body_size ({HTTP_LIMIT} bytes)",
                     encoding="gzip"),
    "GET": Bad(b"", 405, "method_not_allowed",
               "method GET is not allowed on /v1/traces (OTLP/HTTP uses POST)", JS, method="GET"),
    "unknown path": Bad(b"", 404, "not_found",
                        "no OTLP endpoint at /v1/profiles (this receiver serves /v1/traces, /v1/metrics, "
                        "/v1/logs)", path="/v1/profiles"),
}


@pytest.mark.parametrize("case", BAD_HTTP.values(), ids=BAD_HTTP.keys())
async def test_http_bad_input_is_rejected_exactly(
    agent: Agent, session: aiohttp.ClientSession, case: Bad, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"Content-Type": case.content_type}
    if case.encoding:
        headers["Content-Encoding"] = case.encoding
    with caplog.at_level(logging.DEBUG, logger="agents.receivers"):
        url = agent.http_base + case.path
        resp = await session.request(case.method, url, data=case.body, headers=headers)
    async with resp:
        body = await resp.read()
        assert resp.status == case.status
        # Errors answer in the request's encoding; protobuf when the request's is unknown.
        if case.content_type == JS:
            assert resp.content_type == JS
            assert json.loads(body)["message"] == case.message
        else:
            assert resp.content_type == PB
            assert status_pb2.Status.FromString(body).message == case.message
        if case.status == 405:
            assert resp.headers["Allow"] == "POST"
    assert agent.count("rejected_requests", transport="http", reason=case.reason) == 1
    assert agent.handler.calls == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] == [
        f"rejected OTLP/http request ({case.reason}): {case.message}"]


async def test_http_body_over_the_limit_without_content_length(
    agent: Agent, session: aiohttp.ClientSession
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield bytes(HTTP_LIMIT // 4)

    url = f"{agent.http_base}/v1/logs"
    async with session.post(url, data=chunks(), headers={"Content-Type": PB}) as resp:
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert resp.status == 413
        assert status_pb2.Status.FromString(await resp.read()).message == TOO_LARGE


async def test_http_bad_data_carries_a_bad_request_detail(
    agent: Agent, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{agent.http_base}/v1/traces", data=WRONG_ID, headers={"Content-Type": PB}) as r:
        st = status_pb2.Status.FromString(await r.read())
    assert st.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert st.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("resourceSpans[0].scopeSpans[0].spans[0].traceId", "expected 16 bytes, got 3")]


async def test_gunzip_caps_memory_of_a_bomb() -> None:
    squeezer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    bomb = b"".join(squeezer.compress(zero) for _ in range(64)) + squeezer.flush()  # 64 MiB inflated
    assert len(bomb) < HTTP_LIMIT
    tracemalloc.start()
    try:
        with pytest.raises(HttpError) as err:
            gunzip(bomb, HTTP_LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (err.value.http_status, err.value.reason) == (413, "too_large")
    assert peak < 4 * HTTP_LIMIT
    assert gunzip(gzip.compress(b"a" * HTTP_LIMIT), HTTP_LIMIT) == b"a" * HTTP_LIMIT


BAD_GRPC = {
    "malformed protobuf": (b"\x0a\x05\x0a", "malformed", PB_MALFORMED),
    "protobuf id of the wrong length": (WRONG_ID, "invalid", ID_LENGTH),
    "invalid UTF-8 in a string": (BAD_UTF8, "malformed", PB_UTF8),
}


@pytest.mark.parametrize(("body", "reason", "message"), BAD_GRPC.values(), ids=BAD_GRPC.keys())
async def test_grpc_bad_input_is_invalid_argument_with_the_reason(
    agent: Agent, channel: grpc.aio.Channel, body: bytes, reason: str, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_call(channel, Signal.TRACES, body)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == message
    st = status_pb2.Status.FromString(dict(err.value.trailing_metadata())["grpc-status-details-bin"])
    assert (st.code, st.message) == (code_pb2.INVALID_ARGUMENT, message)
    assert agent.count("rejected_requests", transport="grpc", reason=reason) == 1
    assert agent.handler.calls == []


@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip])
async def test_grpc_message_over_the_limit_is_resource_exhausted(
    agent: Agent, channel: grpc.aio.Channel, compression: grpc.Compression
) -> None:
    # 2 MiB of one letter gzips to a few KiB: the limit must hold for the inflated size too.
    body = trace_request(name="x" * (2 << 20)).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_call(channel, Signal.TRACES, body, compression=compression)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert agent.handler.calls == []
    assert await grpc_call(channel, Signal.TRACES, trace_request().SerializeToString()) == b""


# --- retryable refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "http_status", "grpc_code", "rpc_code"), [
    (Overloaded("in-flight budget exhausted", retry_after=1.5), 429, grpc.StatusCode.RESOURCE_EXHAUSTED,
     code_pb2.RESOURCE_EXHAUSTED),
    (Unavailable("kafka and spill both down", retry_after=30), 503, grpc.StatusCode.UNAVAILABLE,
     code_pb2.UNAVAILABLE),
], ids=["overloaded", "unavailable"])
async def test_retryable_refusal_tells_the_client_when_to_retry(
    agent: Agent, session: aiohttp.ClientSession, channel: grpc.aio.Channel,
    error: Overloaded | Unavailable, http_status: int, grpc_code: grpc.StatusCode, rpc_code: int,
) -> None:
    agent.handler.error = error
    body = trace_request(n=3).SerializeToString()
    async with session.post(f"{agent.http_base}/v1/traces", data=body, headers={"Content-Type": PB}) as r:
        assert r.status == http_status
        assert r.headers["Retry-After"] == ("2" if error.retry_after == 1.5 else "30")  # whole seconds, up
        st = status_pb2.Status.FromString(await r.read())
    info = error_details_pb2.RetryInfo()
    assert (st.code, st.message) == (rpc_code, str(error))
    assert st.details[0].Unpack(info) and info.retry_delay.ToNanoseconds() == int(error.retry_after * 1e9)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_call(channel, Signal.TRACES, body)
    assert (err.value.code(), err.value.details()) == (grpc_code, str(error))
    trailers = dict(err.value.trailing_metadata())
    # The standard place (status details, as Go's status.FromError reads them) ...
    st = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert (st.code, st.message) == (rpc_code, str(error))
    info = error_details_pb2.RetryInfo()
    assert st.details[0].Unpack(info) and info.retry_delay.ToNanoseconds() == int(error.retry_after * 1e9)
    # ... and where the OpenTelemetry Python exporter looks for it.
    info = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
    assert info.retry_delay.ToNanoseconds() == int(error.retry_after * 1e9)

    assert agent.count("refused_items", signal="traces", reason=error.reason) == 6
    assert agent.count("rejected_requests", transport="http", reason=error.reason) == 0


async def test_retryable_refusal_answers_json_clients_in_json(
    agent: Agent, session: aiohttp.ClientSession
) -> None:
    agent.handler.error = Overloaded("slow down", retry_after=0.2)
    async with session.post(f"{agent.http_base}/v1/traces", data=encode_json(trace_request()),
                            headers={"Content-Type": JS}) as r:
        assert (r.status, r.content_type, r.headers["Retry-After"]) == (429, JS, "1")
        assert await r.json() == {"code": code_pb2.RESOURCE_EXHAUSTED, "message": "slow down", "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.200s"}]}


async def test_sdk_grpc_exporter_honours_retry_info(agent: Agent, sdk_data: SdkData) -> None:
    """The first export is refused with a 0.3 s RetryInfo; the SDK waits that long, then succeeds."""
    refusals = [Overloaded("busy", retry_after=0.3)]
    real_export = agent.handler.export

    async def refuse_once(signal: Signal, request: Message, size_bytes: int) -> ExportResult:
        if refusals:
            raise refusals.pop()
        return await real_export(signal, request, size_bytes)

    agent.handler.export = refuse_once  # type: ignore[method-assign]
    exporter = GrpcSpanExporter(endpoint=agent.grpc_target, insecure=True, timeout=5)
    try:
        started = time.monotonic()
        assert (await asyncio.to_thread(exporter.export, sdk_data.spans)).name == "SUCCESS"
        assert time.monotonic() - started >= 0.3  # waited at least the hint: behaviour, not speed
    finally:
        await asyncio.to_thread(exporter.shutdown)
    assert [r for _, r, _ in agent.handler.calls] == [encode_spans(sdk_data.spans)]


async def test_handler_rejection_is_bad_input_with_its_reason(
    agent: Agent, session: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    agent.handler.error = InvalidRequest("tenant 'x' is not allowed", reason="unknown_tenant")
    body = trace_request().SerializeToString()
    async with session.post(f"{agent.http_base}/v1/traces", data=body, headers={"Content-Type": PB}) as r:
        assert r.status == 400
        assert status_pb2.Status.FromString(await r.read()).message == "tenant 'x' is not allowed"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_call(channel, Signal.TRACES, body)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       "tenant 'x' is not allowed")
    for transport in ("grpc", "http"):
        assert agent.count("rejected_requests", transport=transport, reason="unknown_tenant") == 1


async def test_a_crashing_handler_costs_one_request_not_the_server(
    agent: Agent, session: aiohttp.ClientSession, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    agent.handler.error = RuntimeError("bug in the pipeline")
    body = trace_request().SerializeToString()
    with caplog.at_level(logging.ERROR, logger="agents.receivers"):
        async with session.post(f"{agent.http_base}/v1/traces", data=body, headers={"Content-Type": PB}) as r:
            assert r.status == 500
            assert status_pb2.Status.FromString(await r.read()).message == "internal error in the agent"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await grpc_call(channel, Signal.TRACES, body)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert sum("bug in the pipeline" in (r.exc_text or "") for r in caplog.records) == 2
    agent.handler.error = None
    assert await grpc_call(channel, Signal.TRACES, body) == b""
    async with session.post(f"{agent.http_base}/v1/traces", data=body, headers={"Content-Type": PB}) as r:
        assert r.status == 200


# --- isolation and lifecycle ---------------------------------------------------------------------------


async def test_a_bad_client_does_not_disturb_a_good_one(
    agent: Agent, session: aiohttp.ClientSession, channel: grpc.aio.Channel
) -> None:
    agent.handler.delay = 0.01  # keep good exports in flight while the bad ones arrive
    good = trace_request().SerializeToString()
    url = f"{agent.http_base}/v1/traces"

    async def http(body: bytes) -> int:
        async with session.post(url, data=body, headers={"Content-Type": PB}) as r:
            await r.read()
            return r.status

    async def grpc_status(body: bytes) -> grpc.StatusCode:
        try:
            await grpc_call(channel, Signal.TRACES, body)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    rounds = 25
    results = await asyncio.gather(*(
        coro for _ in range(rounds)
        for coro in (http(good), http(b"\xff" * 64), http(BIG), grpc_status(good), grpc_status(WRONG_ID))
    ))
    assert results == [200, 400, 413, grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT] * rounds
    assert len(agent.handler.calls) == 2 * rounds
    assert agent.count("rejected_requests", transport="http", reason="malformed") == rounds
    assert agent.count("rejected_requests", transport="http", reason="too_large") == rounds
    assert agent.count("rejected_requests", transport="grpc", reason="invalid") == rounds


async def test_stop_lets_in_flight_exports_finish_within_grace() -> None:
    handler, metrics = FakeHandler(delay=0.3), AgentMetrics()
    http_rx = HttpReceiver(HttpServerConfig(), handler, metrics, endpoint="127.0.0.1:0")
    grpc_rx = GrpcReceiver(GrpcServerConfig(), handler, metrics, endpoint="127.0.0.1:0")
    await http_rx.start()
    await grpc_rx.start()
    assert http_rx.port > 0 and grpc_rx.port > 0 and http_rx.port != grpc_rx.port
    body = trace_request().SerializeToString()
    async with aiohttp.ClientSession() as s, grpc.aio.insecure_channel(f"127.0.0.1:{grpc_rx.port}") as ch:
        posted = asyncio.ensure_future(s.post(f"http://127.0.0.1:{http_rx.port}/v1/traces", data=body,
                                              headers={"Content-Type": PB}))
        called = asyncio.ensure_future(grpc_call(ch, Signal.TRACES, body))
        grpc_received = {"signal": "traces", "transport": "grpc"}
        async with asyncio.timeout(5):
            while not (http_rx.in_flight and metrics.registry.get_sample_value(
                    "kotel_agent_received_items_total", grpc_received)):
                await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.gather(http_rx.stop(grace=5), grpc_rx.stop(grace=5))
        assert time.monotonic() - started < 2
        resp = await posted
        assert resp.status == 200
        resp.release()
        assert await called == b""
    assert len(handler.calls) == 2


async def test_stop_cancels_exports_that_outlive_the_grace() -> None:
    handler = FakeHandler(delay=30)
    http_rx = HttpReceiver(HttpServerConfig(), handler, AgentMetrics(), endpoint="127.0.0.1:0")
    await http_rx.start()
    async with aiohttp.ClientSession() as s:
        posted = asyncio.ensure_future(s.post(f"http://127.0.0.1:{http_rx.port}/v1/traces",
                                              data=trace_request().SerializeToString(),
                                              headers={"Content-Type": PB}))
        async with asyncio.timeout(5):
            while not http_rx.in_flight:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        await http_rx.stop(grace=0.2)
        assert time.monotonic() - started < 2
        with pytest.raises(aiohttp.ClientError):
            await posted
    assert handler.calls == []


async def test_build_receivers_follows_the_topology() -> None:
    handler, metrics = FakeHandler(), AgentMetrics()
    both = build_receivers(OtlpProtocols(grpc=GrpcServerConfig(), http=HttpServerConfig()), handler, metrics)
    assert [type(r) for r in both] == [GrpcReceiver, HttpReceiver]
    only_http = build_receivers(OtlpProtocols(http=HttpServerConfig()), handler, metrics)
    assert [type(r) for r in only_http] == [HttpReceiver]
    assert only_http[0].port == 0  # not started


async def test_custom_url_paths_are_served() -> None:
    handler = FakeHandler()
    cfg = HttpServerConfig(traces_url_path="/otlp/v1/traces")
    http_rx = HttpReceiver(cfg, handler, AgentMetrics(), endpoint="127.0.0.1:0")
    await http_rx.start()
    try:
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{http_rx.port}"
            body = trace_request().SerializeToString()
            async with s.post(f"{base}/otlp/v1/traces", data=body, headers={"Content-Type": PB}) as r:
                assert r.status == 200
            async with s.post(f"{base}/v1/traces", data=body, headers={"Content-Type": PB}) as r:
                assert r.status == 404
    finally:
        await http_rx.stop(1)
    assert len(handler.calls) == 1


async def test_a_taken_port_fails_start() -> None:
    handler, metrics = FakeHandler(), AgentMetrics()
    first = GrpcReceiver(GrpcServerConfig(), handler, metrics, endpoint="127.0.0.1:0")
    await first.start()
    try:
        second = GrpcReceiver(GrpcServerConfig(), handler, metrics, endpoint=f"127.0.0.1:{first.port}")
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:"):
            await second.start()
        await second.stop(0)
    finally:
        await first.stop(0)
