"""What each stage worker's producer is told about lingering (see `streams.app._LINGER_MS`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kotel.topology import parse_topology
from streams.app import create_app

TOPOLOGY = parse_topology('kafka: {bootstrap_servers: "127.0.0.1:1"}\ntopics: {prefix: kt}\n')


@pytest.mark.parametrize(("stage", "linger_ms"), [("dedup", 0), ("route", 0), ("tail", 2)])
def test_latency_bound_stages_send_at_once_and_the_tail_stage_lingers(
        tmp_path: Path, stage: str, linger_ms: int) -> None:
    app = create_app(TOPOLOGY, stage, data_dir=tmp_path)
    producer = app._new_producer()
    assert producer._settings_default()["linger_ms"] == linger_ms
    extra = producer._settings_extra()
    assert extra["acks"] == "all" and extra["enable_idempotence"] is True
