"""`kotel.kafka` without a broker: tool checks, jar cache, pid files, port checks, CLI wiring."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from kotel.kafka import broker as kb
from kotel.kafka.broker import (
    JAVA_MISSING,
    MAVEN_MISSING,
    BrokerSettings,
    KafkaBroker,
    KafkaBrokerError,
    UserError,
    fetch_jars,
    java_major_version,
    new_cluster_id,
    require_java,
    server_properties,
)
from kotel.kafka.cli import main
from kotel.supervisor import free_ports


@pytest.fixture
def settings(tmp_path: Path) -> BrokerSettings:
    port, controller = free_ports(2)  # fixed ones in the ephemeral range can be a client's just then
    return BrokerSettings(
        state_dir=tmp_path / "state", cache_root=tmp_path / "cache", port=port, controller_port=controller
    )


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A PATH holding only the fake tools a test writes into it."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", str(path))
    kb._java_version_of.cache_clear()
    yield path
    kb._java_version_of.cache_clear()


def write_tool(bin_dir: Path, name: str, script: str) -> Path:
    tool = bin_dir / name
    tool.write_text(script if script.startswith("#!") else f"#!/bin/sh\n{script}\n")
    tool.chmod(0o755)
    return tool


def test_missing_java_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError) as err:
        require_java()
    assert str(err.value) == (
        "Java 17 or newer is required to run the Kafka broker: "
        "install it with `apt-get install openjdk-17-jre-headless`"
    )


def test_old_java_is_refused_with_its_version_and_path(bin_dir: Path) -> None:
    java = write_tool(bin_dir, "java", "echo 'openjdk version \"11.0.2\" 2019-01-15' >&2")
    with pytest.raises(UserError) as err:
        require_java()
    assert str(err.value) == (
        f"Java 17 or newer is required to run the Kafka broker, found Java 11 at {java}: "
        "install it with `apt-get install openjdk-17-jre-headless`"
    )


def test_new_enough_java_is_returned(bin_dir: Path) -> None:
    java = write_tool(bin_dir, "java", "echo 'openjdk version \"21.0.1\" 2023-10-17' >&2")
    assert require_java() == str(java)


@pytest.mark.parametrize(
    ("text", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_292"', 8),
    ],
)
def test_java_major_version(text: str, major: int) -> None:
    assert java_major_version(text) == major


def test_java_major_version_unreadable() -> None:
    with pytest.raises(KafkaBrokerError, match=r"^cannot tell the Java version from: 'Error: no JVM'$"):
        java_major_version("Error: no JVM\n")


def test_missing_maven_names_the_package(settings: BrokerSettings, bin_dir: Path) -> None:
    with pytest.raises(UserError) as err:
        fetch_jars(settings)
    assert str(err.value) == MAVEN_MISSING
    assert (
        MAVEN_MISSING
        == "Maven is required to download the Kafka broker jars: install it with `apt-get install maven`"
    )


def test_completed_cache_is_reused_without_maven(settings: BrokerSettings, bin_dir: Path) -> None:
    libs = settings.jar_dir / "libs"
    libs.mkdir(parents=True)
    (settings.jar_dir / ".complete").write_text("kafka_2.13 4.1.1\n")
    assert fetch_jars(settings) == (libs, False)


# A stand-in for Maven, in Python because the test PATH holds no coreutils.
FAKE_MVN = f"""#!{sys.executable}
import pathlib, sys
here = pathlib.Path(sys.argv[0]).parent
with open(here / "mvn.calls", "a") as calls:
    calls.write(" ".join(sys.argv[1:]) + "\\n")
out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("-DoutputDirectory="))
pathlib.Path(out).mkdir(parents=True, exist_ok=True)
(pathlib.Path(out) / "kafka_2.13-fake.jar").touch()
"""


def test_interrupted_download_is_redone(settings: BrokerSettings, bin_dir: Path) -> None:
    write_tool(bin_dir, "mvn", FAKE_MVN)
    libs = settings.jar_dir / "libs"
    libs.mkdir(parents=True)
    (libs / "half-written.jar").write_bytes(b"PK")  # jars present, but no completion marker

    assert fetch_jars(settings) == (libs, True)
    assert sorted(p.name for p in libs.iterdir()) == ["kafka_2.13-fake.jar"]
    assert (settings.jar_dir / ".complete").exists()
    pom = (settings.jar_dir / "pom.xml").read_text()
    assert "<artifactId>kafka_2.13</artifactId><version>4.1.1</version>" in pom
    assert "<artifactId>log4j-slf4j-impl</artifactId>" in pom
    assert fetch_jars(settings) == (libs, False)  # now cached: Maven is not run again
    assert len((bin_dir / "mvn.calls").read_text().splitlines()) == 1


def test_failed_download_leaves_no_marker(settings: BrokerSettings, bin_dir: Path) -> None:
    write_tool(bin_dir, "mvn", "echo '[ERROR] Could not resolve dependencies'; exit 1")
    with pytest.raises(KafkaBrokerError) as err:
        fetch_jars(settings)
    assert str(err.value) == (
        "Maven could not download the Kafka 4.1.1 jars (exit 1):\n[ERROR] Could not resolve dependencies"
    )
    assert not (settings.jar_dir / ".complete").exists()


@pytest.mark.parametrize(("which", "flag"), [("port", "--port"), ("controller_port", "--controller-port")])
def test_busy_port_is_named(settings: BrokerSettings, which: str, flag: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        broker = KafkaBroker(settings.model_copy(update={which: busy}))
        with pytest.raises(UserError) as err:
            broker.start()
    assert str(err.value) == (
        f"port {busy} on 127.0.0.1 is already in use by another process; "
        f"stop that process or choose another port with {flag}"
    )


@contextmanager
def fake_broker(settings: BrokerSettings, port: int, on_sigterm: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line looks like our broker's, and a pid file naming it.

    It notes a SIGTERM in <state>/sigterm, then exits or (on_sigterm="ignore") carries on.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    code = (
        "import signal, sys, time\n"
        "def term(*_):\n"
        f"    open({str(settings.state_dir / 'sigterm')!r}, 'w').write('got it')\n"
        f"    {'return' if on_sigterm == 'ignore' else 'sys.exit(0)'}\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    cmd = [sys.executable, "-c", code, "kafka.Kafka", str(settings.properties_file)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # handler installed
            info = {"pid": proc.pid, "host": "127.0.0.1", "port": port, "version": "4.1.1"}
            settings.pid_file.write_text(json.dumps(info))
            yield proc
        finally:
            proc.kill()


def test_running_broker_is_reported_and_start_is_a_no_op(settings: BrokerSettings) -> None:
    with fake_broker(settings, settings.port, on_sigterm="exit") as proc:
        broker = KafkaBroker(settings)
        status = broker.status()
        bootstrap = f"127.0.0.1:{settings.port}"
        assert (status.running, status.pid, status.bootstrap) == (True, proc.pid, bootstrap)
        result = broker.start()
        assert (result.already_running, result.status.pid) == (True, proc.pid)
        with pytest.raises(UserError) as err:
            KafkaBroker(settings.model_copy(update={"port": settings.port + 2})).start()
        assert str(err.value) == (
            f"the Kafka broker of {settings.state_dir} is already running on 127.0.0.1:{settings.port}; "
            f"stop it first to start it on 127.0.0.1:{settings.port + 2}"
        )
        assert broker.stop() == proc.pid
        assert (settings.state_dir / "sigterm").read_text() == "got it"
        assert not psutil.pid_exists(proc.pid)
        assert not settings.pid_file.exists()
        assert broker.status().running is False


def test_stop_kills_a_broker_that_ignores_sigterm(settings: BrokerSettings) -> None:
    with fake_broker(settings, settings.port, on_sigterm="ignore") as proc:
        assert KafkaBroker(settings).stop(timeout=0.5) == proc.pid
        assert (settings.state_dir / "sigterm").read_text() == "got it"
        assert not psutil.pid_exists(proc.pid)


def test_stale_pid_files_are_not_a_running_broker(settings: BrokerSettings) -> None:
    settings.state_dir.mkdir(parents=True)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    for pid in (os.getpid(), finished.pid):  # alive but not our java; gone
        settings.pid_file.write_text(json.dumps({"pid": pid}))
        assert KafkaBroker(settings).status().running is False
        assert KafkaBroker(settings).stop() is None
        assert not settings.pid_file.exists()
    settings.pid_file.write_text("not json")
    assert KafkaBroker(settings).status().running is False


def test_server_properties_single_node_dev_cluster(settings: BrokerSettings) -> None:
    lines = server_properties(settings).splitlines()
    props = dict(line.split("=", 1) for line in lines)
    port, controller = settings.port, settings.controller_port
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}"
    assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{port}"
    assert props["controller.quorum.voters"] == f"1@127.0.0.1:{controller}"
    assert props["auto.create.topics.enable"] == "false"
    assert props["num.partitions"] == "3"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["log.dirs"] == str(settings.state_dir / "data")
    assert props["group.coordinator.append.linger.ms"] == "0"  # a commit is answered without waiting


def test_settings_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    monkeypatch.setenv("KOTEL_CACHE", str(tmp_path / "jars"))
    monkeypatch.setenv("KOTEL_KAFKA_VERSION", "4.0.0")
    monkeypatch.setenv("KOTEL_KAFKA_HEAP", "1g")
    s = BrokerSettings.from_env(port=19092, controller_port=None)
    assert (s.version, s.heap, s.port, s.controller_port) == ("4.0.0", "1g", 19092, 9093)
    assert (s.state_dir, s.jar_dir) == (tmp_path / "kafka", tmp_path / "jars" / "kafka-4.0.0")


def test_settings_reject_one_port_for_both(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="port and controller_port must differ, both are 9092"):
        BrokerSettings(state_dir=tmp_path, cache_root=tmp_path, controller_port=9092)


def test_cluster_id_is_kafka_uuid_text() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for text in ids:
        assert len(text) == 22 and not text.startswith("-")
        assert len(base64.urlsafe_b64decode(text + "==")) == 16


def test_cli_without_action_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: kotel kafka [-h] ACTION ...")
    for action in ("start", "stop", "status", "fetch"):
        assert f"    {action} " in out


@pytest.mark.parametrize("action", ["start", "stop", "status", "fetch"])
def test_every_action_has_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([action, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: kotel kafka {action} [-h]")


def test_cli_missing_java_is_a_one_line_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    port, controller = free_ports(2)  # fixed ones in the ephemeral range were taken by a client once
    assert main(["start", "--port", str(port), "--controller-port", str(controller)]) == 2
    assert capsys.readouterr() == ("", f"kotel kafka: {JAVA_MISSING}\n")


def test_cli_bad_port_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    assert main(["start", "--port", "70000"]) == 2
    assert (
        capsys.readouterr().err
        == "kotel kafka: invalid settings: port: Input should be less than or equal to 65535\n"
    )


def test_cli_status_when_nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    assert main(["status"]) == 1
    assert capsys.readouterr().out == (
        f"Kafka broker not running\n  log file: {tmp_path / 'kafka' / 'server.log'}\n"
        f"  data dir: {tmp_path / 'kafka' / 'data'}\n"
    )
