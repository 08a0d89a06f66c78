"""kotel's degradation (seed §3.1): what the agent gives up while it is above its high-water mark.

The backpressure controller flips ``active``; while it is off, ``process`` returns requests untouched.
While on:
- traces are sampled at ``sampling_percentage`` by the probabilistic sampler's own consistent trace-id hash.
  With the sampler's ``hash_seed`` the two compose: a trace kept at 10% is one the 50% sampler also kept,
  so degrading from 50% to 10% keeps 10% of traces (not 5%), each one whole across agents;
- log records below ``drop_log_severity_below`` are dropped; a record without a severity number is judged
  by its severity text (``DEBUG``, ``warning``, ...) and kept when that says nothing;
- histograms keep at most ``histogram_max_buckets`` buckets: adjacent explicit buckets are merged in equal
  runs decided by the bucket layout alone, so every point of a series keeps the same bounds and ``count``,
  ``sum``, ``min`` and ``max`` stay exact; exponential histograms are downscaled (each step halves the
  resolution) until each of their ranges fits.
Dropped spans and log records are counted with reason ``degraded``.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.message import Message
from opentelemetry.proto.metrics.v1 import metrics_pb2

from agents.processors.filter import count_dropped, prune, remove_indices
from agents.processors.sampler import NUM_BUCKETS, drop_unkept, item_lists, keep_by_trace_id, scaled_rate
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal
from kotel.topology.exporters import DegradeConfig

# First severity number of each level (OTLP SeverityNumber: TRACE 1-4, DEBUG 5-8, INFO 9-12, ...).
SEVERITY_FLOOR = {"": 0, "TRACE": 1, "DEBUG": 5, "INFO": 9, "WARN": 13, "ERROR": 17, "FATAL": 21}
_TEXT_LEVELS = {
    "TRACE": 1, "DEBUG": 5, "INFO": 9, "INFORMATION": 9, "NOTICE": 9, "WARN": 13, "WARNING": 13,
    "ERROR": 17, "ERR": 17, "FATAL": 21, "CRITICAL": 21, "CRIT": 21, "ALERT": 21, "EMERGENCY": 21,
    "PANIC": 21,
}  # fmt: skip
_LEVEL_WORD = re.compile(r"[A-Za-z]+")
_MIN_SCALE = -10  # the smallest exponential-histogram scale OTLP defines


def text_severity(text: str) -> int:
    """The severity number a severity text implies (``warn``, ``DEBUG2``...); 0 when it names no level."""
    word = _LEVEL_WORD.match(text.strip())
    return _TEXT_LEVELS.get(word.group().upper(), 0) if word else 0


def merge_explicit_buckets(point: metrics_pb2.HistogramDataPoint, max_buckets: int) -> bool:
    """Merge adjacent buckets into at most ``max_buckets`` runs of near-equal length; False if untouched."""
    counts, bounds = point.bucket_counts, point.explicit_bounds
    size = len(counts)
    if max_buckets <= 0 or size <= max_buckets or len(bounds) != size - 1:
        return False
    edges = [i * size // max_buckets for i in range(max_buckets + 1)]
    new_counts = [sum(counts[edges[i]:edges[i + 1]]) for i in range(max_buckets)]
    new_bounds = [bounds[edges[i + 1] - 1] for i in range(max_buckets - 1)]  # each run's upper bound
    del counts[:]
    counts.extend(new_counts)
    del bounds[:]
    bounds.extend(new_bounds)
    return True


def _downscaled_length(buckets: Any, shift: int) -> int:
    if not len(buckets.bucket_counts):
        return 0
    last = buckets.offset + len(buckets.bucket_counts) - 1
    return (last >> shift) - (buckets.offset >> shift) + 1


def _downscale(buckets: Any, shift: int) -> None:
    if not len(buckets.bucket_counts):
        return
    start = buckets.offset >> shift
    merged = [0] * _downscaled_length(buckets, shift)
    for i, count in enumerate(buckets.bucket_counts):
        merged[((buckets.offset + i) >> shift) - start] += count  # >> floors, as bucket indices need
    buckets.offset = start
    del buckets.bucket_counts[:]
    buckets.bucket_counts.extend(merged)


def downscale_exponential(point: metrics_pb2.ExponentialHistogramDataPoint, max_buckets: int) -> bool:
    """Lower the scale until the positive and the negative range each have at most ``max_buckets``."""
    if max_buckets <= 0:
        return False
    shift = 0
    while point.scale - shift > _MIN_SCALE and max(
        _downscaled_length(point.positive, shift), _downscaled_length(point.negative, shift)
    ) > max_buckets:
        shift += 1
    if not shift:
        return False
    _downscale(point.positive, shift)
    _downscale(point.negative, shift)
    point.scale -= shift
    return True


class DegradeProcessor:
    def __init__(
        self,
        config: DegradeConfig,
        metrics: AgentMetrics,
        name: str = "degrade",
        hash_seed: int = 0,
        active: bool = False,
    ) -> None:
        self.name = name
        self.active = active
        self._metrics = metrics
        self._seed = hash_seed
        self._rate = scaled_rate(config.sampling_percentage)
        self._severity_floor = SEVERITY_FLOOR[config.drop_log_severity_below]
        self._max_buckets = config.histogram_max_buckets

    def set_active(self, active: bool) -> None:
        """Called by the backpressure controller when crossing the high-water mark, either way."""
        self.active = active

    def process(self, signal: Signal, request: Message) -> Message | None:
        if not self.active:
            return request
        if signal is Signal.METRICS:
            self._cut_histograms(request)
            return request
        if signal is Signal.TRACES:
            if self._rate >= NUM_BUCKETS:
                return request
            lists = item_lists(signal, request)
            dropped = drop_unkept(lists, keep_by_trace_id(lists, self._seed, self._rate))
        else:
            if not self._severity_floor:
                return request
            dropped = self._drop_low_severity(request)
        if not dropped:
            return request
        count_dropped(self._metrics, signal, "degraded", dropped)
        return prune(signal, request)

    def _drop_low_severity(self, request: Message) -> int:
        floor, dropped = self._severity_floor, 0
        for records in item_lists(Signal.LOGS, request):
            low = [i for i, r in enumerate(records)
                   if 0 < (r.severity_number or text_severity(r.severity_text)) < floor]  # fmt: skip
            remove_indices(records, low)
            dropped += len(low)
        return dropped

    def _cut_histograms(self, request: Message) -> None:
        limit = self._max_buckets
        if limit <= 0:
            return
        for entry in request.resource_metrics:
            for scope_entry in entry.scope_metrics:
                for metric in scope_entry.metrics:
                    kind = metric.WhichOneof("data")
                    if kind == "histogram":
                        for point in metric.histogram.data_points:
                            merge_explicit_buckets(point, limit)
                    elif kind == "exponential_histogram":
                        for point in metric.exponential_histogram.data_points:
                            downscale_exponential(point, limit)
