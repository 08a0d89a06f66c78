"""`kotel loadtest run SCENARIO.yaml` and `kotel loadtest send` (the generator alone)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import datetime
from pathlib import Path

SIGNAL_NAMES = ("traces", "metrics", "logs")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "loadtest", help="drive the pipeline with generated OTLP and report loss, duplicates and latency",
        description="Load tests: `run` a scenario end to end, or `send` generated traffic to an endpoint.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    parser.set_defaults(subparser=parser)

    run = actions.add_parser("run", help="run a scenario (loadtest/scenarios/*.yaml) and write its report")
    run.add_argument("scenario", metavar="SCENARIO.yaml")
    run.add_argument("--results", metavar="DIR",
                     help="results folder (default .kotel/loadtest/<scenario>-<time>)")
    run.add_argument("--bootstrap", metavar="HOST:PORT",
                     help="use this running broker instead of starting one (no broker faults then)")
    run.add_argument("--keep-work", action="store_true",
                     help="keep the run's broker data, archive and logs (with --bootstrap: its topics) "
                          "even when it passed")
    run.add_argument("--arrivals", choices=("even", "aligned", "poisson"),
                     help="open-loop arrival model instead of the scenario's workload.arrivals")
    run.set_defaults(func=_run)

    send = actions.add_parser("send", help="send generated traffic to an agent (or raw topics) and say what")
    send.add_argument("--endpoint", required=True,
                      help="OTLP/gRPC host:port, http://host:port for OTLP/HTTP, or kafka://host:port")
    send.add_argument("--seconds", type=float, default=10.0)
    send.add_argument("--rate", type=float, default=1000.0, help="items/s per signal")
    send.add_argument("--signals", nargs="+", choices=SIGNAL_NAMES, default=list(SIGNAL_NAMES))
    send.add_argument("--prefix", default="kotel", help="topic prefix for kafka:// endpoints")
    send.add_argument("--tenants", nargs="+", default=["tenant-a", "tenant-b"])
    send.add_argument("--json", action="store_true", help="print the summary as JSON")
    send.set_defaults(func=_send)


def _run(args: argparse.Namespace) -> int:
    from loadtest.runner import run
    from loadtest.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.arrivals:
        workload = scenario.workload.model_copy(update={"arrivals": args.arrivals})
        scenario = scenario.model_copy(update={"workload": workload})
    results = Path(args.results) if args.results else \
        Path(".kotel/loadtest") / f"{scenario.name}-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        result, files = run(scenario, results.resolve(), args.bootstrap, keep_work=args.keep_work)
    except RuntimeError as exc:
        print(f"kotel loadtest: {exc}", file=sys.stderr)
        return 1
    print(files["markdown"].read_text())
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0 if result["passed"] else 1


def _send(args: argparse.Namespace) -> int:
    from loadtest.generator import Driver, Ledger, Shapes, make_target
    from loadtest.scenario import Rates, Workload

    endpoint: str = args.endpoint
    if endpoint.startswith("kafka://"):
        kind, address = "kafka", endpoint.removeprefix("kafka://")
    elif endpoint.startswith(("http://", "https://")):
        kind, address = "http", endpoint
    else:
        kind, address = "grpc", endpoint
    rates = {s: (args.rate if s in args.signals else 0.0) for s in SIGNAL_NAMES}
    workload = Workload(rates=Rates(**rates), tenants=args.tenants)
    ledger = Ledger([*workload.tenants, workload.unknown_tenant], run_tag=random.randrange(1, 1 << 15))
    target = make_target(kind, address, {"bootstrap.servers": address}, args.prefix)

    async def main() -> None:
        await target.start()
        try:
            shapes = Shapes(workload, ledger)
            driver = Driver(shapes, target, ledger, items_per_request=workload.items_per_request,
                            max_in_flight=workload.max_in_flight)
            await driver.run(rates, args.seconds)
        finally:
            await target.close()

    began = time.monotonic()
    asyncio.run(main())
    summary = {"endpoint": endpoint, "seconds": round(time.monotonic() - began, 1), "sent": ledger.summary(),
               "tenants": ledger.tenants}
    if args.json:
        print(json.dumps(summary))
    else:
        for signal, s in summary["sent"].items():
            if s["items"]:
                print(f"{signal:8s} {s['items']:>9,} items in {s['requests']:,} requests: "
                      f"{s['acked_items']:,} acknowledged, {s['refused_items']:,} refused, "
                      f"{s['duplicated_requests']} requests sent twice")
        print(f"tenants: {', '.join(ledger.tenants)} (the last is not routed); "
              f"{summary['seconds']} s to {endpoint}")
    failed = sum(s["refused_items"] for s in summary["sent"].values())
    return 1 if failed else 0
