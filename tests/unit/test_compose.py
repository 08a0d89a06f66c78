"""Static checks of docker-compose.yml, its configs and the Dockerfile.

No Docker engine runs here, so the files are parsed with PyYAML and checked for what `docker compose up`
would only reveal at run time: a dependency typo, a host port published twice, an undeclared volume, a
kotel command the CLI does not know, a topology that does not load. Each check returns its problems as
sentences; the negative tests feed broken input to the same functions and assert the exact sentence.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from tests.unit.compose_checks import (
    COMPOSE,
    DOCKERFILE,
    KAFKA,
    ROOT,
    HostPort,
    check_depends_on,
    check_dockerfile,
    check_healthchecks,
    check_image_or_build,
    check_kafka_target,
    check_kotel_build,
    check_kotel_commands,
    check_ports,
    check_volumes,
    host_ports,
    load_compose,
    structural_problems,
)

# --- the repository's files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from kotel.cli import build_parser

    return build_parser()


def test_compose_file_is_consistent_on_its_own() -> None:
    compose = load_compose(COMPOSE)
    assert structural_problems(compose) == []
    assert {"kafka", "kotel-init", "tempo", "prometheus", "loki", "grafana"} <= set(compose["services"])


def test_compose_runs_every_stage_its_topology_needs() -> None:
    from kotel.topology import load_topology

    services = load_compose(COMPOSE)["services"]
    gateway = load_topology(ROOT / "topologies" / "compose.yaml").gateway
    assert gateway is not None and gateway.tail_sampling is not None  # routing reads sampled traces
    assert {"kotel-agent", "kotel-dedup", "kotel-tail", "kotel-route"} <= set(services)


def test_kotel_commands_are_registered_in_the_cli(parser: argparse.ArgumentParser) -> None:
    assert check_kotel_commands(load_compose(COMPOSE)["services"], parser) == []


def test_kotel_services_reach_kafka_through_a_valid_topology() -> None:
    from kotel.topology import load_topology

    assert check_kafka_target(load_compose(COMPOSE)["services"], ROOT, load_topology) == []


def test_dockerfile_installs_kotel_on_python_311_and_runs_it_unprivileged() -> None:
    assert check_dockerfile(DOCKERFILE.read_text(encoding="utf-8")) == []


def test_backend_configs_match_what_the_sinks_need() -> None:
    services = load_compose(COMPOSE)["services"]
    assert "--web.enable-remote-write-receiver" in services["prometheus"]["command"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    assert prometheus["storage"]["tsdb"]["out_of_order_time_window"]
    tempo = yaml.safe_load((ROOT / "deploy/tempo/tempo.yaml").read_text(encoding="utf-8"))
    protocols = tempo["distributor"]["receivers"]["otlp"]["protocols"]
    assert {name: p["endpoint"] for name, p in protocols.items()} == {
        "grpc": "0.0.0.0:4317", "http": "0.0.0.0:4318"}
    provisioning = ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml"
    sources = yaml.safe_load(provisioning.read_text(encoding="utf-8"))["datasources"]
    assert {s["type"]: re.sub(r":\d+$", "", s["url"].removeprefix("http://")) for s in sources} == {
        "prometheus": "prometheus", "tempo": "tempo", "loki": "loki"}
    assert {"prometheus", "tempo", "loki"} <= set(services)


# --- every check can fail -----------------------------------------------------------------------------------


def test_a_service_without_image_or_build_is_reported() -> None:
    assert check_image_or_build({"kafka": {"ports": ["9092:9092"]}}) == [
        "service 'kafka' has neither 'image' nor 'build'"]


def test_broken_dependencies_are_reported() -> None:
    done = {"condition": "service_completed_successfully"}
    services = {"kafka": {"image": "k"},
                "kotel-init": {"build": ".", "depends_on": ["kafkaa"], "restart": "always"},
                "agent": {"image": "a", "depends_on": {"kafka": {"condition": "service_healthy"},
                                                       "kotel-init": done}},
                "sink": {"image": "s", "depends_on": {"agent": {"condition": "service_ready"}}},
                "a": {"image": "a", "depends_on": ["b"]}, "b": {"image": "b", "depends_on": ["a"]}}
    assert check_depends_on(services) == [
        "service 'kotel-init' depends on 'kafkaa', which is not defined",
        "service 'agent' waits for 'kafka' to be healthy, but 'kafka' has no healthcheck",
        "service 'agent' waits for 'kotel-init' to complete, but 'kotel-init' has restart 'always' "
        "instead of \"no\"",
        "service 'sink' waits for 'agent' with unknown condition 'service_ready'",
        "depends_on cycle: a -> b -> a",
    ]


def test_missing_healthchecks_are_reported_except_for_one_shot_jobs() -> None:
    ok = {"test": ["CMD", "true"]}
    services = {"init": {"build": ".", "restart": "no"}, "job": {"build": ".", "restart": False},
                "agent": {"image": "a", "healthcheck": ok, "depends_on": {
                    "init": {"condition": "service_completed_successfully"}, "job": None}},
                "tempo": {"image": "t"}, "loki": {"image": "l", "healthcheck": {**ok, "disable": True}}}
    assert check_healthchecks(services) == [
        f"service '{name}' has no healthcheck (only a one-shot job, restart \"no\" and awaited with "
        "service_completed_successfully, may go without)" for name in ("job", "tempo", "loki")]


@pytest.mark.parametrize(("entry", "expected"), [
    ("9090", []),
    (9090, []),
    ("9092:19092", [HostPort("", 9092, "tcp")]),
    ("127.0.0.1:3000:3000/udp", [HostPort("127.0.0.1", 3000, "udp")]),
    ("[::1]:8000-8002:80", [HostPort("[::1]", port, "tcp") for port in (8000, 8001, 8002)]),
    ("127.0.0.1::80", []),
    ({"target": 80, "published": "8080", "host_ip": "10.0.0.1"}, [HostPort("10.0.0.1", 8080, "tcp")]),
    ({"target": 4317}, []),
])
def test_port_syntaxes_are_understood(entry: object, expected: list[HostPort]) -> None:
    assert host_ports(entry) == expected


def test_port_clashes_and_bad_port_entries_are_reported() -> None:
    services = {"agent": {"image": "a", "ports": ["4317:4317", "127.0.0.1:8888:8888"]},
                "tempo": {"image": "t", "ports": [{"target": 4317, "published": 4317},
                                                  "4316-4318:4316-4318/udp"]},
                "debug": {"image": "d", "ports": ["127.0.0.2:8888:8888", "8887-8889:80", "80:http",
                                                  {"target": "x"}]}}
    assert check_ports(services) == [
        "host port 4317/tcp is published by both 'agent' and 'tempo'",
        "host port 8888/tcp is published by both 'agent' and 'debug'",
        "host port 8888/tcp is published twice by 'debug'",
        "service 'debug': invalid port mapping '80:http'",
        "service 'debug': invalid port mapping {'target': 'x'}",
    ]


def test_undeclared_volumes_and_missing_bind_sources_are_reported(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    compose = {"volumes": {"kafka-data": None}, "services": {"kafka": {"image": "k", "volumes": [
        "kafka-data:/var/lib/kafka/data", "kafka-dat:/x", "./deploy:/etc/deploy:ro", "./nowhere.yaml:/etc/n",
        {"type": "volume", "source": "logs", "target": "/logs"}, "/scratch"]}}}
    assert check_volumes(compose, tmp_path) == [
        "service 'kafka' mounts volume 'kafka-dat', which is not declared under top-level 'volumes'",
        "service 'kafka' mounts ./nowhere.yaml, which does not exist",
        "service 'kafka' mounts volume 'logs', which is not declared under top-level 'volumes'",
    ]


def test_kotel_services_must_build_the_repo_dockerfile() -> None:
    services = {"kotel-init": {"image": "kotel:dev"}, "kotel-agent": {"build": {"context": "deploy"}},
                "kotel-sink": {"build": {"context": ".", "dockerfile": "Dockerfile.dev"},
                               "entrypoint": "python"},
                "kotel-ok": {"build": "."}}
    assert check_kotel_build(services, ROOT) == [
        "service 'kotel-init' runs image 'kotel:dev' without building it from the repo Dockerfile",
        "service 'kotel-agent' builds 'Dockerfile' in context 'deploy', not the repo Dockerfile",
        "service 'kotel-sink' builds 'Dockerfile.dev' in context '.', not the repo Dockerfile",
        "service 'kotel-sink' replaces the image's kotel entrypoint",
    ]


def test_unknown_or_malformed_kotel_commands_are_reported() -> None:
    cli = argparse.ArgumentParser(prog="kotel")
    cli.add_subparsers(dest="command").add_parser("topology").add_subparsers(dest="action").add_parser(
        "apply").add_argument("file")
    services = {"init": {"build": ".", "command": ["topology", "apply", "/etc/kotel/topology.yaml"]},
                "typo": {"build": ".", "command": "topology apply /etc/t.yaml --dry-rn"},
                "no-file": {"build": ".", "command": ["topology", "apply"]},
                "agent": {"build": ".", "command": ["agent", "--topology", "/t.yaml"]},
                "idle": {"build": "."}}
    assert check_kotel_commands(services, cli) == [
        "service 'typo' runs 'kotel topology apply /etc/t.yaml --dry-rn', which the CLI rejects: "
        "unrecognized arguments: --dry-rn",
        "service 'no-file' runs 'kotel topology apply', which the CLI rejects: "
        "the following arguments are required: file",
        "service 'agent' runs 'kotel agent', but the CLI has no such subcommand (it has: topology)",
        "service 'idle' has no command, so kotel would only print its help",
    ]


def test_kotel_services_not_pointing_at_kafka_are_reported(tmp_path: Path) -> None:
    from kotel.topology import load_topology

    good = (ROOT / "topologies" / "compose.yaml").read_text(encoding="utf-8")
    assert KAFKA in good
    (tmp_path / "local.yaml").write_text(good.replace(KAFKA, "localhost:9092"), encoding="utf-8")
    (tmp_path / "broken.yaml").write_text("kafka: [", encoding="utf-8")
    local, broken = ["./local.yaml:/etc/t.yaml"], ["./broken.yaml:/etc/t.yaml"]
    services = {
        "local": {"build": ".", "command": ["topology", "apply", "/etc/t.yaml"], "volumes": local},
        "flag": {"build": ".", "command": ["topology", "apply", "/etc/t.yaml", "--bootstrap", "kafka:9093"],
                 "volumes": local, "environment": {"KOTEL_KAFKA_BOOTSTRAP": KAFKA}},
        "broken": {"build": ".", "command": ["--topology=/etc/t.yaml"], "volumes": broken},
        "bare": {"build": ".", "command": ["agent"], "environment": ["KOTEL_KAFKA_BOOTSTRAP=localhost:9092"]},
        "env-only": {"build": ".", "command": ["agent"], "environment": {"BOOTSTRAP": KAFKA}},
    }
    problems = check_kafka_target(services, tmp_path, load_topology)
    assert problems[:2] == [
        "service 'local' reads ./local.yaml, whose kafka.bootstrap_servers is 'localhost:9092', "
        "not 'kafka:9092'",
        "service 'flag' reads ./local.yaml, whose kafka.bootstrap_servers is 'kafka:9093', not 'kafka:9092'",
    ]
    # The rest of this sentence is TopologyError's, which its own tests pin down.
    assert problems[2].startswith(f"service 'broken' reads ./broken.yaml, which does not load: {tmp_path}/")
    assert problems[3:] == ["service 'bare' names no mounted topology and no environment value 'kafka:9092'"]


@pytest.mark.parametrize(("dockerfile", "expected"), [
    ('FROM python:3.12-slim\nRUN pip install .\nUSER app\nENTRYPOINT ["kotel"]\n',
     ["Dockerfile stage FROM 'python:3.12-slim' is not python:3.11*"]),
    ('FROM python:3.11-slim AS build\nRUN pip install -r requirements.txt \\\n  # kotel\n'
     '  && pip install kotel\nFROM build\nUSER 10001\nENTRYPOINT [ "kotel" ]\n',
     ["Dockerfile never runs 'pip install .'"]),
    ("FROM python:3.11-slim\nRUN python -m pip install --no-cache-dir . && true\nENTRYPOINT kotel\n",
     ['Dockerfile ENTRYPOINT is kotel, expected ["kotel"] (exec form)',
      "Dockerfile final stage runs as root: add a USER that is not root"]),
    ('FROM python:3.11-slim AS build\nRUN /opt/venv/bin/pip install .\nUSER app\nENTRYPOINT ["kotel"]\n'
     "FROM --platform=linux/amd64 python:3.11\n# USER app\nUSER root:root\n",
     ["Dockerfile final stage has no ENTRYPOINT",
      "Dockerfile final stage runs as root: add a USER that is not root"]),
])
def test_dockerfile_mistakes_are_reported(dockerfile: str, expected: list[str]) -> None:
    assert check_dockerfile(dockerfile) == expected
