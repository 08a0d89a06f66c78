"""The leaf policies of tail sampling, each a small evaluator over one buffered trace.

Decision rules follow the Collector's ``tailsamplingprocessor``: resource and span attributes are read as
pdata reads them (a string policy sees ``""`` and a numeric one ``0`` for a value of another type), a
policy with ``invert_match`` answers with the inverted decisions, and stateful policies (rate limiting)
read the injected clock. Everything that can be prepared from the config is prepared in ``__init__``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from enum import IntEnum
from fractions import Fraction
from functools import lru_cache
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Status

from kotel.ottl import Condition, compile_condition, compile_conditions
from streams.stages.tail_core import TraceSummary, summary_of

log = logging.getLogger(__name__)
Clock = Callable[[], float]

_STATUS_CODES = {"UNSET": Status.STATUS_CODE_UNSET, "OK": Status.STATUS_CODE_OK,
                 "ERROR": Status.STATUS_CODE_ERROR}  # fmt: skip


class Decision(IntEnum):
    NOT_SAMPLED = 0
    SAMPLED = 1
    INVERT_NOT_SAMPLED = 2  # an invert_match policy matched: excludes the trace
    INVERT_SAMPLED = 3  # an invert_match policy did not match: samples unless another policy said no
    DROPPED = 4  # a drop policy matched: wins over everything


NOT_SAMPLED, SAMPLED = Decision.NOT_SAMPLED, Decision.SAMPLED
INVERT_NOT_SAMPLED, INVERT_SAMPLED, DROPPED = (Decision.INVERT_NOT_SAMPLED, Decision.INVERT_SAMPLED,
                                               Decision.DROPPED)  # fmt: skip


class PolicyError(Exception):
    """A policy could not evaluate a trace (an OTTL condition failed with ``error_mode: propagate``)."""


class TraceData:
    """One trace as the evaluators see it: decoded resources, or its wire form and summary.

    From the wire form the resources are decoded only when a policy first asks for them (attribute and
    OTTL policies); latency, status code, span count and probabilistic answer from the summary, which
    is computed from the resources when not given.
    """

    __slots__ = ("_resources", "_summary", "_wire", "trace_id")

    def __init__(self, trace_id: bytes, resources: Sequence[ResourceSpans] | None = None, *,
                 wire: bytes = b"", summary: TraceSummary | None = None) -> None:
        self.trace_id = trace_id
        self._resources = resources
        self._wire = wire
        self._summary = summary

    @property
    def resources(self) -> Sequence[ResourceSpans]:
        if self._resources is None:
            self._resources = ExportTraceServiceRequest.FromString(self._wire).resource_spans
        return self._resources

    @property
    def summary(self) -> TraceSummary:
        if self._summary is None:
            self._summary = summary_of(self.resources)
        return self._summary

    @property
    def span_count(self) -> int:
        return self.summary.spans


class Evaluator:
    """``evaluate`` answers one Decision; ``stateful`` ones must run even when the outcome is known."""

    __slots__ = ()
    stateful: bool = False
    inverts: bool = False  # may answer INVERT_NOT_SAMPLED, which can overturn an earlier SAMPLED

    def evaluate(self, trace: TraceData) -> Decision:
        raise NotImplementedError


class AlwaysSample(Evaluator):
    __slots__ = ()

    def evaluate(self, trace: TraceData) -> Decision:
        return SAMPLED


class Latency(Evaluator):
    """Duration = latest end - earliest start over all spans, in whole milliseconds (Go's truncation).

    Only ``threshold_ms``: sampled when the duration is at least the threshold. With
    ``upper_threshold_ms``: ``threshold < d <= upper``. A zero start is unset; a trace without both ends
    lasts 0 ms.
    """

    __slots__ = ("_lower_ms", "_upper_ms")

    def __init__(self, threshold_ms: int, upper_threshold_ms: int) -> None:
        self._lower_ms, self._upper_ms = threshold_ms, upper_threshold_ms

    def evaluate(self, trace: TraceData) -> Decision:
        summary = trace.summary
        if not summary.spans:
            return NOT_SAMPLED
        first, last = summary.first_start, summary.last_end
        nanos = last - first if first and last else 0
        millis = nanos // 1_000_000 if nanos >= 0 else -(-nanos // 1_000_000)
        if not self._upper_ms:
            return SAMPLED if millis >= self._lower_ms else NOT_SAMPLED
        return SAMPLED if self._lower_ms < millis <= self._upper_ms else NOT_SAMPLED


class StatusCode(Evaluator):
    __slots__ = ("_bits",)

    def __init__(self, status_codes: Sequence[str]) -> None:
        self._bits = sum(1 << _STATUS_CODES[c] for c in frozenset(status_codes))

    def evaluate(self, trace: TraceData) -> Decision:
        return SAMPLED if trace.summary.status_codes & self._bits else NOT_SAMPLED


# --- probabilistic: the Collector's FNV-1a hash of salt + trace id against a 64-bit threshold ---------

DEFAULT_HASH_SALT = "default-hash-seed"
_FNV_OFFSET, _FNV_PRIME, _U64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def fnv1a_64(data: bytes, state: int = _FNV_OFFSET) -> int:
    """64-bit FNV-1a, resumable from ``state``; hand-written because it is 16 bytes of input per trace
    and no maintained package is worth a dependency for it."""
    for byte in data:
        state = ((state ^ byte) * _FNV_PRIME) & _U64
    return state


def sampling_threshold(ratio: float) -> int:
    """``MaxUint64 * ratio`` as Go's big.Float computes it: the exact product rounded half-even to 64
    significant bits, then truncated to an integer; this decides the exact same traces as the Collector."""
    exact = Fraction(_U64) * Fraction(ratio)
    if exact <= 0:
        return 0
    exponent = exact.numerator.bit_length() - exact.denominator.bit_length()
    if Fraction(2) ** exponent > exact:
        exponent -= 1  # now 2**exponent <= exact < 2**(exponent + 1)
    shift = exponent - 63  # scale the mantissa into [2**63, 2**64)
    mantissa = round(exact / Fraction(2) ** shift)  # Python rounds a Fraction half to even
    value = Fraction(mantissa) * Fraction(2) ** shift
    return min(int(value), _U64)


class Probabilistic(Evaluator):
    __slots__ = ("_seed", "_threshold")

    def __init__(self, hash_salt: str, sampling_percentage: float) -> None:
        self._seed = fnv1a_64((hash_salt or DEFAULT_HASH_SALT).encode())
        self._threshold = sampling_threshold(sampling_percentage / 100)

    def evaluate(self, trace: TraceData) -> Decision:
        return SAMPLED if fnv1a_64(trace.trace_id, self._seed) <= self._threshold else NOT_SAMPLED


# --- attribute policies ------------------------------------------------------------------------------


def _find(attributes: Any, key: str) -> AnyValue | None:
    for kv in attributes:
        if kv.key == key:
            return kv.value
    return None


class _AttributeFilter(Evaluator):
    """Any resource or span carrying ``key`` with a matching value; ``invert_match`` inverts the answer."""

    __slots__ = ("_key", "inverts")

    def __init__(self, key: str, invert_match: bool) -> None:
        self._key = key
        self.inverts = invert_match

    def _resource_match(self, value: AnyValue) -> bool:
        raise NotImplementedError

    def _span_match(self, value: AnyValue) -> bool:
        return self._resource_match(value)

    def evaluate(self, trace: TraceData) -> Decision:
        key, on_resource, on_span = self._key, self._resource_match, self._span_match
        found = False
        for rs in trace.resources:
            value = _find(rs.resource.attributes, key)
            if value is not None and on_resource(value):
                found = True
                break
            if _any_span_matches(rs, key, on_span):
                found = True
                break
        if self.inverts:
            return INVERT_NOT_SAMPLED if found else INVERT_SAMPLED
        return SAMPLED if found else NOT_SAMPLED


def _any_span_matches(rs: ResourceSpans, key: str, match: Callable[[AnyValue], bool]) -> bool:
    for ss in rs.scope_spans:
        for span in ss.spans:
            for kv in span.attributes:
                if kv.key == key:
                    if match(kv.value):
                        return True
                    break
    return False


class StringAttribute(_AttributeFilter):
    """Exact values, or regexes matched as Go's MatchString does (unanchored: ``re.search``), with the
    regex verdicts kept in an LRU of ``cache_max_size`` (128 by default, as in the Collector)."""

    __slots__ = ("_matches",)

    def __init__(self, key: str, values: Sequence[str], enabled_regex_matching: bool = False,
                 cache_max_size: int = 0, invert_match: bool = False) -> None:  # fmt: skip
        super().__init__(key, invert_match)
        if enabled_regex_matching:
            searches = tuple(re.compile(v).search for v in values)

            def matches(text: str) -> bool:
                return any(search(text) is not None for search in searches)

            self._matches: Callable[[str], bool] = lru_cache(maxsize=cache_max_size or 128)(matches)
        else:
            self._matches = frozenset(v for v in values if v).__contains__

    def _resource_match(self, value: AnyValue) -> bool:
        return self._matches(value.string_value)

    def _span_match(self, value: AnyValue) -> bool:
        text = value.string_value  # the Collector skips empty span values (but not resource ones)
        return bool(text) and self._matches(text)


class NumericAttribute(_AttributeFilter):
    """``min_value <= v <= max_value``; a missing bound is open. The value is read as pdata's Int()."""

    __slots__ = ("_high", "_low")

    def __init__(self, key: str, min_value: int | None, max_value: int | None,
                 invert_match: bool = False) -> None:  # fmt: skip
        super().__init__(key, invert_match)
        self._low = -(1 << 63) if min_value is None else min_value
        self._high = (1 << 63) - 1 if max_value is None else max_value

    def _resource_match(self, value: AnyValue) -> bool:
        return self._low <= value.int_value <= self._high


class BooleanAttribute(_AttributeFilter):
    __slots__ = ("_value",)

    def __init__(self, key: str, value: bool, invert_match: bool = False) -> None:
        super().__init__(key, invert_match)
        self._value = value

    def _resource_match(self, value: AnyValue) -> bool:
        return value.bool_value is self._value


class SpanCount(Evaluator):
    """``min_spans <= count``, and ``count <= max_spans`` unless max_spans is 0 (no upper bound)."""

    __slots__ = ("_high", "_low")

    def __init__(self, min_spans: int, max_spans: int) -> None:
        self._low, self._high = min_spans, max_spans

    def evaluate(self, trace: TraceData) -> Decision:
        count = trace.span_count
        if count >= self._low and (not self._high or count <= self._high):
            return SAMPLED
        return NOT_SAMPLED


# W3C trace-context level 1: a tracestate that breaks these rules is ignored whole, as Go's parser does.
_TS_KEY = re.compile(r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}")
_TS_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TS_MAX_MEMBERS = 32


def tracestate_value(raw: str, key: str) -> str | None:
    """The value of ``key`` in a W3C tracestate header, or None when absent or the header is invalid."""
    found: str | None = None
    seen: set[str] = set()
    for member in raw.split(","):
        if not member:
            continue
        name, sep, value = member.partition("=")
        name, value = name.lstrip(" \t"), value.rstrip(" \t")
        if not sep or name in seen or not _TS_KEY.fullmatch(name) or not _TS_VALUE.fullmatch(value):
            return None
        seen.add(name)
        if len(seen) > _TS_MAX_MEMBERS:
            return None
        if name == key:
            found = value
    return found


class TraceState(Evaluator):
    __slots__ = ("_key", "_needle", "_values")

    def __init__(self, key: str, values: Sequence[str]) -> None:
        self._key, self._needle = key, key + "="
        # A member may not exceed 256 characters, so longer values can never match (as the Collector).
        self._values = frozenset(v for v in values if v and len(key) + len(v) < 256)

    def evaluate(self, trace: TraceData) -> Decision:
        key, needle, values = self._key, self._needle, self._values
        for rs in trace.resources:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    raw = span.trace_state
                    if needle in raw and tracestate_value(raw, key) in values:
                        return SAMPLED
        return NOT_SAMPLED


class RateLimiting(Evaluator):
    """A token bucket as the Collector's (golang.org/x/time/rate): it refills at ``spans_per_second``,
    holds at most twice that, starts full, and a trace passes only if all its spans fit."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")
    stateful = True

    def __init__(self, spans_per_second: int, clock: Clock) -> None:
        self._rate = float(spans_per_second)
        self._burst = 2 * spans_per_second
        self._tokens = float(self._burst)
        self._last: float | None = None
        self._clock = clock

    def evaluate(self, trace: TraceData) -> Decision:
        wanted = trace.span_count
        now, tokens = self._clock(), self._tokens
        if self._last is not None and now > self._last:
            tokens = min(float(self._burst), tokens + (now - self._last) * self._rate)
        if wanted > self._burst or tokens < wanted:
            return NOT_SAMPLED  # nothing is consumed, as AllowN leaves the bucket alone on refusal
        self._tokens, self._last = tokens - wanted, now
        return SAMPLED


class OttlCondition(Evaluator):
    """Sampled when any condition holds for any span. All conditions run as one compiled OR; only when
    that raises are they retried one by one, to apply ``error_mode`` to the failing condition."""

    __slots__ = ("_any", "_mode", "_rules")

    def __init__(self, rules: Sequence[tuple[str, Condition]], any_of: Condition, error_mode: str) -> None:
        self._rules, self._any, self._mode = tuple(rules), any_of, error_mode

    @classmethod
    def compile(cls, texts: Sequence[str], error_mode: str) -> OttlCondition:
        rules = [(text, compile_condition(text, "span")) for text in texts]
        return cls(rules, compile_conditions(texts, "span"), error_mode)

    def evaluate(self, trace: TraceData) -> Decision:
        test = self._any
        try:
            for rs in trace.resources:
                resource = rs.resource
                for ss in rs.scope_spans:
                    scope = ss.scope
                    for span in ss.spans:
                        if test(span, scope, resource):
                            return SAMPLED
        except Exception:
            return self._one_by_one(trace)
        return NOT_SAMPLED

    def _one_by_one(self, trace: TraceData) -> Decision:
        for rs in trace.resources:
            resource = rs.resource
            for ss in rs.scope_spans:
                scope = ss.scope
                for span in ss.spans:
                    for text, test in self._rules:
                        try:
                            if test(span, scope, resource):
                                return SAMPLED
                        except Exception as exc:
                            message = f"OTTL condition {text!r} failed: {type(exc).__name__}: {exc}"
                            if self._mode == "propagate":
                                raise PolicyError(message) from exc
                            if self._mode == "ignore":
                                log.warning("%s; it counts as false (error_mode: ignore)", message)
        return NOT_SAMPLED
