"""Synthetic OTLP with production shapes: a fleet of tenants' services, their traces, metrics and logs.

Each call builds one export request of about ``n`` items stamped "now" and records every item in the
ledger. Traces are call trees over several services: spans of one trace come from different service
instances, arrive shuffled, and a share is held back and sent ``late_by`` later (after the tail
sampler's decision). Deterministic for a seed, apart from the clock.
"""

from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from kotel.otlp import Signal
from kotel.otlp.attributes import kv
from loadtest.generator import identity
from loadtest.generator.ledger import ERROR, HEALTH, LATE, SLOW, UNKNOWN, WARMUP, Ledger
from loadtest.scenario import Workload

ROUTES = ("/api/orders", "/api/orders/{id}", "/api/cart", "/api/users/{id}", "/api/search", "/api/pay")
SERVICES = ("frontend", "checkout", "cart", "payment", "inventory", "users", "search", "shipping")
HEALTH_PATH = "/health"
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
BOUNDS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
SEVERITIES = ((5, "DEBUG"), (9, "INFO"), (13, "WARN"), (17, "ERROR"))
BODIES = {
    "DEBUG": "cache lookup key=order:{n} hit={b}",
    "INFO": "order {n} processed in {ms} ms",
    "WARN": "retrying call to payment for order {n} after {ms} ms",
    "ERROR": "order {n} failed: upstream returned 503 after {ms} ms",
}
_SERVER, _CLIENT = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT
_STATUS_ERROR = Status(code=Status.STATUS_CODE_ERROR, message="upstream failure")


@dataclass(frozen=True, slots=True)
class Instance:
    tenant: int  # index into the ledger's tenants
    service: int
    resource: Resource
    unknown: bool


@dataclass(frozen=True, slots=True)
class Built:
    """One export request and its ledger row."""

    signal: Signal
    request: Message
    items: int
    request_id: int
    copies: int


class Shapes:
    def __init__(self, workload: Workload, ledger: Ledger) -> None:
        self.w = workload
        self.ledger = ledger
        self.rng = random.Random(workload.seed)
        tenants = [*workload.tenants, workload.unknown_tenant]
        assert ledger.tenants == tenants, "the ledger must list the workload's tenants, unknown last"
        services = max(workload.traces.services, 1)
        self.instances: dict[int, list[list[Instance]]] = {}
        for t, tenant in enumerate(tenants):
            per_service = []
            for s in range(services):
                name = SERVICES[s % len(SERVICES)] + (f"-{s // len(SERVICES)}" if s >= len(SERVICES) else "")
                per_service.append([Instance(t, s, _resource(tenant, name, i), t == len(tenants) - 1)
                                    for i in range(workload.instances_per_service)])
            self.instances[t] = per_service
        self._late: deque[tuple[int, Instance, Span, int]] = deque()
        self._recent: deque[tuple[bytes, bytes, int]] = deque(maxlen=512)
        self._trace_prefix = os.urandom(8)
        # metric series state
        self.series = workload.metrics.series
        ledger.series = self.series
        self._series_instance = [self._pick_instance(self.rng) for _ in range(self.series)]
        self._series_attributes = [
            [kv(identity.SERIES_ATTRIBUTE, s), kv("http.route", ROUTES[s % len(ROUTES)])]
            for s in range(self.series)
        ]
        self._last_ms = [0] * self.series
        self._cumulative = [0] * self.series
        self._hist = [[0] * (len(BOUNDS) + 1) for _ in range(self.series)]
        self._next_series = 0
        self._start_ns = 0

    # -- shared ---------------------------------------------------------------------------------------

    def _pick_tenant(self, rng: random.Random) -> int:
        if rng.random() < self.w.unknown_share:
            return len(self.w.tenants)
        return rng.randrange(len(self.w.tenants))

    def _pick_instance(self, rng: random.Random, tenant: int | None = None, service: int | None = None
                       ) -> Instance:
        t = self._pick_tenant(rng) if tenant is None else tenant
        services = self.instances[t]
        s = rng.randrange(len(services)) if service is None else service
        return rng.choice(services[s])

    def _register(self, signal: Signal, now_ns: int, items: int) -> tuple[int, int]:
        copies = 2 if self.rng.random() < self.w.duplicate_share else 1
        return self.ledger[signal.value].new_request(now_ns, items, copies), copies

    # -- traces ---------------------------------------------------------------------------------------

    def traces(self, now_ns: int, n: int, warmup: bool = False) -> Built | None:
        """About ``n`` spans: whole new traces (less their late spans) plus late spans now due."""
        led = self.ledger["traces"]
        batch: list[tuple[Instance, Span, int]] = []
        while self._late and self._late[0][0] <= now_ns:
            _, inst, span, seq = self._late.popleft()
            batch.append((inst, span, seq))
        while len(batch) < n:
            self._trace(now_ns, batch, warmup)
        if not batch:
            return None
        self.rng.shuffle(batch)  # children before parents, instances interleaved: as a gateway sees them
        request_id, copies = self._register(Signal.TRACES, now_ns, len(batch))
        groups: dict[int, tuple[Instance, list[Span]]] = {}
        for inst, span, seq in batch:
            led.req[seq] = request_id
            groups.setdefault(id(inst), (inst, []))[1].append(span)
        req = ExportTraceServiceRequest()
        for inst, spans in groups.values():
            rs = req.resource_spans.add()
            rs.resource.CopyFrom(inst.resource)
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = "opentelemetry.instrumentation.flask", "0.48b0"
            ss.spans.extend(spans)
        return Built(Signal.TRACES, req, len(batch), request_id, copies)

    def _trace(self, now_ns: int, batch: list[tuple[Instance, Span, int]], warmup: bool) -> None:
        rng, shape, led = self.rng, self.w.traces, self.ledger["traces"]
        trace_seq = len(self.ledger.trace_flags)
        tenant = self._pick_tenant(rng)
        tid = identity.trace_id(self._trace_prefix, self.ledger.run_tag, trace_seq)
        base = (UNKNOWN if tenant == len(self.w.tenants) else 0) | (WARMUP if warmup else 0)
        end = now_ns - rng.randrange(1_000_000, 5_000_000)
        if rng.random() < shape.health_share:
            flags = base | HEALTH
            seq = led.items
            span = Span(trace_id=tid, span_id=identity.span_id(self.ledger.run_tag, seq), kind=_SERVER,
                        name=f"GET {HEALTH_PATH}", start_time_unix_nano=end - 900_000,
                        end_time_unix_nano=end,
                        attributes=[kv("http.request.method", "GET"), kv("http.target", HEALTH_PATH),
                                    kv("http.response.status_code", 200)])
            self._emit(batch, self._pick_instance(rng, tenant, 0), span, seq, tenant, flags, trace_seq)
            self.ledger.trace_flags.append(flags)
            return
        slow = rng.random() < shape.slow_share
        threshold_ns = shape.slow_threshold_ms * 1_000_000
        if slow:
            duration = int(threshold_ns * rng.uniform(1.2, 3.0))
        else:
            duration = min(int(rng.lognormvariate(0, 0.8) * shape.median_ms * 1e6), int(threshold_ns * 0.8))
        # Warm-up traces are errors, so the errors policy keeps them and the warm-up reaches the archive
        # however few traces it has (a sampled-out warm-up would look like a stalled pipeline).
        error = warmup or rng.random() < shape.error_share
        flags = base | (SLOW if slow else 0) | (ERROR if error else 0)
        # nodes: (parent index, service, depth, start, end)
        nodes = [(-1, 0, 0, end - duration, end)]
        i = 0
        while i < len(nodes) and len(nodes) < shape.max_spans:
            _, _, depth, start, stop = nodes[i]
            if depth + 1 < shape.max_depth:
                for _ in range(rng.randint(0 if depth else 1, shape.max_fanout)):
                    if len(nodes) >= shape.max_spans:
                        break
                    length = stop - start
                    child = int(length * rng.uniform(0.1, 0.7))
                    offset = rng.randrange(max(1, length - child))
                    service = rng.randrange(1, shape.services) if shape.services > 1 else 0
                    nodes.append((i, service, depth + 1, start + offset, start + offset + child))
            i += 1
        failing = rng.randrange(len(nodes)) if error else -1
        first = led.items
        for k, (parent, service, depth, start, stop) in enumerate(nodes):
            route = ROUTES[(trace_seq + service) % len(ROUTES)]
            leaf_db = depth and service % 3 == 2
            span = Span(
                trace_id=tid, span_id=identity.span_id(self.ledger.run_tag, first + k),
                parent_span_id=identity.span_id(self.ledger.run_tag, first + parent) if parent >= 0 else b"",
                kind=_CLIENT if leaf_db else _SERVER, name="SELECT orders" if leaf_db else f"GET {route}",
                start_time_unix_nano=start, end_time_unix_nano=stop,
                attributes=_span_attributes(route, k == failing),
            )
            if k == failing:
                span.status.CopyFrom(_STATUS_ERROR)
            # Never the ERROR span: a trace decided without it is rightly dropped by any tail sampler,
            # and the run checks that every ERROR trace is kept.
            late = k > 0 and k != failing and rng.random() < shape.late_share
            self._emit(batch, self._pick_instance(rng, tenant, service), span, first + k, tenant,
                       flags | (LATE if late else 0), trace_seq, late_until=now_ns + _ns(shape.late_by)
                       if late else 0)
        self.ledger.trace_flags.append(flags)
        self._recent.append((tid, identity.span_id(self.ledger.run_tag, first), tenant))

    def _emit(self, batch: list[tuple[Instance, Span, int]], inst: Instance, span: Span,
              seq: int, tenant: int, flags: int, trace_seq: int, late_until: int = 0) -> None:
        ledger = self.ledger["traces"]
        ledger.req.append(-1)
        ledger.tenant.append(tenant)
        ledger.flags.append(flags)
        ledger.trace.append(trace_seq)
        ledger.key.append(seq)
        if late_until:
            self._late.append((late_until, inst, span, seq))
        else:
            batch.append((inst, span, seq))

    # -- metrics --------------------------------------------------------------------------------------

    def metrics(self, now_ns: int, n: int, warmup: bool = False) -> Built:
        """``n`` points, series taken round-robin; kinds: gauge, counter, up-down sum, histogram."""
        rng, led, count = self.rng, self.ledger["metrics"], self.series
        if not self._start_ns:
            self._start_ns = now_ns - 60_000_000_000
        request_id, copies = self._register(Signal.METRICS, now_ns, n)
        now_ms = now_ns // 1_000_000
        groups: dict[int, tuple[Instance, dict[int, Metric]]] = {}
        for _ in range(n):
            s = self._next_series
            self._next_series = (s + 1) % count
            inst = self._series_instance[s]
            t_ms = max(now_ms, self._last_ms[s] + 1)
            self._last_ms[s] = t_ms
            t_ns = t_ms * 1_000_000
            kind = s % 4
            metrics = groups.setdefault(id(inst), (inst, {}))[1]
            metric = metrics.get(kind)
            if metric is None:
                metric = metrics[kind] = _metric(kind)
            attrs = self._series_attributes[s]
            if kind == 0:
                metric.gauge.data_points.add(time_unix_nano=t_ns, as_double=rng.random() * 100,
                                             attributes=attrs)
            elif kind == 1:
                self._cumulative[s] += rng.randrange(1, 20)
                metric.sum.data_points.add(start_time_unix_nano=self._start_ns, time_unix_nano=t_ns,
                                           as_int=self._cumulative[s], attributes=attrs)
            elif kind == 2:
                metric.sum.data_points.add(start_time_unix_nano=self._start_ns, time_unix_nano=t_ns,
                                           as_int=rng.randrange(0, 200), attributes=attrs)
            else:
                counts = self._hist[s]
                total = 0.0
                for _ in range(5):
                    value = rng.lognormvariate(3.5, 1.0)
                    total += value
                    counts[next((b for b, bound in enumerate(BOUNDS) if value <= bound), len(BOUNDS))] += 1
                self._cumulative[s] += int(total)
                metric.histogram.data_points.add(
                    start_time_unix_nano=self._start_ns, time_unix_nano=t_ns, count=sum(counts),
                    sum=float(self._cumulative[s]), bucket_counts=counts, explicit_bounds=BOUNDS,
                    attributes=attrs)
            led.req.append(request_id)
            led.tenant.append(inst.tenant)
            led.flags.append((UNKNOWN if inst.unknown else 0) | (WARMUP if warmup else 0))
            led.trace.append(-1)
            led.key.append(identity.metric_key(t_ms, s, count))
        req = ExportMetricsServiceRequest()
        for inst, metrics in groups.values():
            rm = req.resource_metrics.add()
            rm.resource.CopyFrom(inst.resource)
            sm = rm.scope_metrics.add()
            sm.scope.name = "opentelemetry.instrumentation.flask"
            sm.metrics.extend(metrics.values())
        return Built(Signal.METRICS, req, n, request_id, copies)

    # -- logs -----------------------------------------------------------------------------------------

    def logs(self, now_ns: int, n: int, warmup: bool = False) -> Built:
        rng, led, shape = self.rng, self.ledger["logs"], self.w.logs
        request_id, copies = self._register(Signal.LOGS, now_ns, n)
        groups: dict[int, tuple[Instance, list[LogRecord]]] = {}
        for _ in range(n):
            seq = led.items
            tid, sid, tenant = b"", b"", None
            if self._recent and rng.random() < shape.trace_context_share:
                tid, sid, tenant = rng.choice(self._recent)
            inst = self._pick_instance(rng, tenant)
            number, text = rng.choices(SEVERITIES, weights=shape.severity_weights)[0]
            body = BODIES[text].format(n=rng.randrange(10**6), ms=rng.randrange(900), b=rng.random() < 0.5)
            when = now_ns - rng.randrange(100_000, 2_000_000)
            record = LogRecord(time_unix_nano=when, observed_time_unix_nano=now_ns, severity_number=number,
                               severity_text=text, trace_id=tid, span_id=sid,
                               attributes=[kv(identity.ID_ATTRIBUTE, seq), *_LOG_ATTRIBUTES[seq % 8]])
            record.body.string_value = body
            groups.setdefault(id(inst), (inst, []))[1].append(record)
            led.req.append(request_id)
            led.tenant.append(inst.tenant)
            led.flags.append((UNKNOWN if inst.unknown else 0) | (WARMUP if warmup else 0))
            led.trace.append(-1)
            led.key.append(seq)
        req = ExportLogsServiceRequest()
        for inst, records in groups.values():
            rl = req.resource_logs.add()
            rl.resource.CopyFrom(inst.resource)
            sl = rl.scope_logs.add()
            sl.scope.name = "app.logger"
            sl.log_records.extend(records)
        return Built(Signal.LOGS, req, n, request_id, copies)

    def late_pending(self) -> int:
        """Late spans not yet sent: the driver keeps sending until these are out too."""
        return len(self._late)

    def next_late_ns(self) -> int | None:
        return self._late[0][0] if self._late else None


_LOG_ATTRIBUTES = [(kv("logger", "orders"), kv("thread", f"worker-{i}")) for i in range(8)]
_SPAN_ATTRIBUTES = {(route, failed): (kv("http.request.method", "GET"), kv("http.target", route),
                                      kv("http.response.status_code", 500 if failed else 200))
                    for route in ROUTES for failed in (False, True)}


def _span_attributes(route: str, failed: bool) -> tuple:
    return _SPAN_ATTRIBUTES[(route, failed)]


def _ns(delta: object) -> int:
    return int(delta.total_seconds() * 1e9)  # type: ignore[attr-defined]


def _resource(tenant: str, service: str, instance: int) -> Resource:
    return Resource(attributes=[
        kv("service.name", service), kv("service.instance.id", f"{tenant}/{service}-{instance}"),
        kv("service.version", "2.3.1"), kv("tenant", tenant), kv("deployment.environment", "loadtest"),
        kv("host.name", f"node-{instance % 4}"), kv("telemetry.sdk.language", "python"),
    ])


def _metric(kind: int) -> Metric:
    if kind == 0:
        return Metric(name="loadtest.queue.depth", unit="{item}")
    if kind == 1:
        metric = Metric(name="loadtest.requests", unit="{request}")
        metric.sum.aggregation_temporality, metric.sum.is_monotonic = CUMULATIVE, True
        return metric
    if kind == 2:
        metric = Metric(name="loadtest.connections.active", unit="{connection}")
        metric.sum.aggregation_temporality, metric.sum.is_monotonic = CUMULATIVE, False
        return metric
    metric = Metric(name="loadtest.request.duration", unit="ms")
    metric.histogram.aggregation_temporality = CUMULATIVE
    return metric
