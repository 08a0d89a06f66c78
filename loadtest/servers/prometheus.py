"""Debian's Prometheus as the remote-write backend of the e2e tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.servers import HOST, ServerError, ServerProcess, free_ports, get_json, http_request
from loadtest.servers.build import require_prometheus

# No scrape jobs: the tests write every sample. The out-of-order window lets a sink's retries and
# replays land behind newer samples of the same series, as a production Prometheus would be set up.
_CONFIG = """\
global:
  evaluation_interval: 1m
storage:
  tsdb:
    out_of_order_time_window: {window}
"""


class PrometheusServer(ServerProcess):
    """Prometheus with the remote-write receiver on; its TSDB in `workdir` survives stop()/start()."""

    name = "prometheus"

    def __init__(self, workdir: Path, binary: Path | None = None, out_of_order_window: str = "1h") -> None:
        super().__init__(workdir)
        self.binary = binary or require_prometheus()[0]
        (self.port,) = free_ports(1)
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(_CONFIG.format(window=out_of_order_window), encoding="utf-8")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def remote_write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
            "--web.enable-remote-write-receiver",
            # Debian's defaults point at /usr/share paths and a system data dir; nothing here needs them.
            "--web.console.templates=consoles",
            "--web.console.libraries=console_libraries",
        ]

    def ready(self) -> bool:
        try:
            return http_request(f"{self.url}/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def _api(self, path: str, params: dict[str, str]) -> Any:
        body = get_json(f"{self.url}/api/v1/{path}", params)
        if body.get("status") != "success":
            raise ServerError(f"Prometheus {path} {params} failed: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector of `expr` (at `at`, Unix seconds, default now): [{metric, value}, ...]."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def series(
        self, match: str, start: float | None = None, end: float | None = None
    ) -> list[dict[str, str]]:
        """Label sets of the series matching the selector `match` (from start to end, default all time)."""
        params = {"match[]": match}
        if start is not None:
            params["start"] = f"{start:.3f}"
        if end is not None:
            params["end"] = f"{end:.3f}"
        result: list[dict[str, str]] = self._api("series", params)
        return result
