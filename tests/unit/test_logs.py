from __future__ import annotations

import json
import logging

from kotel.logs import JsonFormatter


def test_json_log_lines_carry_level_logger_message_and_extras() -> None:
    record = logging.LogRecord("kotel.agent", logging.WARNING, __file__, 1, "spilled %d records", (3,), None)
    record.signal = "traces"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING"
    assert line["logger"] == "kotel.agent"
    assert line["message"] == "spilled 3 records"
    assert line["signal"] == "traces"
    assert line["time"].endswith("+00:00")
