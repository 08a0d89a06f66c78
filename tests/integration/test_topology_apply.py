"""`kotel topology apply` against the real broker: create, idempotent re-run, drift, dry run."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from kotel.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / "topologies" / "dev.yaml"


def _kotel(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kotel.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        cwd=ROOT,
    )


def _env(bootstrap: str) -> dict[str, str]:
    return {"KOTEL_KAFKA_BOOTSTRAP": bootstrap, "KOTEL_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}"}


def _topics(admin: AdminClient, prefix: str) -> dict[str, int]:
    meta = admin.list_topics(timeout=15)
    return {n: len(t.partitions) for n, t in meta.topics.items() if n.startswith(prefix + ".")}


def test_apply_creates_every_planned_topic_then_reports_no_changes(kafka_bootstrap: str) -> None:
    env = _env(kafka_bootstrap)
    expected = {t.name for t in load_topology(DEV, env=env).planned_topics()}
    first = _kotel("topology", "apply", str(DEV), env=env)
    assert first.returncode == 0, first.stderr
    assert f"created {len(expected)} topics" in first.stdout

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert set(_topics(admin, env["KOTEL_TOPIC_PREFIX"])) == expected
    deadletter = f"{env['KOTEL_TOPIC_PREFIX']}.deadletter"
    configs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, deadletter)])
    entries = next(iter(configs.values())).result(timeout=15)
    assert entries["retention.ms"].value == str(168 * 3600 * 1000)

    second = _kotel("topology", "apply", str(DEV), env=env)
    assert second.returncode == 0, second.stderr
    assert f"no changes ({len(expected)} topics up to date, 0 drifted)" in second.stdout
    assert "create " not in second.stdout


def test_drift_is_reported_and_nothing_is_deleted_or_shrunk(kafka_bootstrap: str) -> None:
    env = _env(kafka_bootstrap)
    prefix = env["KOTEL_TOPIC_PREFIX"]
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # A topic with more partitions and another retention than dev.yaml wants, plus one kotel knows nothing of.
    futures = admin.create_topics(
        [
            NewTopic(f"{prefix}.raw.traces", 5, 1, config={"retention.ms": "1000"}),
            NewTopic(f"{prefix}.somebody-elses", 1, 1),
        ]
    )
    for future in futures.values():
        future.result(timeout=30)

    result = _kotel("topology", "apply", str(DEV), env=env)
    assert result.returncode == 0, result.stderr
    assert (
        f"drift   {prefix}.raw.traces: partitions: 5 in Kafka, 3 in the topology (not changed: Kafka "
        "cannot shrink a topic); retention.ms: '1000' in Kafka, '86400000' in the topology"
    ) in result.stdout
    topics = _topics(admin, prefix)
    assert topics[f"{prefix}.raw.traces"] == 5
    assert f"{prefix}.somebody-elses" in topics


def test_dry_run_changes_nothing(kafka_bootstrap: str) -> None:
    env = _env(kafka_bootstrap)
    result = _kotel("topology", "apply", "--dry-run", str(DEV), env=env)
    assert result.returncode == 0, result.stderr
    assert f"create  {env['KOTEL_TOPIC_PREFIX']}.raw.traces  partitions=3 replication=1" in result.stdout
    assert "dry run: 17 to create, 0 drifted, nothing changed" in result.stdout
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert _topics(admin, env["KOTEL_TOPIC_PREFIX"]) == {}


def test_apply_with_a_broken_topology_exits_2_before_touching_kafka(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("topics:\n  prefixx: x\n")
    result = _kotel("topology", "apply", str(bad), env={})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{bad}:2: topics.prefixx: unknown key (not part of this section; check the spelling)"
    )
