"""`kotel up [--topology FILE]`: broker, topics, and every process of the topology, supervised."""

from __future__ import annotations

import argparse
import asyncio
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up", help="run the whole local pipeline (broker, topics, agent, stages, sinks); Ctrl-C stops it",
        description="Start (or reuse) the local broker, apply the topology's topics, then run the agent, "
                    "every stage worker and every sink it names as supervised child processes.",
    )
    parser.add_argument("--topology", default="topologies/dev.yaml", metavar="FILE")
    parser.add_argument("--no-broker", action="store_true",
                        help="do not start a local broker (use the topology's kafka.bootstrap_servers)")
    parser.set_defaults(func=_up)


def _available() -> dict[str, set[str]]:
    from kotel.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    out: dict[str, set[str]] = {}
    for name, sub in commands.items():
        firsts: set[str] = set()
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction) or (
                    not action.option_strings and action.choices and action.dest != "rest"):
                firsts |= set(action.choices)
            elif action.dest == "rest":
                firsts = {"__unavailable__"}
        out[name] = firsts
    return out


def _up(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient

    from kotel.kafka.admin import create_topics, plan_topics
    from kotel.kafka.broker import BrokerSettings, KafkaBroker, KafkaBrokerError
    from kotel.supervisor import Supervisor, plan_children
    from kotel.topology import TopologyError, load_topology

    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not args.no_broker:
        try:
            result = KafkaBroker(BrokerSettings.from_env()).start(timeout=90)
        except KafkaBrokerError as exc:
            print(f"kotel up: {exc}", file=sys.stderr)
            return 1
        print(f"kotel up: Kafka {result.status.version} on {result.status.bootstrap}"
              f"{' (already running)' if result.already_running else ''}")
    admin = AdminClient(topology.kafka.librdkafka_config())
    plan = plan_topics(admin, topology.planned_topics())
    created = create_topics(admin, plan.create)
    print(f"kotel up: topics: {len(created)} created, {len(plan.unchanged)} up to date, "
          f"{len(plan.drift)} drifted")
    children, skipped = plan_children(topology, args.topology, _available())
    for child in children:
        print(f"kotel up: {child.name:<22} {child.what}")
    for line in skipped:
        print(f"kotel up: skipped {line}")
    if topology.agent is not None:
        receivers = topology.agent.receivers.get("otlp")
        protocols = getattr(receivers, "protocols", None)
        if protocols is not None and protocols.grpc is not None:
            print(f"kotel up: send OTLP/gRPC to {protocols.grpc.endpoint}")
        if protocols is not None and protocols.http is not None:
            print(f"kotel up: send OTLP/HTTP to http://{protocols.http.endpoint}/v1/{{traces,metrics,logs}}")
        print(f"kotel up: agent metrics on http://{topology.agent.metrics_endpoint}/metrics")
    print("kotel up: logs in .kotel/logs/; Ctrl-C stops everything (the broker keeps running: make down)")
    asyncio.run(Supervisor(children).run())
    return 0
