from __future__ import annotations

import json
import logging

import pytest

from kotel.logs import JsonFormatter, RepeatFilter, setup_logging


def test_json_log_lines_carry_level_logger_message_and_extras() -> None:
    record = logging.LogRecord("kotel.agent", logging.WARNING, __file__, 1, "spilled %d records", (3,), None)
    record.signal = "traces"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING"
    assert line["logger"] == "kotel.agent"
    assert line["message"] == "spilled 3 records"
    assert line["signal"] == "traces"
    assert line["time"].endswith("+00:00")


def _record(message: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", level, __file__, 1, message, args or None, None)


def test_a_repeated_message_passes_once_per_window_and_then_says_how_often_it_came() -> None:
    now = [100.0]
    repeats = RepeatFilter(window=10.0, clock=lambda: now[0])
    spam = "Unable connect to node with id %s: %s"
    assert repeats.filter(_record(spam, 1, "refused"))
    assert not any(repeats.filter(_record(spam, 1, "refused")) for _ in range(2999))
    assert repeats.filter(_record(spam, 2, "refused"))  # another node: another message
    assert repeats.filter(_record(spam, 1, "refused", level=logging.WARNING))  # another level
    now[0] = 110.5
    later = _record(spam, 1, "refused")
    assert repeats.filter(later)
    assert later.getMessage() == ("Unable connect to node with id 1: refused (and 2999 more times in the "
                                  "last 10 s)")
    assert not repeats.filter(_record(spam, 1, "refused"))


def test_kotels_own_messages_are_never_held_back_but_relayed_librdkafka_lines_are() -> None:
    repeats = RepeatFilter(window=10.0, clock=lambda: 0.0)

    def record(name: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.INFO, __file__, 1, "configuration reloaded", None, None)

    assert all(repeats.filter(record("kotel.agent")) for _ in range(3))  # each reload is news
    assert all(repeats.filter(record("streams.app")) for _ in range(3))
    assert repeats.filter(record("kotel.librdkafka"))
    assert not repeats.filter(record("kotel.librdkafka"))


def test_debug_records_are_never_held_back() -> None:
    repeats = RepeatFilter(window=10.0, clock=lambda: 0.0)
    assert all(repeats.filter(_record("fetch %d", 1, level=logging.DEBUG)) for _ in range(5))


def test_setup_logging_holds_back_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    try:
        for _ in range(50):
            logging.getLogger("aiokafka").error("Unable to update metadata from [1]")
        logging.getLogger("kotel.test").warning("something else")
    finally:
        logging.getLogger().handlers[:] = []
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].endswith("Unable to update metadata from [1]")
