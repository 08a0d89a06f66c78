"""Session fixtures running the real backends of the sinks: Prometheus, Jaeger (Tempo's stand-in) and
VictoriaLogs (Loki's stand-in), each on 127.0.0.1 ports picked at runtime, started on first use and
stopped and deleted when the session ends.

A test may stop a session server to play an outage; it must start it again (in a `finally`) before it
returns. Jaeger keeps traces in memory, so its restart forgets them; the other two keep their data.
Binaries come from `python -m loadtest.servers.build` (built here on first use when it has not run).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from loadtest.servers import ServerProcess
from loadtest.servers.jaeger import JaegerServer
from loadtest.servers.prometheus import PrometheusServer
from loadtest.servers.victorialogs import VictoriaLogsServer

_HERE = Path(__file__).parent
START_TIMEOUT = 60.0
S = TypeVar("S", bound=ServerProcess)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only ours, hence the path check.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def run_server(server: S) -> Iterator[S]:
    """Start `server`, hand it out, then stop it and delete its state whatever happened."""
    try:
        server.start(timeout=START_TIMEOUT)
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus 2.42+ with the remote-write receiver and a 1h out-of-order window."""
    yield from run_server(PrometheusServer(tmp_path_factory.mktemp("prometheus")))


@pytest.fixture(scope="session")
def jaeger_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JaegerServer]:
    """Jaeger v2 with OTLP gRPC/HTTP receivers and in-memory storage."""
    yield from run_server(JaegerServer(tmp_path_factory.mktemp("jaeger")))


@pytest.fixture(scope="session")
def victorialogs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaLogsServer]:
    """VictoriaLogs with the Loki push endpoint; X-Scope-OrgID must be a number."""
    yield from run_server(VictoriaLogsServer(tmp_path_factory.mktemp("victorialogs")))
