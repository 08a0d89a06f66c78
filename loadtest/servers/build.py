"""Find or build the real servers the e2e tests run, caching each Go build once per machine.

Run ``python -m loadtest.servers.build`` before the tests to build anything missing (quick when cached):
Jaeger v2 (Tempo's stand-in) and VictoriaLogs (Loki's stand-in) come from the Go module proxy and are
built with the local Go toolchain; Prometheus comes from Debian's ``prometheus`` package. Tempo and Loki
themselves are AGPL and are not built here.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kotel import paths
from loadtest.servers import ServerError

JAEGER_MODULE_DIR = Path(__file__).parent / "jaeger"
JAEGER_PACKAGE = "github.com/jaegertracing/jaeger/cmd/jaeger"
VICTORIALOGS_PACKAGE = "github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs"
VICTORIALOGS_VERSION = "v1.52.1"
# A cold Jaeger build took about 15 minutes on a busy 2-core machine; this bounds a hung one.
BUILD_TIMEOUT = float(os.environ.get("KOTEL_SERVER_BUILD_TIMEOUT", "2700"))
# out_of_order_time_window appeared in Prometheus 2.39.
MIN_PROMETHEUS = (2, 39)
PROMETHEUS_INSTALL = "install it with `apt-get install -y prometheus`"
GO_MISSING = "Go is required to build the e2e test servers (Jaeger, VictoriaLogs): put `go` on PATH"
_MARKER = ".complete"


@dataclass(frozen=True)
class GoServer:
    """A server binary built from a Go main package at a pinned module version."""

    name: str
    package: str
    version: str
    # Our own module pinning the tool (`go build` inside it), or None for a plain `go install pkg@version`.
    module_dir: Path | None = None

    @property
    def cache_dir(self) -> Path:
        return paths.cache_dir() / "servers" / f"{self.name}-{self.version}"

    @property
    def binary(self) -> Path:
        return self.cache_dir / self.name

    def recipe(self) -> str:
        """What the cached binary was built from; a different recipe means a rebuild."""
        if self.module_dir is None:
            return f"{self.package}@{self.version}"
        digest = hashlib.sha256()
        for name in ("go.mod", "go.sum"):
            digest.update((self.module_dir / name).read_bytes())
        return f"{self.package}@{self.version} go.mod+go.sum {digest.hexdigest()[:16]}"


def module_version(go_mod: Path, module: str) -> str:
    """The version `go_mod` requires of `module`: the cache key of a tool pinned by `go get -tool`."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", go_mod.read_text(), re.MULTILINE)
    if match is None:
        raise ServerError(f"{go_mod} does not require {module}")
    return match.group(1)


# jaeger's go.mod has a replace directive, so `go install ...@version` refuses it; `go get -tool` inside
# a module of ours resolves it (see loadtest/servers/jaeger/go.mod).
JAEGER = GoServer(
    "jaeger",
    JAEGER_PACKAGE,
    module_version(JAEGER_MODULE_DIR / "go.mod", "github.com/jaegertracing/jaeger"),
    JAEGER_MODULE_DIR,
)
VICTORIALOGS = GoServer("victoria-logs", VICTORIALOGS_PACKAGE, VICTORIALOGS_VERSION)
GO_SERVERS = {server.name: server for server in (JAEGER, VICTORIALOGS)}


def is_cached(server: GoServer) -> bool:
    marker = server.cache_dir / _MARKER
    if not (marker.exists() and server.binary.exists()):
        return False
    try:
        return json.loads(marker.read_text()).get("recipe") == server.recipe()
    except ValueError:
        return False


def ensure_built(server: GoServer, timeout: float = BUILD_TIMEOUT) -> tuple[Path, float | None]:
    """The server's binary and the seconds its build took now (None when it came from the cache).

    The marker is written last, so a build cut short is redone rather than trusted; a lock file keeps
    two test runs from building the same server at once.
    """
    if is_cached(server):
        return server.binary, None
    go = shutil.which("go")
    if go is None:
        raise ServerError(GO_MISSING)
    server.cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(server.cache_dir / ".lock", timeout):
        if is_cached(server):  # another process built it while we waited
            return server.binary, None
        (server.cache_dir / _MARKER).unlink(missing_ok=True)
        began = time.monotonic()
        _go_build(go, server, timeout)
        seconds = time.monotonic() - began
        marker = {"recipe": server.recipe(), "go": _go_version(go), "build_seconds": round(seconds, 1)}
        (server.cache_dir / _MARKER).write_text(json.dumps(marker) + "\n")
    return server.binary, seconds


def _go_build(go: str, server: GoServer, timeout: float) -> None:
    partial = server.cache_dir / f"{server.name}.partial"
    partial.unlink(missing_ok=True)
    env = dict(os.environ)
    # Strip symbols and DWARF: a third smaller, and no test debugs these servers.
    flags = ["-ldflags=-s -w"]
    if server.module_dir is not None:
        cmd, cwd = [go, "build", *flags, "-o", str(partial), server.package], server.module_dir
    else:
        gobin = server.cache_dir / "gobin"
        shutil.rmtree(gobin, ignore_errors=True)
        env["GOBIN"] = str(gobin)
        cmd, cwd = [go, "install", *flags, f"{server.package}@{server.version}"], server.cache_dir
    _run_bounded(cmd, cwd, env, timeout, f"building {server.name} {server.version}")
    if server.module_dir is None:
        built = server.cache_dir / "gobin" / server.package.rsplit("/", 1)[1]
        os.replace(built, partial)
        shutil.rmtree(server.cache_dir / "gobin", ignore_errors=True)
    os.replace(partial, server.binary)


def _run_bounded(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, what: str) -> None:
    """Run `cmd`, killing its whole process group (go spawns compilers) if it outlives `timeout`."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ServerError(f"{what} did not finish within {timeout:.0f}s: `{' '.join(cmd)}`") from None
    except BaseException:  # Ctrl-C: leave no compiler behind
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        text = output.decode(errors="replace").strip().splitlines()
        raise ServerError(
            f"{what} failed (exit {proc.returncode}): `{' '.join(cmd)}` in {cwd}:\n" + "\n".join(text[-25:])
        )


def _go_version(go: str) -> str:
    return subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60).stdout.strip()


@contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    with path.open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServerError(f"timed out after {timeout:.0f}s waiting for the lock {path}") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prometheus_version(version_output: str) -> tuple[int, int, int]:
    """'prometheus, version 2.42.0+ds (branch: ...' -> (2, 42, 0)."""
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", version_output)
    if match is None:
        raise ServerError(f"cannot tell the Prometheus version from: {version_output.strip()[:200]!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def require_prometheus() -> tuple[Path, tuple[int, int, int]]:
    """Debian's `prometheus` binary and its version, once known to support the out-of-order window."""
    found = shutil.which("prometheus")
    if found is None:
        raise ServerError(f"Prometheus is required by the e2e tests and is not on PATH: {PROMETHEUS_INSTALL}")
    proc = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    version = prometheus_version(proc.stdout + proc.stderr)
    if version[:2] < MIN_PROMETHEUS:
        raise ServerError(
            f"Prometheus {'.'.join(map(str, MIN_PROMETHEUS))} or newer is required (out-of-order window), "
            f"found {'.'.join(map(str, version))} at {found}"
        )
    return Path(found), version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.servers.build", description=__doc__)
    known = [*GO_SERVERS, "prometheus"]
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(known)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown server {', '.join(unknown)}; known: {', '.join(known)}")
    names = args.names or known
    failed = False
    for name in names:
        try:
            if name == "prometheus":
                binary, version = require_prometheus()
                print(f"prometheus {'.'.join(map(str, version))}: {binary}", flush=True)
                continue
            server = GO_SERVERS[name]
            if not is_cached(server):
                print(f"{name} {server.version}: building (a cold build takes minutes)...", flush=True)
            binary, seconds = ensure_built(server)
            size = binary.stat().st_size / 2**20
            how = "cached" if seconds is None else f"built in {seconds:.0f}s"
            print(f"{name} {server.version}: {how}, {size:.0f} MiB, {binary}", flush=True)
        except ServerError as err:
            print(f"{name}: {err}", file=sys.stderr, flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
