"""A real Apache Kafka broker (KRaft, broker and controller in one JVM) for development and tests.

Why not Docker: dev machines and CI here have a JDK and Maven but no container engine, and the jars
from Maven Central are the same broker production runs, so what passes here passes there.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from subprocess import DEVNULL, STDOUT
from typing import Any, Self

import psutil
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kotel import paths

DEFAULT_VERSION = "4.1.1"
MIN_JAVA = 17
JAVA_INSTALL = "install it with `apt-get install openjdk-17-jre-headless`"
JAVA_MISSING = f"Java {MIN_JAVA} or newer is required to run the Kafka broker: {JAVA_INSTALL}"
MAVEN_MISSING = "Maven is required to download the Kafka broker jars: install it with `apt-get install maven`"
# Pinned so the download behaves the same whatever Maven version the machine has.
_DEPENDENCY_GOAL = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
# Kafka logs through slf4j 1.x; without this binding the broker would write no log at all.
_SLF4J_BINDING = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3")
_BROKER_JVM_FLAGS = ("-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")

# librdkafka reports every refused connection while the broker boots; those are expected, the broker's
# own log says what matters, so the readiness probe's client logs go nowhere.
_PROBE_LOG = logging.getLogger(__name__ + ".probe")
_PROBE_LOG.addHandler(logging.NullHandler())
_PROBE_LOG.propagate = False


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched, formatted, started or stopped."""


class UserError(KafkaBrokerError):
    """Something the user fixes on their side (a missing tool, a busy port); the CLI exits with 2."""


class BrokerSettings(BaseModel):
    """Where and how the broker runs; defaults come from the environment via :meth:`from_env`."""

    model_config = ConfigDict(frozen=True)

    version: str = Field(DEFAULT_VERSION, pattern=r"^\d+\.\d+\.\d+$")
    host: str = "127.0.0.1"
    port: int = Field(9092, ge=1, le=65535)
    controller_port: int = Field(9093, ge=1, le=65535)
    heap: str = Field("512m", pattern=r"^\d+[kKmMgG]$")
    state_dir: Path
    cache_root: Path

    @model_validator(mode="after")
    def _ports_differ(self) -> Self:
        if self.port == self.controller_port:
            raise ValueError(f"port and controller_port must differ, both are {self.port}")
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> BrokerSettings:
        """Defaults from KOTEL_KAFKA_VERSION, KOTEL_KAFKA_HEAP and kotel.paths; None overrides are ignored."""
        values: dict[str, Any] = {
            "version": os.environ.get("KOTEL_KAFKA_VERSION", DEFAULT_VERSION),
            "heap": os.environ.get("KOTEL_KAFKA_HEAP", "512m"),
            "state_dir": paths.home() / "kafka",
            "cache_root": paths.cache_dir(),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def jar_dir(self) -> Path:
        return self.cache_root / f"kafka-{self.version}"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "broker.pid"

    @property
    def properties_file(self) -> Path:
        return self.state_dir / "server.properties"

    @property
    def log4j_file(self) -> Path:
        return self.state_dir / "log4j2.properties"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    version: str
    log_file: Path
    data_dir: Path


@dataclass(frozen=True)
class StartResult:
    status: BrokerStatus
    already_running: bool
    downloaded: bool
    seconds: float


def java_major_version(version_output: str) -> int:
    """The feature release from `java -version` text: 'version "17.0.15"' -> 17, '"1.8.0_292"' -> 8."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        raise KafkaBrokerError(f"cannot tell the Java version from: {version_output.strip()[:200]!r}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


@lru_cache(maxsize=8)
def _java_version_of(java: str) -> int:
    proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    return java_major_version(proc.stderr + proc.stdout)


def require_java() -> str:
    """The `java` executable on PATH, once it is known to be new enough for Kafka 4."""
    java = shutil.which("java")
    if java is None:
        raise UserError(JAVA_MISSING)
    major = _java_version_of(java)
    if major < MIN_JAVA:
        raise UserError(
            f"Java {MIN_JAVA} or newer is required to run the Kafka broker, found Java {major} at {java}: "
            f"{JAVA_INSTALL}"
        )
    return java


def fetch_jars(settings: BrokerSettings) -> tuple[Path, bool]:
    """The directory of broker jars, downloaded with Maven unless cached; True when it downloaded.

    The completion marker is written last, so a download cut short is redone, not trusted.
    """
    jar_dir, libs, marker = settings.jar_dir, settings.jar_dir / "libs", settings.jar_dir / ".complete"
    if marker.exists() and libs.is_dir():
        return libs, False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise UserError(MAVEN_MISSING)
    jar_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(jar_dir / ".lock"):
        if marker.exists() and libs.is_dir():  # another process finished the download while we waited
            return libs, False
        shutil.rmtree(libs, ignore_errors=True)
        (jar_dir / "pom.xml").write_text(_pom(settings.version), encoding="utf-8")
        cmd = [mvn, "-q", "-B", _DEPENDENCY_GOAL, f"-DoutputDirectory={libs}", "-DincludeScope=runtime"]
        proc = subprocess.run(cmd, cwd=jar_dir, capture_output=True, text=True)
        if proc.returncode != 0 or not any(libs.glob("*.jar")):
            raise KafkaBrokerError(
                f"Maven could not download the Kafka {settings.version} jars (exit {proc.returncode}):\n"
                + _last_lines(proc.stdout + proc.stderr)
            )
        marker.write_text(f"kafka_2.13 {settings.version}\n", encoding="utf-8")
    return libs, True


def server_properties(settings: BrokerSettings) -> str:
    """A single-node dev cluster: replication 1 everywhere, topics only created on purpose."""
    host, port, cport = settings.host, settings.port, settings.controller_port
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{cport}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(settings.data_dir),
        # Topics come from `kotel topology apply` or the stages; a typo must not create one silently.
        "auto.create.topics.enable": "false",
        "num.partitions": "3",
        "offsets.topic.replication.factor": "1",
        # Fewer internal partitions than the production default of 50: the first group forms faster.
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "10",
        "group.initial.rebalance.delay.ms": "0",
        # An offset commit otherwise waits up to 5 ms for others to share its write; a sink commits after
        # every batch, so at a light load that wait was part of every batch's cycle.
        "group.coordinator.append.linger.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "4",
        # The log cleaner (Faust changelogs are compacted) takes 128 MiB of heap by default.
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
    }
    return "".join(f"{key}={value}\n" for key, value in props.items())


class KafkaBroker:
    """One broker's lifecycle in one state directory; safe to drive from several processes in turn."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._child: subprocess.Popen[bytes] | None = None

    def status(self) -> BrokerStatus:
        s = self.settings
        proc, info = self._process()
        bootstrap, version = s.bootstrap, s.version
        if proc is not None:
            bootstrap = f"{info.get('host', s.host)}:{info.get('port', s.port)}"
            version = str(info.get("version", version))
        return BrokerStatus(
            running=proc is not None,
            pid=proc.pid if proc is not None else None,
            bootstrap=bootstrap,
            version=version,
            log_file=s.log_file,
            data_dir=s.data_dir,
        )

    def start(self, timeout: float = 60.0) -> StartResult:
        """Start and return once a metadata request succeeds; `timeout` bounds that wait, not the download."""
        s = self.settings
        begin = time.monotonic()
        current = self.status()
        if current.running:
            if current.bootstrap != s.bootstrap:
                raise UserError(
                    f"the Kafka broker of {s.state_dir} is already running on {current.bootstrap}; "
                    f"stop it first to start it on {s.bootstrap}"
                )
            return StartResult(current, already_running=True, downloaded=False, seconds=0.0)
        s.pid_file.unlink(missing_ok=True)  # stale: the process is gone or is not our broker
        _require_free_port(s.host, s.port, "--port")
        _require_free_port(s.host, s.controller_port, "--controller-port")
        java = require_java()
        libs, downloaded = fetch_jars(s)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        s.properties_file.write_text(server_properties(s), encoding="utf-8")
        s.log4j_file.write_text(resources.files(__package__).joinpath("log4j2.properties").read_text("utf-8"))
        self._format(java, libs)
        self._spawn(java, libs)
        self._await_ready(timeout)
        return StartResult(
            self.status(), already_running=False, downloaded=downloaded, seconds=time.monotonic() - begin
        )

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM for a clean shutdown, SIGKILL after `timeout`; the pid it stopped, None if none ran."""
        proc, _ = self._process()
        if proc is not None:
            try:
                proc.terminate()
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            except psutil.NoSuchProcess:
                pass
        if self._child is not None:
            self._child.poll()  # lets Popen see the exit psutil already reaped, so it does not warn
            self._child = None
        self.settings.pid_file.unlink(missing_ok=True)
        return proc.pid if proc is not None else None

    def _process(self) -> tuple[psutil.Process | None, dict[str, Any]]:
        """Our broker if the pid file names a live JVM running kafka.Kafka on our properties file."""
        try:
            info = json.loads(self.settings.pid_file.read_text(encoding="utf-8"))
            proc = psutil.Process(int(info["pid"]))
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None, {}
            cmdline = proc.cmdline()
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None, {}
        if "kafka.Kafka" in cmdline and str(self.settings.properties_file) in cmdline:
            return proc, info
        return None, {}

    def _format(self, java: str, libs: Path) -> None:
        s = self.settings
        if (s.data_dir / "meta.properties").exists():
            return
        s.data_dir.mkdir(parents=True, exist_ok=True)
        tool = [java, "-Xmx256m", *self._jvm_common(libs), "kafka.tools.StorageTool", "format"]
        cmd = [*tool, "-t", new_cluster_id(), "-c", str(s.properties_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise KafkaBrokerError(
                f"formatting the Kafka data dir {s.data_dir} failed (exit {proc.returncode}):\n"
                + _last_lines(proc.stdout + proc.stderr)
            )

    def _spawn(self, java: str, libs: Path) -> None:
        s = self.settings
        cmd = [java, f"-Xmx{s.heap}", *_BROKER_JVM_FLAGS, *self._jvm_common(libs), "kafka.Kafka"]
        with s.log_file.open("wb") as log:
            # Own session: Ctrl-C in the terminal that ran `kotel kafka start` must not reach the broker.
            self._child = subprocess.Popen(
                [*cmd, str(s.properties_file)],
                stdin=DEVNULL,
                stdout=log,
                stderr=STDOUT,
                cwd=s.state_dir,
                start_new_session=True,
            )
        info = {"pid": self._child.pid, "host": s.host, "port": s.port, "version": s.version}
        s.pid_file.write_text(json.dumps(info) + "\n", encoding="utf-8")

    def _jvm_common(self, libs: Path) -> list[str]:
        return [f"-Dlog4j2.configurationFile={self.settings.log4j_file}", "-cp", f"{libs}/*"]

    def _await_ready(self, timeout: float) -> None:
        s, child = self.settings, self._child
        assert child is not None
        deadline = time.monotonic() + timeout
        while True:
            code = child.poll()
            if code is not None:
                self._child = None
                s.pid_file.unlink(missing_ok=True)
                raise KafkaBrokerError(
                    f"the Kafka broker exited with code {code} before it was ready; "
                    f"last lines of {s.log_file}:\n{_last_lines(_read_tail(s.log_file))}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise KafkaBrokerError(
                    f"the Kafka broker did not answer a metadata request within {timeout:g} s and was "
                    f"stopped; last lines of {s.log_file}:\n{_last_lines(_read_tail(s.log_file))}"
                )
            if _accepts_connections(s.host, s.port) and _answers_metadata(s.bootstrap, min(2.0, remaining)):
                return
            time.sleep(0.2)


def new_cluster_id() -> str:
    """A Kafka cluster id in Kafka's own text form (url-safe base64 of 16 random bytes, no padding).

    Made here rather than by `StorageTool random-uuid` to save a JVM start; Kafka itself never hands
    out ids starting with '-', since those read like command-line flags.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


def _pom(version: str) -> str:
    group, artifact, slf4j_version = _SLF4J_BINDING
    deps = [("org.apache.kafka", "kafka_2.13", version), (group, artifact, slf4j_version)]
    body = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>\n"
        for g, a, v in deps
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>\n'
        f"<groupId>dev.kotel</groupId><artifactId>kafka-jars</artifactId><version>{version}</version>\n"
        f"<packaging>pom</packaging>\n<dependencies>\n{body}</dependencies>\n</project>\n"
    )


def _require_free_port(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Kafka binds with SO_REUSEADDR too, so sockets lingering in TIME_WAIT do not count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(
                    f"port {port} on {host} is already in use by another process; "
                    f"stop that process or choose another port with {flag}"
                ) from exc
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers_metadata(bootstrap: str, timeout: float) -> bool:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _PROBE_LOG})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialises downloads into a shared jar cache (the CLI and a test session may race)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_tail(path: Path, size: int = 8192) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_lines(text: str, count: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])
