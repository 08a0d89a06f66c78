"""VictoriaLogs as the Loki push backend of the e2e tests: Loki's stand-in.

It takes Loki's push API (snappy protobuf or JSON) at ``/insert/loki/api/v1/push`` and answers LogsQL at
``/select/logsql/query``. Tenants are numeric: X-Scope-OrgID ``"7"`` (or ``"7:0"``) on a push is account
7, read back with ``query(..., account_id=7)``; a non-numeric X-Scope-OrgID is refused with a 400.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from loadtest.servers import HOST, ServerError, ServerProcess, free_ports, http_request
from loadtest.servers.build import VICTORIALOGS, ensure_built


class VictoriaLogsServer(ServerProcess):
    """VictoriaLogs with its data in `workdir`, kept across stop()/start()."""

    name = "victorialogs"

    def __init__(self, workdir: Path, binary: Path | None = None, retention: str = "7d") -> None:
        super().__init__(workdir)
        self.binary = binary or ensure_built(VICTORIALOGS)[0]
        self.retention = retention
        (self.port,) = free_ports(1)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def loki_push_url(self) -> str:
        return f"{self.url}/insert/loki/api/v1/push"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            f"-storageDataPath={self.workdir / 'data'}",
            f"-httpListenAddr={HOST}:{self.port}",
            f"-retentionPeriod={self.retention}",
        ]

    def ready(self) -> bool:
        try:
            return http_request(f"{self.url}/health", timeout=2) == (200, b"OK")
        except OSError:
            return False

    def flush(self) -> None:
        """Make everything ingested so far searchable (it is otherwise buffered for about a second)."""
        status, body = http_request(f"{self.url}/internal/force_flush")
        if status != 200:
            raise ServerError(f"VictoriaLogs force_flush answered {status}: {body[:500]!r}")

    def query(
        self,
        logsql: str,
        account_id: int = 0,
        project_id: int = 0,
        limit: int | None = None,
        flush: bool = True,
    ) -> list[dict[str, Any]]:
        """The log entries matching `logsql` in one tenant, each a dict of fields (``_msg``, ``_time``...)."""
        if flush:
            self.flush()
        form = {"query": logsql}
        if limit is not None:
            form["limit"] = str(limit)
        status, body = http_request(
            f"{self.url}/select/logsql/query",
            method="POST",
            data=urlencode(form).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "AccountID": str(account_id),
                "ProjectID": str(project_id),
            },
        )
        if status != 200:
            raise ServerError(f"VictoriaLogs query {logsql!r} answered {status}: {body[:500]!r}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]
