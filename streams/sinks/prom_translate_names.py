"""OTLP names and values as Prometheus names and label values.

Follows the OpenTelemetry "Prometheus and OpenMetrics Compatibility" spec and the Collector's
translator (pkg/translator/prometheus): names split into words on any character Prometheus forbids,
UCUM units spelled out as a suffix unless a word of the name already says it, `_total` for counters,
`_ratio` for gauges of unit "1". Label names: invalid characters become `_` and runs of `_` collapse
(the spec), a leading digit gets `key_` and a leading `_` gets `key` (the Collector), so an attribute can
never produce a reserved `__` label. Attribute values become text per the OTel attribute spec: strings
as they are, booleans lower case, numbers in plain notation, bytes as base64, lists and maps as JSON.
Loki's structured metadata uses the same label names and texts.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from collections.abc import Iterable
from decimal import Decimal
from enum import Enum
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


class Kind(Enum):
    """What a metric becomes in Prometheus; it decides the type suffixes."""

    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    SUMMARY = "summary"


# UCUM (as OpenTelemetry semantic conventions use it) -> Prometheus base-unit words.
_UNITS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tibibytes",
    "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams",
    "Cel": "celsius", "Hz": "hertz", "%": "percent", "1": "",
}  # fmt: skip
_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}

_ANNOTATION = re.compile(r"\{[^}]*\}")
_NOT_WORD = re.compile(r"[^A-Za-z0-9]+")
_NAME_SEPARATORS = re.compile(r"[^A-Za-z0-9:]+")
_INVALID_NAME = re.compile(r"[^A-Za-z0-9_:]")
_INVALID_LABEL = re.compile(r"[^A-Za-z0-9_]")
_UNDERSCORES = re.compile(r"__+")


def _unit_word(text: str, table: dict[str, str]) -> str:
    text = text.strip()
    return _NOT_WORD.sub("_", table.get(text, text)).strip("_")


@functools.lru_cache(maxsize=1024)
def unit_words(unit: str) -> tuple[str, str]:
    """(main, per) unit words, e.g. "By/s" -> ("bytes", "second"); `{...}` annotations are dropped."""
    main, _, per = _ANNOTATION.sub("", unit).partition("/")
    return _unit_word(main, _UNITS), _unit_word(per, _PER_UNITS)


def prometheus_unit(unit: str) -> str:
    """The unit as metadata shows it: "bytes_per_second", "per_second", "" for dimensionless."""
    main, per = unit_words(unit)
    return "_".join(filter(None, (main, f"per_{per}" if per else "")))


@functools.lru_cache(maxsize=8192)
def metric_name(name: str, unit: str, kind: Kind, namespace: str = "", add_suffixes: bool = True) -> str:
    """The Prometheus family name (type suffixes such as `_bucket` are added by the caller)."""
    if not add_suffixes:
        words = [name]
    else:
        words = [w for w in _NAME_SEPARATORS.split(name) if w]
        main, per = unit_words(unit)
        if main and main not in words:
            words.append(main)
        if per and per not in words:
            words += ["per", per]
        if kind is Kind.COUNTER:
            words = [*(w for w in words if w != "total"), "total"]
        if unit == "1" and kind is Kind.GAUGE:
            words = [*(w for w in words if w != "ratio"), "ratio"]
    if namespace:
        words.insert(0, namespace)
    result = _UNDERSCORES.sub("_", _INVALID_NAME.sub("_", "_".join(words)))
    return f"_{result}" if result[:1].isdigit() else result


@functools.lru_cache(maxsize=8192)
def label_name(key: str) -> str:
    """A valid, never-reserved label name for an attribute key ("" for an empty key)."""
    name = _UNDERSCORES.sub("_", _INVALID_LABEL.sub("_", key))
    if name[:1].isdigit():
        return f"key_{name}"
    return f"key{name}" if name.startswith("_") else name


@functools.lru_cache(maxsize=4096)
def format_float(value: float) -> str:
    """Go's FormatFloat(v, 'f', -1, 64), as the Collector writes `le` and `quantile`: "0.005", "100"."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = format(Decimal(repr(value)), "f")
    return text[:-2] if text.endswith(".0") else text


def _plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind) if kind else None


def attribute_text(value: AnyValue) -> str:
    """An attribute value as text: strings as they are, bools lower case, lists and maps as JSON."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return format_float(value.double_value)
    if kind is None:
        return ""
    plain = _plain(value)
    return plain if isinstance(plain, str) else json.dumps(plain, separators=(",", ":"), ensure_ascii=False)


def sanitized_labels(attributes: Iterable[KeyValue]) -> dict[str, str]:
    """Attributes as labels; keys that sanitise alike are merged with `;` in the order of the keys."""
    pairs = sorted((kv.key, attribute_text(kv.value)) for kv in attributes)
    labels: dict[str, str] = {}
    for key, text in pairs:
        name = label_name(key)
        if not name:
            continue
        labels[name] = f"{labels[name]};{text}" if name in labels else text
    return labels
