"""kotel's own logs: plain text on a terminal, one JSON object per line for log shippers.

Repeats are held back (`RepeatFilter`): with its broker gone, aiokafka logged the same connection error
about 3,000 times a second in a stage worker (250k lines in an outage of 78 s), which buries what
matters and costs a log pipeline far more than the outage itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

_OWN = ("kotel", "agents", "streams", "loadtest")
_RELAYED = ("kotel.librdkafka", "kotel.status.librdkafka")  # librdkafka's lines under our names
_MAX_TRACKED = 4096  # distinct messages remembered before the expired ones are swept out
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Fields a log pipeline can index: time, level, logger, message, exception and any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        return json.dumps(out, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Passes a library's message (logger, level and text alike) at most once per ``window`` seconds; the
    next one let through says how many were held back. kotel's own messages always pass (each is meant:
    a reload, a rewind), except library lines it relays (librdkafka's); so do DEBUG records: whoever asks
    for them wants all.
    """

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [passed at, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or _is_own(record.name):
            return True
        now = self._clock()
        key = (record.name, record.levelno, record.getMessage())
        found = self._seen.get(key)
        if found is not None and now - found[0] < self.window:
            found[1] += 1
            return False
        held = int(found[1]) if found is not None else 0
        if len(self._seen) >= _MAX_TRACKED:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
        self._seen[key] = [now, 0]
        if held:
            record.msg = f"{record.getMessage()} (and {held} more times in the last {now - found[0]:.0f} s)"
            record.args = None
        return True


def _is_own(name: str) -> bool:
    if any(name == relayed or name.startswith(relayed + ".") for relayed in _RELAYED):
        return False
    return name.split(".", 1)[0] in _OWN


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
