"""The Prometheus remote-write and Loki push sinks: translate per tenant, POST, classify the answer.

Both are stateless HTTP posts except for Prometheus' delta accumulator; so a retried record re-sends
what it was translated to the first time instead of translating again (which would add deltas twice).
"""

from __future__ import annotations

import abc
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import cramjam
from prometheus_client import CollectorRegistry, Counter

from kotel.otlp import OtlpDecodeError, Signal, decode_protobuf
from kotel.topology.exporters import HttpClientBase, LokiExporterConfig, PrometheusRemoteWriteConfig
from streams.sinks.loki_translate import LokiTranslator, classify_loki_response, encode_push, push_headers
from streams.sinks.loki_wire import LokiWireTranslator
from streams.sinks.prom_translate import (
    PrometheusTranslator,
    classify_prometheus_response,
    encode_series,
    remote_write_headers,
)
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord

log = logging.getLogger("kotel.sink.http")

Encoded = tuple[bytes, dict[str, str]]
_OUTCOMES = {"ok": Outcome.OK, "retry": Outcome.RETRY, "permanent": Outcome.PERMANENT}


_SEVERITY = {Outcome.OK: 0, Outcome.RETRY: 1, Outcome.PERMANENT: 2}


def _worse(a: Result, b: Result) -> Result:
    return a if _SEVERITY[a.outcome] >= _SEVERITY[b.outcome] else b


class _HttpSink(abc.ABC):
    """Records are translated once each (cached until they are done), then packed into requests of
    at most ``max_units`` (series or log entries), as Prometheus' own remote write sends at most a few
    thousand samples a request. A record's result is the worst of the requests that carried it."""

    signal: Signal
    max_units = 5000

    def __init__(self, name: str, config: HttpClientBase, classify: Callable[[int, str], str]) -> None:
        self.name = name
        self.config = config
        self.signals = (self.signal.value,)
        self._classify = classify
        self._session: aiohttp.ClientSession | None = None
        self._translated: dict[tuple[str, int, int], list[Any]] = {}

    def _tenant_headers(self, tenant: str) -> dict[str, str]:
        out = {k: v.get_secret_value() for k, v in self.config.headers.items()}
        th = self.config.tenant_header
        if th.enabled and tenant:
            out[th.name] = th.values.get(tenant, tenant)
        return out

    @abc.abstractmethod
    def translate(self, request: Any) -> list[Any]:
        """The units (series, log streams) of one OTLP request, each weighing at most max_units."""

    def translate_record(self, value: bytes) -> list[Any]:
        """The units of one record's value; OtlpDecodeError when it is not valid OTLP."""
        return self.translate(decode_protobuf(self.signal, value))

    @abc.abstractmethod
    def weight(self, unit: Any) -> int: ...

    @abc.abstractmethod
    def encode(self, units: list[Any]) -> Encoded:
        """The request body and headers for these units."""

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        results: list[Result] = [OK] * len(records)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            groups[record.tenant].append(i)
        for tenant, indexes in groups.items():
            await self._deliver_tenant(tenant, records, indexes, results)
        return results

    async def _deliver_tenant(
        self, tenant: str, records: Sequence[SinkRecord], indexes: list[int], results: list[Result]
    ) -> None:
        """Translate record by record and post each request as it fills, so memory holds one request
        and one record's translation; only records that must be retried keep theirs."""
        units: list[Any] = []
        owners: list[int] = []
        weight = 0
        complete: set[int] = set()  # records whose every unit is in a request already built

        async def post() -> None:
            nonlocal units, owners, weight
            result = await self._post(tenant, self.encode(units))
            for owner in set(owners):
                results[owner] = _worse(results[owner], result)
                if owner in complete and results[owner].outcome is not Outcome.RETRY:
                    self._translated.pop(_key(records[owner]), None)
            units, owners, weight = [], [], 0

        for i in indexes:
            key = _key(records[i])
            translated = self._translated.get(key)
            if translated is None:
                try:
                    translated = self.translate_record(records[i].value)
                except OtlpDecodeError as exc:
                    results[i] = Result(Outcome.PERMANENT, f"invalid OTLP: {exc}"[:200])
                    continue
                self._translated[key] = translated
            for unit in translated:
                w = self.weight(unit)
                if units and weight + w > self.max_units:
                    await post()
                units.append(unit)
                owners.append(i)
                weight += w
            complete.add(i)
        if units:
            await post()
        for i in indexes:
            if results[i].outcome is not Outcome.RETRY:
                self._translated.pop(_key(records[i]), None)  # retried records keep their translation

    async def _post(self, tenant: str, encoded: Encoded) -> Result:
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


def _key(record: SinkRecord) -> tuple[str, int, int]:
    return (record.topic, record.partition, record.offset)


class PrometheusDeliverer(_HttpSink):
    """Units are pieces of already encoded series (bytes, samples): a request is their concatenation."""

    signal = Signal.METRICS
    max_units = 2000  # samples per request, Prometheus remote write's own default
    #: samples per piece: small enough that requests fill to nearly max_units, large enough that packing
    #: handles a few hundred units per record rather than one per series
    piece_samples = 250

    def __init__(self, name: str, config: PrometheusRemoteWriteConfig) -> None:
        super().__init__(name, config, classify_prometheus_response)
        self.translator = PrometheusTranslator(config)
        self.register_metrics(CollectorRegistry())

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.dropped = Counter(
            "kotel_sink_dropped_points",
            "Points with no Prometheus equivalent, by reason (delta_temporality, ...)",
            ["sink", "reason"],
            registry=registry,
        )

    def translate(self, request: Any) -> list[Any]:
        return self.translate_record(request.SerializeToString())

    def translate_record(self, value: bytes) -> list[Any]:
        result = self.translator.translate_wire(value)
        for reason, count in result.dropped.items():
            self.dropped.labels(self.name, reason).inc(count)
        return result.pieces(self.piece_samples)

    def weight(self, unit: Any) -> int:
        return max(1, unit[1])

    def encode(self, units: list[Any]) -> Encoded:
        return encode_series(unit[0] for unit in units), remote_write_headers()


class LokiDeliverer(_HttpSink):
    signal = Signal.LOGS

    def __init__(self, name: str, config: LokiExporterConfig) -> None:
        super().__init__(name, config, classify_loki_response)
        self.translator = LokiTranslator(config)
        self.wire = LokiWireTranslator(config) if config.encoding == "protobuf" else None
        self.loki_config = config

    def translate(self, request: Any) -> list[Any]:
        if self.wire is not None:
            return self.translate_record(request.SerializeToString())
        out = []
        for stream in self.translator.translate(request):  # a long stream is cut so each piece fits
            for start in range(0, len(stream.entries), self.max_units):
                out.append(replace(stream, entries=stream.entries[start : start + self.max_units]))
        return out

    def translate_record(self, value: bytes) -> list[Any]:
        """Protobuf: (PushRequest.streams bytes, entries) pieces; JSON: LokiStream objects."""
        if self.wire is None:
            return super().translate_record(value)
        return self.wire.translate_wire(value, self.max_units)

    def weight(self, unit: Any) -> int:
        return unit[1] if self.wire is not None else len(unit.entries)

    def encode(self, units: list[Any]) -> Encoded:
        if self.wire is not None:
            body = b"".join(unit[0] for unit in units)  # a PushRequest is its streams fields, concatenated
            return bytes(cramjam.snappy.compress_raw(body)), push_headers("protobuf")
        return encode_push(units, self.loki_config)
