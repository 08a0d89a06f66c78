"""The Prometheus remote-write and Loki push sinks: translate per tenant, POST, classify the answer.

Both are stateless HTTP posts except for Prometheus' delta accumulator; so a retried batch re-sends the
bytes encoded the first time instead of translating again (which would add its deltas twice).
"""

from __future__ import annotations

import abc
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import aiohttp

from kotel.otlp import OtlpDecodeError, Signal, decode_protobuf
from kotel.topology.exporters import HttpClientBase, LokiExporterConfig, PrometheusRemoteWriteConfig
from streams.sinks.loki_translate import LokiTranslator, classify_loki_response, encode_push
from streams.sinks.prom_translate import (
    PrometheusTranslator,
    classify_prometheus_response,
    encode_write_request,
    remote_write_headers,
)
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord

log = logging.getLogger("kotel.sink.http")

Encoded = tuple[bytes, dict[str, str]]
_OUTCOMES = {"ok": Outcome.OK, "retry": Outcome.RETRY, "permanent": Outcome.PERMANENT}


class _HttpSink(abc.ABC):
    signal: Signal

    def __init__(self, name: str, config: HttpClientBase, classify: Callable[[int, str], str]) -> None:
        self.name = name
        self.config = config
        self.signals = (self.signal.value,)
        self._classify = classify
        self._session: aiohttp.ClientSession | None = None
        self._encoded: dict[tuple[tuple[str, int, int], ...], Encoded | None] = {}

    def _tenant_headers(self, tenant: str) -> dict[str, str]:
        out = {k: v.get_secret_value() for k, v in self.config.headers.items()}
        th = self.config.tenant_header
        if th.enabled and tenant:
            out[th.name] = th.values.get(tenant, tenant)
        return out

    @abc.abstractmethod
    def encode(self, requests: list) -> Encoded | None:
        """The request body and headers for these OTLP requests, or None when nothing is left to send."""

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        results: list[Result] = [OK] * len(records)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            try:
                decode_protobuf(self.signal, record.value)
            except OtlpDecodeError as exc:
                results[i] = Result(Outcome.PERMANENT, f"invalid OTLP: {exc}"[:200])
                continue
            groups[record.tenant].append(i)
        for tenant, indexes in groups.items():
            result = await self._send(tenant, [records[i] for i in indexes])
            for i in indexes:
                results[i] = result
        return results

    async def _send(self, tenant: str, records: list[SinkRecord]) -> Result:
        key = tuple((r.topic, r.partition, r.offset) for r in records)
        if key not in self._encoded:
            self._encoded[key] = self.encode([decode_protobuf(self.signal, r.value) for r in records])
        encoded = self._encoded[key]
        if encoded is None:  # nothing to send (for example only dropped delta points)
            self._encoded.pop(key, None)
            return OK
        body, headers = encoded
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout.total_seconds())
            )
        try:
            async with self._session.post(
                self.config.endpoint, data=body, headers={**headers, **self._tenant_headers(tenant)}
            ) as resp:
                text = (await resp.read())[:1000].decode(errors="replace")
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Result(Outcome.RETRY, f"http {type(exc).__name__}")
        outcome = _OUTCOMES[self._classify(status, text)]
        if outcome is not Outcome.RETRY:
            self._encoded.pop(key, None)
        if outcome is Outcome.OK:
            return OK
        try:
            delay = float(retry_after) if retry_after else 0.0
        except ValueError:
            delay = 0.0
        return Result(outcome, f"http {status}: {text.strip()}"[:200], delay)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class PrometheusDeliverer(_HttpSink):
    signal = Signal.METRICS

    def __init__(self, name: str, config: PrometheusRemoteWriteConfig) -> None:
        super().__init__(name, config, classify_prometheus_response)
        self.translator = PrometheusTranslator(config)

    def encode(self, requests: list) -> Encoded | None:
        series, metadata = [], []
        for request in requests:
            result = self.translator.translate(request)
            series += result.series
            metadata += result.metadata
            for reason, count in result.dropped.items():
                log.info("sink %s: %d points dropped (%s)", self.name, count, reason)
        if not series:
            return None
        return encode_write_request(series, metadata), remote_write_headers()


class LokiDeliverer(_HttpSink):
    signal = Signal.LOGS

    def __init__(self, name: str, config: LokiExporterConfig) -> None:
        super().__init__(name, config, classify_loki_response)
        self.translator = LokiTranslator(config)
        self.loki_config = config

    def encode(self, requests: list) -> Encoded | None:
        streams = [s for request in requests for s in self.translator.translate(request)]
        if not streams:
            return None
        return encode_push(streams, self.loki_config)
