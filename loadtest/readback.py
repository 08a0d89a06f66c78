"""Read back what each real backend received, item by item, after the drain.

The archive says what was delivered; a backend named by the scenario must hold exactly the delivered
items of the tenants routed to it (every tenant of the workload, never the unknown one). Per backend:

- tempo (Jaeger stands in): spans by span id (``run_tag | seq``). One find-traces query per time slice
  with no service name (Jaeger's memory store then matches every trace) and ``raw_traces=true``, so
  the query service's adjusters cannot hide a duplicated span. A trace matched by two slices is read
  from the first only. Jaeger ignores tenants, so spans are compared across tenants.
- loki (VictoriaLogs stands in): log records by the ``loadtest_id`` field (the ID attribute as the Loki
  sink names it), one LogsQL query per time slice and per tenant's AccountID, so a record filed under
  another tenant counts as missing there and unexpected where it landed.
- prometheus: one range-vector query per time slice over the generator's four metric names returns
  every raw sample; a sample's identity is its ``loadtest_series`` label and timestamp. Gauges and sums
  are checked per point; histograms by their ``_count`` series only (one sample per point; ``_bucket``
  and ``_sum`` come from the same point and are not checked). Prometheus keeps one sample per series
  and timestamp, so duplicates cannot be seen there and are reported as 0.

The names are written out here, not computed with the sink's translator: this checks that translation.
Slices keep every answer to a bounded size; the whole read-back of a backend has a deadline.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import numpy as np

from loadtest.collect import Observation
from loadtest.generator.identity import ID_ATTRIBUTE, SERIES_ATTRIBUTE
from loadtest.generator.ledger import Ledger
from loadtest.servers import http_request

SIGNAL_OF = {"tempo": "traces", "prometheus": "metrics", "loki": "logs"}
LOG_ID_FIELD = ID_ATTRIBUTE.replace(".", "_")
SERIES_LABEL = SERIES_ATTRIBUTE.replace(".", "_")
# loadtest/generator/shapes.py's metrics after the OTLP -> Prometheus naming rules.
PROMETHEUS_NAMES = ("loadtest_queue_depth", "loadtest_requests_total", "loadtest_connections_active",
                    "loadtest_request_duration_milliseconds_count")
# Span start times precede their request by up to a slow trace's length; log times by a few ms.
MARGIN_NS = 120 * 10**9
EXAMPLES = 5
_SEQ_BITS = 48


class ReadbackError(RuntimeError):
    """A backend could not be read back (unreachable, an error answer, or out of time)."""


def account_of(tenant: int) -> int:
    """The VictoriaLogs AccountID of a tenant index: loadtest/pipeline.py maps tenant i to "i+1"."""
    return tenant + 1


def expected_ids(sink: Observation, routed_tenants: int, tenant: int | None = None) -> np.ndarray:
    """Distinct ids the archive holds for the routed tenants (indices below ``routed_tenants``), or for
    ``tenant`` alone: what a backend must hold."""
    if not len(sink.ids) or sink.tenant is None:
        return np.zeros(0, np.int64)
    if tenant is not None:
        keep = sink.tenant == tenant
    else:
        keep = (sink.tenant >= 0) & (sink.tenant < routed_tenants)
    return np.unique(sink.ids[keep])


def compare(expected: np.ndarray, found: np.ndarray, describe: Callable[[int], str] = str) -> dict[str, Any]:
    """Expected vs. found (with repeats): found, missing, duplicates (extra copies), unexpected ids."""
    exp = np.unique(expected)
    ids, counts = np.unique(found, return_counts=True)
    present = np.isin(exp, ids, assume_unique=True)
    missing = exp[~present]
    extra = ids[~np.isin(ids, exp, assume_unique=True)]
    repeated, times = ids[counts > 1], counts[counts > 1]
    examples = ([f"missing {describe(int(x))}" for x in missing[:EXAMPLES]]
                + [f"{describe(int(x))} {int(n)} times" for x, n in zip(repeated[:EXAMPLES], times[:EXAMPLES],
                                                                          strict=True)]
                + [f"unexpected {describe(int(x))}" for x in extra[:EXAMPLES]])
    return {"expected": len(exp), "found": int(present.sum()), "missing": len(missing),
            "duplicates": int((times - 1).sum()), "unexpected": len(extra), "examples": examples}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-tenant comparisons summed into one."""
    out: dict[str, Any] = {k: sum(p[k] for p in parts)
                           for k in ("expected", "found", "missing", "duplicates", "unexpected")}
    out["examples"] = [e for p in parts for e in p["examples"]][:3 * EXAMPLES]
    return out


def time_slices(start_ns: int, end_ns: int, items: int, budget: int) -> list[tuple[int, int]]:
    """[start, end) cut into whole seconds, enough slices that each holds about ``budget`` items."""
    first = start_ns // 10**9
    last = max(-(-end_ns // 10**9), first + 1)
    width = math.ceil((last - first) / min(max(1, math.ceil(items / budget)), last - first))
    return [(s * 10**9, min(s + width, last) * 10**9) for s in range(first, last, width)]


def rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ReadbackError(f"{what}: out of time")
    return min(left, 120.0)


# -- tempo (Jaeger) ------------------------------------------------------------------------------------

def span_seqs(answer: Mapping[str, Any], run_tag: int, seen_traces: set[str]) -> list[int]:
    """Sequence numbers of this run's spans in a Jaeger api/v3 answer, skipping traces in
    ``seen_traces`` (read from an earlier slice); the answer's traces are added to it."""
    out: list[int] = []
    new: set[str] = set()
    for rs in answer.get("result", {}).get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                trace = span.get("traceId", "")
                if trace in seen_traces:
                    continue
                new.add(trace)
                value = int(span.get("spanId") or "0", 16)
                if value >> _SEQ_BITS == run_tag:
                    out.append(value & ((1 << _SEQ_BITS) - 1))
    seen_traces |= new
    return out


def read_jaeger(url: str, window: tuple[int, int], run_tag: int, max_traces: int, expected: int,
                deadline: float) -> np.ndarray:
    """Span sequence numbers (with repeats) of every trace with a span starting within ``window``."""
    seen: set[str] = set()
    found: list[int] = []
    for start, end in time_slices(*window, expected, budget=20_000):
        params = {"query.start_time_min": rfc3339(start), "query.start_time_max": rfc3339(end),
                  "query.num_traces": str(max_traces), "query.raw_traces": "true"}
        status, body = http_request(f"{url}/api/v3/traces", params=params,
                                    timeout=_left(deadline, "tempo"))
        if status == 404:  # Jaeger's "No traces found"
            continue
        if status != 200:
            raise ReadbackError(f"Jaeger find traces answered {status}: {body[:300]!r}")
        found += span_seqs(json.loads(body), run_tag, seen)
    return np.asarray(found, dtype=np.int64)


# -- loki (VictoriaLogs) -------------------------------------------------------------------------------

def log_ids(body: bytes) -> np.ndarray:
    """The ID field of every entry in a VictoriaLogs answer (JSON lines); entries without one are skipped."""
    out = []
    for line in body.splitlines():
        if line.strip():
            value = json.loads(line).get(LOG_ID_FIELD)
            if value not in (None, ""):
                out.append(int(value))
    return np.asarray(out, dtype=np.int64)


def read_victorialogs(url: str, account: int, window: tuple[int, int], expected: int,
                      deadline: float) -> np.ndarray:
    """Log ids (with repeats) in one AccountID whose time is within ``window``."""
    status, body = http_request(f"{url}/internal/force_flush", timeout=_left(deadline, "loki"))
    if status != 200:
        raise ReadbackError(f"VictoriaLogs force_flush answered {status}: {body[:300]!r}")
    parts = []
    for start, end in time_slices(*window, expected, budget=200_000):
        query = f"_time:[{rfc3339(start)}, {rfc3339(end)}) {LOG_ID_FIELD}:* | fields {LOG_ID_FIELD}"
        status, body = http_request(
            f"{url}/select/logsql/query", method="POST", data=urlencode({"query": query}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "AccountID": str(account),
                     "ProjectID": "0"}, timeout=_left(deadline, "loki"))
        if status != 200:
            raise ReadbackError(f"VictoriaLogs query answered {status}: {body[:300]!r}")
        parts.append(log_ids(body))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# -- prometheus ----------------------------------------------------------------------------------------

def metric_keys(result: list[Mapping[str, Any]], series_count: int) -> np.ndarray:
    """Metric item keys (``time_ms * series_count + series``) of every sample in a range-vector result."""
    out: list[int] = []
    for entry in result:
        series = entry.get("metric", {}).get(SERIES_LABEL)
        if series is None:
            continue
        s = int(series)
        out += [round(float(ts) * 1000) * series_count + s for ts, _ in entry.get("values", [])]
    return np.asarray(out, dtype=np.int64)


def read_prometheus(url: str, keys: np.ndarray, series_count: int, deadline: float) -> np.ndarray:
    """Distinct keys of every sample of the generator's metrics between the first and last expected."""
    times = keys // series_count
    selector = '{__name__=~"' + "|".join(PROMETHEUS_NAMES) + '"}'
    parts = []
    for start, end in time_slices(int(times.min()) * 10**6, int(times.max()) * 10**6 + 1, len(keys),
                                  budget=200_000):
        # Prometheus 2 selects [at - range, at], both ends included: slices overlap by their edge.
        params = {"query": f"{selector}[{(end - start) // 10**9}s]", "time": str(end // 10**9)}
        status, body = http_request(f"{url}/api/v1/query", params=params,
                                    timeout=_left(deadline, "prometheus"))
        answer = json.loads(body) if body[:1] == b"{" else {}
        if status != 200 or answer.get("status") != "success":
            raise ReadbackError(f"Prometheus query answered {status}: {body[:300]!r}")
        parts.append(metric_keys(answer["data"]["result"], series_count))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


# -- the run -------------------------------------------------------------------------------------------

def _window(ledger: Ledger, signal: str) -> tuple[int, int]:
    scheduled = ledger[signal].np("scheduled_ns")
    return int(scheduled.min()) - MARGIN_NS, int(scheduled.max()) + MARGIN_NS


def read_backend(name: str, server: Any, sink: Observation, ledger: Ledger, routed_tenants: int,
                 timeout_s: float) -> dict[str, Any]:
    """The comparison for one backend; ``server`` is its loadtest.servers process (URLs, limits)."""
    deadline = time.monotonic() + timeout_s
    signal = SIGNAL_OF[name]
    expected = expected_ids(sink, routed_tenants)
    if name == "tempo":
        found = read_jaeger(server.query_url, _window(ledger, signal), ledger.run_tag, server.max_traces,
                            len(expected), deadline)
        result = compare(expected, found, lambda seq: f"span {seq}")
        ours = expected[expected < ledger[signal].items]
        traces = len(np.unique(ledger[signal].np("trace")[ours]))
        if traces > server.max_traces:
            result["note"] = (f"Jaeger's memory store keeps the newest {server.max_traces:,} traces; "
                              f"{traces:,} were expected")
        return result
    if name == "prometheus":
        series = ledger.series
        found = read_prometheus(server.url, expected, series, deadline) if len(expected) else expected
        return compare(expected, found, lambda key: f"series {key % series} @ {key // series} ms")
    parts = []
    window = _window(ledger, signal)
    for tenant in range(routed_tenants):
        mine = expected_ids(sink, routed_tenants, tenant)
        found = read_victorialogs(server.url, account_of(tenant), window, len(mine), deadline)
        parts.append(compare(mine, found, lambda i, t=ledger.tenants[tenant]: f"log {i} ({t})"))
    return merge(parts)


def read_back(servers: Mapping[str, Any], stages: Mapping[str, Mapping[str, Observation]], ledger: Ledger,
              routed_tenants: int, timeout_s: float = 300.0) -> dict[str, dict[str, dict[str, Any]]]:
    """signal -> backend -> comparison, for every backend of the run whose signal was offered; a backend
    that cannot be read back gets ``{"error": why}`` instead."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, server in servers.items():
        signal = SIGNAL_OF[name]
        if ledger[signal].items == 0 or signal not in stages:
            continue
        try:
            result = read_backend(name, server, stages[signal]["sink"], ledger, routed_tenants, timeout_s)
        except Exception as exc:  # any failure is the run's problem line, never a crash
            result = {"error": f"{type(exc).__name__}: {exc}"}
        out.setdefault(signal, {})[name] = result
    return out
