"""Static checks of docker-compose.yml, its configs and the Dockerfile.

No Docker engine runs here, so the files are parsed with PyYAML and checked for what `docker compose up`
would only reveal at run time: a dependency typo, a host port published twice, an undeclared volume, a
kotel command the CLI does not know, a topology that does not load. Each check returns its problems as
sentences; the negative tests feed broken input to the same functions and assert the exact sentence.
"""

from __future__ import annotations

import argparse
import contextlib
import graphlib
import io
import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
KAFKA = "kafka:9092"

CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
Services = Mapping[str, Mapping[str, Any]]


def load_compose(*paths: Path) -> dict[str, Any]:
    """Merge the way `docker compose -f a -f b` does for files that define different services."""
    merged: dict[str, Any] = {"services": {}, "volumes": {}}
    for path in paths:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for section in ("services", "volumes"):
            merged[section].update(data.get(section) or {})
    return merged


def dependencies(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def restart_policy(service: Mapping[str, Any]) -> str:
    restart = service.get("restart", "no")
    return "no" if restart is False else str(restart)  # YAML 1.1 reads an unquoted `no` as False


def has_healthcheck(service: Mapping[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable") and check.get("test") != ["NONE"]


def check_image_or_build(services: Services) -> list[str]:
    return [f"service '{name}' has neither 'image' nor 'build'"
            for name, svc in services.items() if "image" not in svc and "build" not in svc]


def check_depends_on(services: Services) -> list[str]:
    problems, graph = [], {}
    for name, svc in services.items():
        graph[name] = [dep for dep in dependencies(svc) if dep in services]
        for dep, condition in dependencies(svc).items():
            if dep not in services:
                problems.append(f"service '{name}' depends on '{dep}', which is not defined")
            elif condition not in CONDITIONS:
                problems.append(f"service '{name}' waits for '{dep}' with unknown condition '{condition}'")
            elif condition == "service_healthy" and not has_healthcheck(services[dep]):
                problems.append(f"service '{name}' waits for '{dep}' to be healthy, but '{dep}' has no "
                                "healthcheck")
            elif condition == "service_completed_successfully" and restart_policy(services[dep]) != "no":
                problems.append(f"service '{name}' waits for '{dep}' to complete, but '{dep}' has "
                                f"restart '{restart_policy(services[dep])}' instead of \"no\"")
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        problems.append(f"depends_on cycle: {' -> '.join(exc.args[1])}")
    return problems


def check_healthchecks(services: Services) -> list[str]:
    """Every service has one, except a one-shot job: an explicit restart "no", awaited (if at all) only
    with service_completed_successfully, since nothing can wait for such a job to be healthy."""
    problems = []
    for name, svc in services.items():
        awaited = {dependencies(other).get(name) for other in services.values()} - {None}
        one_shot = svc.get("restart") in ("no", False) and awaited <= {"service_completed_successfully"}
        if not has_healthcheck(svc) and not one_shot:
            problems.append(f"service '{name}' has no healthcheck (only a one-shot job, restart \"no\" and "
                            "awaited with service_completed_successfully, may go without)")
    return problems


@dataclass(frozen=True)
class HostPort:
    ip: str  # "" binds every interface
    port: int
    protocol: str


_SHORT_PORT = re.compile(r"(?:(?P<ip>\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):)?"
                         r"(?:(?P<published>\d+(?:-\d+)?)?:)?(?P<target>\d+(?:-\d+)?)(?:/(?P<protocol>tcp|udp|sctp))?")
_ANY_IP = ("", "0.0.0.0", "[::]")


def host_ports(entry: object) -> list[HostPort]:
    """The host ports one `ports:` entry publishes (none when Docker picks an ephemeral one)."""
    if isinstance(entry, Mapping):
        ip, protocol = entry.get("host_ip", ""), entry.get("protocol", "tcp")
        published = entry.get("published")
        if not re.fullmatch(r"\d+ (\d+(-\d+)?)?", f"{entry.get('target')} {published or ''}"):
            raise ValueError(f"invalid port mapping {dict(entry)!r}")
    elif match := _SHORT_PORT.fullmatch(str(entry)):
        ip, published, protocol = match["ip"] or "", match["published"], match["protocol"] or "tcp"
    else:
        raise ValueError(f"invalid port mapping {entry!r}")
    first, _, last = str(published or "").partition("-")
    ports = range(int(first), int(last or first) + 1) if first else range(0)
    return [HostPort(str(ip), port, str(protocol)) for port in ports]


def check_ports(services: Services) -> list[str]:
    problems: list[str] = []
    taken: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for name, svc in services.items():
        for entry in svc.get("ports") or []:
            try:
                ports = host_ports(entry)
            except ValueError as exc:
                problems.append(f"service '{name}': {exc}")
                continue
            for hp in ports:
                owners = taken.setdefault((hp.port, hp.protocol), [])
                for other, ip in owners:
                    if ip == hp.ip or ip in _ANY_IP or hp.ip in _ANY_IP:
                        who = f"twice by '{name}'" if other == name else f"by both '{other}' and '{name}'"
                        problems.append(f"host port {hp.port}/{hp.protocol} is published {who}")
                owners.append((name, hp.ip))
    return problems


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) of each `volumes:` entry, short or long syntax."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, Mapping):
            out.append((str(entry.get("type", "volume")), str(entry.get("source", "")), str(entry["target"])))
        elif len(parts := str(entry).split(":")) == 1:
            out.append(("volume", "", parts[0]))  # anonymous volume
        else:
            out.append(("bind" if parts[0].startswith((".", "/", "~")) else "volume", parts[0], parts[1]))
    return out


def check_volumes(compose: Mapping[str, Any], project_dir: Path) -> list[str]:
    declared, problems = set(compose.get("volumes") or {}), []
    for name, svc in compose["services"].items():
        for kind, source, _ in mounts(svc):
            if kind == "volume" and source and source not in declared:
                problems.append(f"service '{name}' mounts volume '{source}', which is not declared "
                                "under top-level 'volumes'")
            if kind == "bind" and not (project_dir / source).exists():
                problems.append(f"service '{name}' mounts {source}, which does not exist")
    return problems


def kotel_services(services: Services) -> dict[str, Mapping[str, Any]]:
    return {name: svc for name, svc in services.items()
            if "build" in svc or str(svc.get("image", "")).startswith("kotel")}


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def check_kotel_build(services: Services, project_dir: Path) -> list[str]:
    problems = []
    for name, svc in kotel_services(services).items():
        if (build := svc.get("build")) is None:
            problems.append(f"service '{name}' runs image '{svc.get('image')}' without building it from the "
                            "repo Dockerfile")
            continue
        context, dockerfile = (build, "Dockerfile") if isinstance(build, str) else (
            build.get("context", "."), build.get("dockerfile", "Dockerfile"))
        if (project_dir / context / dockerfile).resolve() != DOCKERFILE:
            problems.append(f"service '{name}' builds '{dockerfile}' in context '{context}', not the repo "
                            "Dockerfile")
        if "entrypoint" in svc:
            problems.append(f"service '{name}' replaces the image's kotel entrypoint")
    return problems


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    # argparse has no public accessor for registered subparsers.
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def cli_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            return stderr.getvalue().strip().splitlines()[-1].split(": error: ", 1)[-1]
    return None


def check_kotel_commands(services: Services, parser: argparse.ArgumentParser) -> list[str]:
    problems, known = [], subcommands(parser)
    for name, svc in kotel_services(services).items():
        if not (argv := command_of(svc)):
            problems.append(f"service '{name}' has no command, so kotel would only print its help")
        elif argv[0] not in known:
            problems.append(f"service '{name}' runs 'kotel {argv[0]}', but the CLI has no such subcommand "
                            f"(it has: {', '.join(sorted(known))})")
        elif argv[0] in known and (error := cli_error(parser, argv)) is not None:
            problems.append(f"service '{name}' runs 'kotel {shlex.join(argv)}', which the CLI rejects: "
                            f"{error}")
    return problems


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def check_kafka_target(services: Services, project_dir: Path, load: Callable[..., Any]) -> list[str]:
    """Each kotel service reaches kafka:9092: through the topology its command names (loaded with the
    container's environment, as the process would) or, without one, through an environment value."""
    from kotel.topology import TopologyError

    problems = []
    for name, svc in kotel_services(services).items():
        argv, env = command_of(svc), environment_of(svc)
        tokens = set(argv) | {arg.split("=", 1)[-1] for arg in argv}
        files = [source for kind, source, target in mounts(svc) if kind == "bind" and target in tokens]
        if not files and not any(KAFKA in value.split(",") for value in env.values()):
            problems.append(f"service '{name}' names no mounted topology and no environment value '{KAFKA}'")
        for source in files:
            try:
                servers = str(load(project_dir / source, env=env).kafka.bootstrap_servers)
            except TopologyError as exc:
                problems.append(f"service '{name}' reads {source}, which does not load: {exc}")
                continue
            if "--bootstrap" in argv[:-1]:
                servers = argv[argv.index("--bootstrap") + 1]
            if KAFKA not in [server.strip() for server in servers.split(",")]:
                problems.append(f"service '{name}' reads {source}, whose kafka.bootstrap_servers is "
                                f"'{servers}', not '{KAFKA}'")
    return problems


def dockerfile_stages(text: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(base image, stage name, [(KEYWORD, arguments)]) per stage; continuations joined, comments dropped."""
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    joined = re.sub(r"\\\n", " ", re.sub(r"^\s*#.*\n", "", text, flags=re.M))
    for line in filter(str.strip, joined.splitlines()):
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            stages.append((words[0], words[2] if len(words) == 3 else "", []))
        elif stages:
            stages[-1][2].append((keyword.upper(), args.strip()))
    return stages


def exec_form(args: str) -> object:
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(args)
    return None  # shell form


_PIP_INSTALL_DOT = re.compile(r"(^|[\s/])pip3?\s+install\s+(?:[^&;|]*\s)?\.(\[[^\]]*\])?(\s|$)")


def check_dockerfile(text: str) -> list[str]:
    stages, problems = dockerfile_stages(text), []
    names = {name for _, name, _ in stages}
    problems += [f"Dockerfile stage FROM '{base}' is not python:3.11*" for base, _, _ in stages
                 if base not in names and not base.startswith("python:3.11")]
    if not any(kw == "RUN" and _PIP_INSTALL_DOT.search(args) for _, _, body in stages for kw, args in body):
        problems.append("Dockerfile never runs 'pip install .'")
    final = stages[-1][2] if stages else []
    entrypoints = [args for keyword, args in final if keyword == "ENTRYPOINT"]
    if not entrypoints:
        problems.append("Dockerfile final stage has no ENTRYPOINT")
    elif exec_form(entrypoints[-1]) != ["kotel"]:
        problems.append(f"Dockerfile ENTRYPOINT is {entrypoints[-1]}, expected [\"kotel\"] (exec form)")
    users = [args.split(":")[0] for keyword, args in final if keyword == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("Dockerfile final stage runs as root: add a USER that is not root")
    return problems


def structural_problems(compose: Mapping[str, Any]) -> list[str]:
    services = compose["services"]
    return (check_image_or_build(services) + check_depends_on(services) + check_healthchecks(services)
            + check_ports(services) + check_volumes(compose, ROOT) + check_kotel_build(services, ROOT))


