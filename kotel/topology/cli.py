"""`kotel topology validate|apply`."""

from __future__ import annotations

import argparse
import sys

from kotel.topology.errors import TopologyError
from kotel.topology.loader import load_topology


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("topology", help="validate a topology file or create its Kafka topics",
                                   description="Validate topology files and apply them to Kafka.")
    parser.set_defaults(subparser=parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    validate = actions.add_parser("validate", help="check files; exit 0 when valid, 2 with every error")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=_validate)

    apply = actions.add_parser(
        "apply", help="create missing topics, report drift (never deletes or shrinks)",
        description="Create the topics the topology needs; report existing topics whose settings differ.",
    )
    apply.add_argument("file", metavar="FILE")
    apply.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    apply.add_argument("--bootstrap", help="override kafka.bootstrap_servers")
    apply.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for Kafka (default 15)")
    apply.set_defaults(func=_apply)


def _validate(args: argparse.Namespace) -> int:
    status = 0
    for file in args.files:
        try:
            topology = load_topology(file)
        except TopologyError as exc:
            print(exc, file=sys.stderr)
            status = 2
            continue
        pipelines = len(topology.agent.service.pipelines) if topology.agent else 0
        print(f"{file}: valid ({pipelines} agent pipelines, {len(topology.planned_topics())} topics, "
              f"{len(topology.tenants)} tenants)")
    return status


def _apply(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from kotel.kafka.admin import create_topics, plan_topics

    try:
        topology = load_topology(args.file)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2
    conf = topology.kafka.librdkafka_config()
    if args.bootstrap:
        conf["bootstrap.servers"] = args.bootstrap
    admin = AdminClient(conf)
    try:
        plan = plan_topics(admin, topology.planned_topics(), timeout=args.timeout)
    except KafkaException as exc:
        print(f"cannot reach Kafka at {conf['bootstrap.servers']}: {exc.args[0].str()}", file=sys.stderr)
        return 1
    for line in plan.lines():
        print(line)
    if args.dry_run:
        print(f"dry run: {len(plan.create)} to create, {len(plan.drift)} drifted, nothing changed")
        return 0
    created = create_topics(admin, plan.create, timeout=args.timeout)
    if not plan.has_changes:
        print(f"no changes ({len(plan.unchanged)} topics up to date, {len(plan.drift)} drifted)")
    else:
        print(f"created {len(created)} topics ({len(plan.drift)} drifted, left as they are)")
    return 0
