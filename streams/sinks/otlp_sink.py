"""The OTLP sink (Tempo, Jaeger, another Collector): OTLP/gRPC or OTLP/HTTP with the spec's retry rules.

Records of one tenant are sent together: a serialized Export request is a run of resource entries,
so concatenating records' bytes is itself a valid request, without decoding. Retryable answers follow
the OTLP specification: gRPC CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE,
DATA_LOSS, and RESOURCE_EXHAUSTED only with a RetryInfo; HTTP 429, 502, 503, 504 (honouring
Retry-After). Everything else is permanent and goes to the dead-letter topic. Partial success is
counted, not retried (the server said those items are bad).
"""

from __future__ import annotations

import gzip
import logging
from collections import defaultdict
from collections.abc import Sequence

import aiohttp
import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter

from kotel.otlp import Signal
from kotel.topology.exporters import OtlpExporterConfig, OtlpHttpExporterConfig
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord

log = logging.getLogger("kotel.sink.otlp")

RETRYABLE_GRPC = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}
RETRYABLE_HTTP = {429, 502, 503, 504}
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # gRPC's default receive limit on most servers


def grpc_result(code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, bytes | str]]) -> Result:
    retry_after = _retry_info(trailers)
    if code in RETRYABLE_GRPC or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None):
        return Result(Outcome.RETRY, f"grpc {code.name}", retry_after or 0.0)
    return Result(Outcome.PERMANENT, f"grpc {code.name}: {details}"[:200])


def http_result(status: int, body: str, retry_after_header: str | None) -> Result:
    if 200 <= status < 300:
        return OK
    if status in RETRYABLE_HTTP:
        try:
            delay = float(retry_after_header) if retry_after_header else 0.0
        except ValueError:
            delay = 0.0
        return Result(Outcome.RETRY, f"http {status}", delay)
    return Result(Outcome.PERMANENT, f"http {status}: {body.strip()}"[:200])


def _retry_info(trailers: Sequence[tuple[str, bytes | str]]) -> float | None:
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


class OtlpDeliverer:
    def __init__(
        self,
        name: str,
        config: OtlpExporterConfig | OtlpHttpExporterConfig,
        signals: tuple[str, ...] = ("traces",),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.signals = signals
        self.http = isinstance(config, OtlpHttpExporterConfig)
        self._channel: grpc.aio.Channel | None = None
        self._session: aiohttp.ClientSession | None = None
        self.register_metrics(registry or CollectorRegistry())

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "kotel_sink_rejected_items",
            "Items the backend rejected (partial success)",
            ["sink", "signal"],
            registry=registry,
        )

    def _headers(self, tenant: str) -> list[tuple[str, str]]:
        out = [(k.lower(), v.get_secret_value()) for k, v in self.config.headers.items()]
        th = self.config.tenant_header
        if th.enabled and tenant:
            out.append((th.name.lower(), th.values.get(tenant, tenant)))
        return out

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            groups[(record.tenant, record.signal)].append(i)
        results: list[Result] = [OK] * len(records)
        for (tenant, signal), indexes in groups.items():
            for chunk in _chunks(indexes, records):
                body = b"".join(records[i].value for i in chunk)
                send = self._send_http if self.http else self._send_grpc
                result = await send(Signal(signal), tenant, body)
                for i in chunk:
                    results[i] = result
        return results

    async def _send_grpc(self, signal: Signal, tenant: str, body: bytes) -> Result:
        if self._channel is None:
            target = self.config.endpoint.removeprefix("http://").removeprefix("https://")
            if self.config.tls.insecure or self.config.endpoint.startswith("http://"):
                self._channel = grpc.aio.insecure_channel(target)
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read(self.config.tls.ca_file),
                    private_key=_read(self.config.tls.key_file),
                    certificate_chain=_read(self.config.tls.cert_file),
                )
                self._channel = grpc.aio.secure_channel(target, creds)
        call = self._channel.unary_unary(
            signal.grpc_method, request_serializer=None, response_deserializer=None
        )
        compression = grpc.Compression.Gzip if self.config.compression == "gzip" else None
        try:
            response = await call(
                body,
                metadata=self._headers(tenant),
                timeout=self.config.timeout.total_seconds(),
                compression=compression,
            )
        except grpc.aio.AioRpcError as exc:
            trailers = list(exc.trailing_metadata() or ())
            return grpc_result(exc.code(), exc.details() or "", trailers)
        self._count_partial(signal, signal.response_class.FromString(response))
        return OK

    async def _send_http(self, signal: Signal, tenant: str, body: bytes) -> Result:
        assert isinstance(self.config, OtlpHttpExporterConfig)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout.total_seconds())
            )
        url = (
            getattr(self.config, f"{signal.value}_endpoint")
            or self.config.endpoint.rstrip("/") + signal.http_path
        )
        headers = dict(self._headers(tenant))
        headers["Content-Type"] = "application/x-protobuf"
        if self.config.compression == "gzip":
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                payload = await resp.read()
                result = http_result(
                    resp.status, payload[:500].decode(errors="replace"), resp.headers.get("Retry-After")
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Result(Outcome.RETRY, f"http {type(exc).__name__}")
        if result.outcome is Outcome.OK and payload:
            try:
                self._count_partial(signal, signal.response_class.FromString(payload))
            except Exception:  # a server may answer an empty or non-OTLP body on success
                log.debug("sink %s: unparsable success body", self.name)
        return result

    def _count_partial(self, signal: Signal, response: object) -> None:
        partial = getattr(response, "partial_success", None)
        if partial is None:
            return
        rejected = next(
            (
                getattr(partial, f)
                for f in ("rejected_spans", "rejected_data_points", "rejected_log_records")
                if hasattr(partial, f)
            ),
            0,
        )
        if rejected:
            self.rejected.labels(self.name, signal.value).inc(rejected)
            log.warning("sink %s: backend rejected %d items: %s", self.name, rejected, partial.error_message)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._session is not None:
            await self._session.close()


def _chunks(indexes: list[int], records: Sequence[SinkRecord]) -> list[list[int]]:
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in indexes:
        length = len(records[i].value)
        if current and size + length > MAX_REQUEST_BYTES:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += length
    if current:
        out.append(current)
    return out


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()
