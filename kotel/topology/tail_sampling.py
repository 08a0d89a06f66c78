"""The Collector's ``tail_sampling`` processor: option names, defaults and policy shapes."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kotel.topology.base import Model, Percentage
from kotel.topology.components import prefixed
from kotel.topology.durations import Duration


class LatencyPolicy(Model):
    threshold_ms: int = Field(0, ge=0)
    upper_threshold_ms: int = Field(0, ge=0)


class StatusCodePolicy(Model):
    status_codes: list[Literal["OK", "ERROR", "UNSET"]] = Field(min_length=1)


class ProbabilisticPolicy(Model):
    hash_salt: str = ""
    sampling_percentage: Percentage = 0


class StringAttributePolicy(Model):
    key: str = Field(min_length=1)
    values: list[str] = Field(min_length=1)
    enabled_regex_matching: bool = False
    cache_max_size: int = Field(0, ge=0)
    invert_match: bool = False

    @model_validator(mode="after")
    def _regexes(self) -> StringAttributePolicy:
        if self.enabled_regex_matching:
            for position, value in enumerate(self.values):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"values[{position}] is not a valid regular expression: {exc}") from None
        return self


class NumericAttributePolicy(Model):
    key: str = Field(min_length=1)
    min_value: int | None = None
    max_value: int | None = None
    invert_match: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> NumericAttributePolicy:
        if self.min_value is None and self.max_value is None:
            raise ValueError("set min_value, max_value or both")
        return self


class BooleanAttributePolicy(Model):
    key: str = Field(min_length=1)
    value: bool
    invert_match: bool = False


class SpanCountPolicy(Model):
    min_spans: int = Field(0, ge=0)
    max_spans: int = Field(0, ge=0)


class TraceStatePolicy(Model):
    key: str = Field(min_length=1)
    values: list[str] = Field(min_length=1)


class RateLimitingPolicy(Model):
    spans_per_second: int = Field(gt=0)


class OttlConditionPolicy(Model):
    error_mode: Literal["ignore", "silent", "propagate"] = "propagate"
    span: list[str] = []
    spanevent: list[str] = []

    @model_validator(mode="after")
    def _compile(self) -> OttlConditionPolicy:
        from kotel.ottl import compile_condition

        if not self.span and not self.spanevent:
            raise ValueError("give at least one condition under span")
        if self.spanevent:
            raise ValueError("spanevent conditions are not supported yet; use span conditions")
        for text in self.span:
            compile_condition(text, "span")
        return self


_LEAF_TYPES: dict[str, type[Model] | None] = {
    "always_sample": None,
    "latency": LatencyPolicy,
    "status_code": StatusCodePolicy,
    "probabilistic": ProbabilisticPolicy,
    "string_attribute": StringAttributePolicy,
    "numeric_attribute": NumericAttributePolicy,
    "boolean_attribute": BooleanAttributePolicy,
    "span_count": SpanCountPolicy,
    "trace_state": TraceStatePolicy,
    "rate_limiting": RateLimitingPolicy,
    "ottl_condition": OttlConditionPolicy,
}
_NESTED = {"and": "and_sub_policy", "drop": "drop_sub_policy", "composite": "composite_sub_policy"}
POLICY_TYPES = sorted([*_LEAF_TYPES, *_NESTED])


class Policy(Model):
    """One named policy; its options sit under a key named after its type, as in the Collector."""

    name: str = Field(min_length=1)
    type: str
    options: Any = None
    sub_policies: list[Policy] = []
    max_total_spans_per_second: int = 0
    policy_order: list[str] = []
    rate_allocation: list[dict[str, Any]] = []

    @model_validator(mode="before")
    @classmethod
    def _lift_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        ptype = data.get("type")
        if ptype not in _LEAF_TYPES and ptype not in _NESTED:
            raise ValueError(f"unknown policy type {ptype!r}; expected one of: {', '.join(POLICY_TYPES)}")
        block = data.pop(ptype, None)
        for other in POLICY_TYPES:
            if other in data and other != ptype:
                raise ValueError(
                    f"policy of type {ptype!r} has a {other!r} block; did you mean type: {other}?"
                )
        if ptype in _NESTED:
            block = dict(block or {})
            subs = block.pop(_NESTED[ptype], None)
            if not subs:
                raise ValueError(f"policy of type {ptype!r} needs {ptype}.{_NESTED[ptype]} with sub-policies")
            data["sub_policies"] = subs
            for key in ("max_total_spans_per_second", "policy_order", "rate_allocation"):
                if key in block:
                    if ptype != "composite":
                        raise ValueError(f"{key} belongs to a composite policy, not to {ptype!r}")
                    data[key] = block.pop(key)
            if block:
                raise ValueError(f"unknown keys in the {ptype} block: {', '.join(sorted(block))}")
        else:
            model = _LEAF_TYPES[ptype]
            if model is None:
                if block:
                    raise ValueError(f"policy type {ptype!r} takes no options")
            elif block is None:
                raise ValueError(f"policy of type {ptype!r} needs a {ptype!r} block with its options")
            else:
                try:
                    data["options"] = model.model_validate(block)
                except ValidationError as exc:
                    raise ValidationError.from_exception_data("policy", prefixed(exc, (ptype,))) from None
        return data

    @field_validator("sub_policies")
    @classmethod
    def _flat_subs(cls, subs: list[Policy]) -> list[Policy]:
        for sub in subs:
            if sub.type in _NESTED:
                raise ValueError(f"sub-policy {sub.name!r}: a {sub.type!r} policy cannot be nested")
        return subs

    @model_validator(mode="after")
    def _composite_refs(self) -> Policy:
        if self.type == "composite":
            names = {s.name for s in self.sub_policies}
            for position, entry in enumerate(self.rate_allocation):
                percent = entry.get("percent", 0)
                if set(entry) - {"policy", "percent"} or "policy" not in entry:
                    raise ValueError(f"rate_allocation[{position}] takes a policy and a percent, no more")
                number = isinstance(percent, int | float) and not isinstance(percent, bool)
                if not number or not 0 <= percent <= 100:
                    raise ValueError(f"rate_allocation[{position}].percent must be a number from 0 to 100")
            for ref in self.policy_order + [str(a.get("policy")) for a in self.rate_allocation]:
                if ref not in names:
                    raise ValueError(f"composite refers to sub-policy {ref!r}, which is not defined")
        return self


class DecisionCacheConfig(Model):
    sampled_cache_size: int = Field(100_000, ge=0)
    non_sampled_cache_size: int = Field(100_000, ge=0)


class TailSamplingConfig(Model):
    decision_wait: Duration = timedelta(seconds=30)
    decision_wait_after_root_received: Duration = timedelta(0)
    num_traces: int = Field(50_000, gt=0)
    expected_new_traces_per_sec: int = Field(0, ge=0)
    decision_cache: DecisionCacheConfig = DecisionCacheConfig()
    # kotel limits: a giant trace is decided early rather than starving the rest.
    max_spans_per_trace: int = Field(10_000, gt=0)
    max_bytes_per_trace: int = Field(16 * 1024 * 1024, gt=0)
    policies: list[Policy] = Field(min_length=1)

    @field_validator("policies")
    @classmethod
    def _unique(cls, policies: list[Policy]) -> list[Policy]:
        names = [p.name for p in policies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"policy names must be unique; repeated: {', '.join(dupes)}")
        return policies
