"""Tail sampling's decision engine: the topology's policies compiled once, then one decision per trace.

Pure and synchronous (no Kafka, Faust or RocksDB): the stage hands over every buffered span of a trace
and gets back whether to keep it and which policy decided. The rules are the Collector's
``tailsamplingprocessor``:

- drop policies run first, and the first that answers DROPPED ends the evaluation: the trace is dropped;
- otherwise every policy is evaluated; an inverted not-sampled answer excludes the trace, then any
  SAMPLED keeps it, then an inverted sampled answer keeps it unless some policy said NOT_SAMPLED;
- a policy that fails to evaluate is counted in ``evaluation_errors`` and ignored.

To decide fast, a stateless policy is skipped once the outcome can no longer change; stateful ones
(rate limiting, composite) always run so their budgets move exactly as the Collector's would.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from kotel.topology.tail_sampling import Policy, TailSamplingConfig
from streams.stages.tail_policy_leaves import (
    DROPPED,
    INVERT_NOT_SAMPLED,
    INVERT_SAMPLED,
    NOT_SAMPLED,
    SAMPLED,
    AlwaysSample,
    BooleanAttribute,
    Clock,
    Decision,
    Evaluator,
    Latency,
    NumericAttribute,
    OttlCondition,
    PolicyError,
    Probabilistic,
    RateLimiting,
    SpanCount,
    StatusCode,
    StringAttribute,
    TraceData,
    TraceState,
)

__all__ = ["Decision", "PolicyError", "TailSampler", "TraceData", "TraceDecision", "build_evaluator"]

log = logging.getLogger(__name__)


class TraceDecision(NamedTuple):
    sampled: bool
    policy: str  # the first sampling policy when sampled; the drop/inverted policy when excluded; or ""


class And(Evaluator):
    """SAMPLED when every sub-policy samples; stops at the first that does not (as the Collector)."""

    __slots__ = ("_subs", "stateful")
    ALL_MATCH: Decision = SAMPLED

    def __init__(self, subs: Sequence[Evaluator]) -> None:
        self._subs = tuple(subs)
        self.stateful = any(s.stateful for s in subs)

    def evaluate(self, trace: TraceData) -> Decision:
        for sub in self._subs:
            decision = sub.evaluate(trace)
            if decision is NOT_SAMPLED or decision is INVERT_NOT_SAMPLED:
                return NOT_SAMPLED
        return self.ALL_MATCH


class Drop(And):
    """DROPPED when every sub-policy matches (samples); NOT_SAMPLED as soon as one does not."""

    __slots__ = ()
    ALL_MATCH: Decision = DROPPED


class _Budget:
    __slots__ = ("allocated", "evaluator", "name", "used")

    def __init__(self, name: str, evaluator: Evaluator, allocated: int) -> None:
        self.name, self.evaluator, self.allocated, self.used = name, evaluator, allocated, 0


class Composite(Evaluator):
    """Sub-policies in ``policy_order`` (then the rest as configured), each with a spans-per-second budget.

    The first sub-policy that samples decides: the trace is kept if its spans fit that sub-policy's budget
    for the current clock second (and the composite's total); otherwise it is not sampled and later
    sub-policies are not asked, the Collector's rule (budget left over by one sub-policy never flows to
    another). A budget is ``percent`` of ``max_total_spans_per_second``; a sub-policy with no allocation,
    or percent 0, gets an equal share (total / number of sub-policies), as the Collector does since #49857.
    """

    __slots__ = ("_budgets", "_clock", "_max_total", "_second", "_total")
    stateful = True

    def __init__(self, policy: Policy, clock: Clock) -> None:
        total = policy.max_total_spans_per_second
        percents = {str(a.get("policy")): a.get("percent") or 0 for a in policy.rate_allocation}
        by_name = {sub.name: sub for sub in policy.sub_policies}
        order = list(dict.fromkeys([*policy.policy_order, *by_name]))
        share = int(total / len(by_name)) if by_name else 0
        self._budgets = tuple(
            _Budget(name, build_evaluator(by_name[name], clock),
                    int(percents[name] / 100 * total) if percents.get(name, 0) > 0 else share)
            for name in order
        )  # fmt: skip
        self._max_total, self._clock = total, clock
        self._second, self._total = -1, 0

    def evaluate(self, trace: TraceData) -> Decision:
        second = math.floor(self._clock())
        if second != self._second:
            self._second, self._total = second, 0
            for budget in self._budgets:
                budget.used = 0
        for budget in self._budgets:
            decision = budget.evaluator.evaluate(trace)
            if decision is SAMPLED or decision is INVERT_SAMPLED:
                spans = trace.span_count
                if budget.used + spans <= budget.allocated and self._total + spans <= self._max_total:
                    budget.used += spans
                    self._total += spans
                    return SAMPLED
                return NOT_SAMPLED
        return NOT_SAMPLED


_LEAVES: dict[str, Callable[[Any, Clock], Evaluator]] = {
    "always_sample": lambda o, c: AlwaysSample(),
    "latency": lambda o, c: Latency(o.threshold_ms, o.upper_threshold_ms),
    "status_code": lambda o, c: StatusCode(o.status_codes),
    "probabilistic": lambda o, c: Probabilistic(o.hash_salt, o.sampling_percentage),
    "string_attribute": lambda o, c: StringAttribute(
        o.key, o.values, o.enabled_regex_matching, o.cache_max_size, o.invert_match
    ),
    "numeric_attribute": lambda o, c: NumericAttribute(o.key, o.min_value, o.max_value, o.invert_match),
    "boolean_attribute": lambda o, c: BooleanAttribute(o.key, o.value, o.invert_match),
    "span_count": lambda o, c: SpanCount(o.min_spans, o.max_spans),
    "trace_state": lambda o, c: TraceState(o.key, o.values),
    "rate_limiting": lambda o, c: RateLimiting(o.spans_per_second, c),
    "ottl_condition": lambda o, c: OttlCondition.compile(o.span, o.error_mode),
}


def build_evaluator(policy: Policy, clock: Clock) -> Evaluator:
    """One validated policy (leaf or nested) as its evaluator; all compilation happens here."""
    if policy.type == "and":
        return And([build_evaluator(sub, clock) for sub in policy.sub_policies])
    if policy.type == "drop":
        return Drop([build_evaluator(sub, clock) for sub in policy.sub_policies])
    if policy.type == "composite":
        return Composite(policy, clock)
    return _LEAVES[policy.type](policy.options, clock)


class _Step(NamedTuple):
    name: str
    evaluator: Evaluator
    stateful: bool
    inverts_later: bool  # a later policy may still answer INVERT_NOT_SAMPLED


class TailSampler:
    """Decides traces with the topology's ``tail_sampling`` policies; not thread-safe (one per worker)."""

    def __init__(self, config: TailSamplingConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._names = tuple(p.name for p in config.policies)
        built = [(p, build_evaluator(p, clock)) for p in config.policies]
        self._drops = tuple((p.name, e) for p, e in built if p.type == "drop")
        rest = [(p.name, e) for p, e in built if p.type != "drop"]
        self._steps = tuple(
            _Step(name, e, e.stateful, any(later.inverts for _, later in rest[i + 1:]))
            for i, (name, e) in enumerate(rest)
        )  # fmt: skip
        self._errors: dict[str, int] = {}

    @property
    def policy_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def evaluation_errors(self) -> Mapping[str, int]:
        """Failed evaluations per policy name since start (a failed policy is left out of the decision)."""
        return self._errors

    def decide(self, trace_id: bytes, trace: Sequence[ResourceSpans] | TraceData) -> TraceDecision:
        data = trace if isinstance(trace, TraceData) else TraceData(trace_id, trace)
        for name, evaluator in self._drops:
            try:
                if evaluator.evaluate(data) is DROPPED:
                    return TraceDecision(False, name)
            except Exception as exc:
                self._failed(name, exc)
        sampled_by = inverted_by = excluded_by = ""
        said_no = settled = False
        for name, evaluator, stateful, inverts_later in self._steps:
            if settled and not stateful:
                continue
            try:
                decision = evaluator.evaluate(data)
            except Exception as exc:
                self._failed(name, exc)
                continue
            if decision is SAMPLED:
                sampled_by = sampled_by or name
            elif decision is NOT_SAMPLED:
                said_no = True
            elif decision is INVERT_NOT_SAMPLED:
                excluded_by = excluded_by or name
            elif decision is INVERT_SAMPLED:
                inverted_by = inverted_by or name
            settled = bool(excluded_by) or (bool(sampled_by) and not inverts_later)
        if excluded_by:
            return TraceDecision(False, excluded_by)
        if sampled_by:
            return TraceDecision(True, sampled_by)
        if inverted_by and not said_no:
            return TraceDecision(True, inverted_by)
        return TraceDecision(False, "")

    def _failed(self, name: str, exc: Exception) -> None:
        count = self._errors.get(name, 0) + 1
        self._errors[name] = count
        if count == 1 or count % 10_000 == 0:  # enough to see it in the log without flooding it
            log.warning("tail sampling policy %r failed (%d so far): %s", name, count, exc)
