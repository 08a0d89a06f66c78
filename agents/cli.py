"""`kotel agent --topology FILE`: the edge agent."""

from __future__ import annotations

import argparse
import asyncio
import sys

from kotel.logs import setup_logging
from kotel.topology import TopologyError, load_topology


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "agent", help="run the edge agent (OTLP in on :4317/:4318, Kafka out)",
        description="Run the edge agent of a topology: OTLP/gRPC and OTLP/HTTP receivers, the agent's "
                    "processors, batching, and durable publishing to Kafka with a Parquet spill.",
    )
    parser.add_argument("--topology", required=True, metavar="FILE",
                        help="topology file with an agent section")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line (time, level, logger, message) for log shippers")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    from agents.app import Agent
    from agents.pipelines import AgentConfigError

    try:
        topology = load_topology(args.topology)
        agent = Agent(topology, args.topology)
    except (TopologyError, AgentConfigError) as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        asyncio.run(agent.run())
    except AgentConfigError as exc:
        print(f"{args.topology}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use, a data dir we cannot write
        print(f"agent failed to start: {exc}", file=sys.stderr)
        return 1
    return 0
