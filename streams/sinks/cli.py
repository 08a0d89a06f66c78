"""`kotel sink NAME --topology FILE`: deliver tenant topics to one backend of the gateway section."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from kotel.logs import setup_logging
from kotel.topology import TopologyError, load_topology


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sink", help="deliver tenant topics to a backend (commit after the backend accepted)",
        description="Run one sink: NAME is an exporter of the topology's gateway section, for example "
                    "file/archive, otlp/tempo, prometheusremotewrite or loki.",
    )
    parser.add_argument("name", metavar="NAME", help="exporter name in gateway.exporters")
    parser.add_argument("--topology", required=True, metavar="FILE")
    parser.add_argument("--metrics-endpoint", default="127.0.0.1:0",
                        help="host:port for /metrics, /healthz, /readyz (port 0: any free port)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    from streams.sinks.factory import SinkConfigError, build_deliverer
    from streams.sinks.runtime import SinkRunner

    try:
        topology = load_topology(args.topology)
        runner = SinkRunner(topology, build_deliverer(topology, args.name))
    except (TopologyError, SinkConfigError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if not runner.topics:
        print(f"{args.topology}: no tenant is routed to sink {args.name!r} (gateway.processors.routing)",
              file=sys.stderr)
        return 2
    asyncio.run(_serve(runner, args.metrics_endpoint))
    return 0


async def _serve(runner: object, endpoint: str) -> None:
    from kotel.admin_http import AdminServer
    from streams.sinks.runtime import SinkRunner

    assert isinstance(runner, SinkRunner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    admin = AdminServer(endpoint, runner.metrics.registry, lambda: (not stop.is_set(), runner.name))
    await admin.start()
    url = f"http://{admin.host}:{admin.port}/metrics"
    print(f"sink {runner.name}: metrics on {url}", file=sys.stderr, flush=True)
    try:
        await runner.run(stop)
    finally:
        await runner.deliverer.close()
        await admin.stop()
