"""The smoke scenario under `kotel loadtest run`'s runner: agent, every stage and the archive on the real
broker, every generated item accounted for. Fails on loss, duplicates or a sampling error, never on speed."""

from __future__ import annotations

import io
from pathlib import Path

from confluent_kafka.admin import AdminClient
from rich.console import Console

from loadtest.runner import run
from loadtest.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_scenario_accounts_for_every_item(kafka_bootstrap: str, tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "loadtest" / "scenarios" / "smoke.yaml")
    assert scenario.duration.total_seconds() < 60
    result, files = run(scenario, tmp_path / "results", bootstrap=kafka_bootstrap,
                        console=Console(file=io.StringIO()))
    summary = files["markdown"].read_text()
    assert result["problems"] == [], summary
    assert set(result["signals"]) == {"traces", "metrics", "logs"}
    for signal, res in result["signals"].items():
        fates = res["fates"]
        assert fates["lost"] == 0 and fates["sink_duplicates"] == 0 and fates["misrouted"] == 0, summary
        assert fates["delivered"] == fates["acked"] - fates["filtered"] - fates["sampled_out"] > 0, summary
        assert fates["deduplicated"] > 0, f"{signal}: the injected duplicates never reached dedup\n{summary}"
        assert res["latency_ms"]["end_to_end"]["n"] > 0
    assert result["signals"]["traces"]["fates"]["filtered"] > 0
    sampling = result["signals"]["traces"]["sampling"]
    assert not sampling["applicable"] or sampling["ok"], summary
    assert files["chart"].exists()
    prefix = result["topic_prefix"]  # a passed run on a broker it was given leaves no topic behind
    left = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=15).topics
    assert not [t for t in left if t.startswith((f"{prefix}.", f"kotel-{prefix}-"))]
