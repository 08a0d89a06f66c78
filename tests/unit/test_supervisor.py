"""`kotel up`'s plan and supervision, with tiny Python children instead of kotel processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from kotel.supervisor import Child, Supervisor, plan_children
from kotel.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]


def test_plan_follows_the_topology_and_skips_what_this_version_lacks() -> None:
    topology = load_topology(ROOT / "topologies" / "dev.yaml")
    available = {"agent": set(), "worker": {"dedup", "route"}, "sink": set()}
    children, skipped = plan_children(topology, "dev.yaml", available)
    assert [c.name for c in children] == ["dedup", "route", "sink-file-archive", "agent"]
    assert children[2].argv[3:] == ["sink", "file/archive", "--topology", "dev.yaml"]
    assert skipped == ["tail: `kotel worker tail` is not available in this version"]


def test_an_agent_only_topology_runs_only_the_agent() -> None:
    topology = load_topology(ROOT / "topologies" / "seed-ordering.yaml")
    children, skipped = plan_children(topology, "x.yaml", {"agent": set()})
    assert [c.name for c in children] == ["agent"] and skipped == []


async def test_a_crashed_child_is_restarted_and_a_refusing_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    counter = tmp_path / "runs"
    crash = Child(
        "crash",
        [sys.executable, "-c", f"open({str(counter)!r}, 'a').write('x'); print('boom'); raise SystemExit(1)"],
        "",
    )
    refuse = Child("refuse", [sys.executable, "-c", "raise SystemExit(2)"], "")
    supervisor = Supervisor([crash, refuse], grace=5)
    task = asyncio.create_task(supervisor.run())
    async with asyncio.timeout(20):
        while not counter.exists() or len(counter.read_text()) < 2:
            await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)  # the supervisor's own Ctrl-C handler stops everything
    await asyncio.wait_for(task, 20)
    assert crash.restarts >= 1
    assert refuse.restarts == 0
    assert "boom" in (tmp_path / "logs" / "crash.log").read_text()
