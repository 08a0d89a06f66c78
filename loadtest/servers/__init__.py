"""Real backend servers (Prometheus, Jaeger, VictoriaLogs) run as child processes for the e2e tests.

Each server listens on 127.0.0.1 ports picked at construction, keeps its state in a directory of its
own and can be stopped and started again on the same ports and data, which is what an outage test
needs. Every wait is bounded; a server started from the main thread is also killed by the kernel if
the test process dies, so a crashed session leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self, TypeVar

HOST = "127.0.0.1"
T = TypeVar("T")


class ServerError(RuntimeError):
    """A test server could not be built, started, stopped or queried."""


def free_ports(count: int) -> list[int]:
    """Distinct ports free on 127.0.0.1 right now (held open together so they cannot repeat)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def accepts_connections(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_request(
    url: str,
    *,
    method: str = "GET",
    params: Mapping[str, str] | None = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """Status and body of one HTTP call; HTTP error statuses are returned, not raised."""
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str, params: Mapping[str, str] | None = None, timeout: float = 10.0) -> Any:
    status, body = http_request(url, params=params, timeout=timeout)
    if status != 200:
        raise ServerError(f"GET {url} answered {status}: {body[:500]!r}")
    return json.loads(body)


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """The first truthy result of `probe`, polled until `timeout` seconds; ServerError after that."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


class ServerProcess:
    """One server process: subclasses give its command line and its readiness probe."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self.started_seconds: float | None = None

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 60.0) -> Self:
        """Launch the server and return once `ready()` holds; the log tail is in any error."""
        if self.running:
            return self
        cmd = self.command()
        if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
            # The kernel sends SIGKILL when the parent thread ends, so a killed pytest leaves no server.
            # Only from the main thread: a worker thread's exit would take the server with it.
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        began = time.monotonic()
        with self.log_file.open("ab") as log:
            log.write(f"\n--- start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.environment(),
            )
        try:
            wait_until(self._ready_or_dead, timeout, f"{self.name} to become ready")
        except ServerError as err:
            self.stop()
            raise ServerError(f"{err}; log {self.log_file}:\n{tail(self.log_file)}") from None
        self.started_seconds = time.monotonic() - began
        return self

    def _ready_or_dead(self) -> bool:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise ServerError(
                f"{self.name} exited with {code} while starting; log {self.log_file}:\n{tail(self.log_file)}"
            )
        return self.ready()

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM for a clean shutdown (data flushed), SIGKILL after `timeout`; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited on its own in the meantime
        os.killpg(pid, sig)
