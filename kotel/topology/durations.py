"""Go-style durations (``200ms``, ``10s``, ``1m30s``), as the OpenTelemetry Collector writes them."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_EXPECTED = "expected a duration like 200ms, 10s or 1m30s"


def parse_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    if isinstance(value, int | float):
        # A bare number is ambiguous (the Collector reads nanoseconds); only 0 is unambiguous.
        if value == 0:
            return timedelta(0)
        raise ValueError(f"{_EXPECTED}, got the bare number {value!r} (add a unit)")
    text = value.strip()
    if text == "0":
        return timedelta(0)
    pos, seconds = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    total_ms = round(value.total_seconds() * 1000)
    if total_ms % 1000:
        return f"{total_ms}ms"
    return f"{total_ms // 1000}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
