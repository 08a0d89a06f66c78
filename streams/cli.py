"""`kotel worker {dedup,tail,route} --topology FILE`: one worker of a stream stage.

tail is a Faust worker (tables in RocksDB); dedup and route run on `streams.kafka_stage` (librdkafka in
and out; dedup keeps its RocksDB state and changelog itself).

Also runnable without the entry point as ``python -m streams.cli worker dedup --topology FILE``.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from kotel import paths
from kotel.logs import setup_logging
from kotel.topology import Topology, TopologyError, load_topology

# Stage name -> "module:function" binding to a Faust app; imported only when that stage runs.
STAGES = {"tail": "streams.stages.tail:bind"}
# Stage name -> "module:function" running a stage without Faust: (topology, data_dir, web_port) -> exit code.
KAFKA_STAGES = {"dedup": "streams.stages.dedup:run", "route": "streams.stages.routing:run"}

log = logging.getLogger("kotel.worker")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "worker", help="run a stream stage worker (dedup, tail, route)",
        description="Run one worker of a stream stage (tail on Faust, dedup and route on librdkafka). "
                    "Workers of a stage started with the same topology form one consumer group and share "
                    "the partitions.",
    )
    parser.add_argument("stage", choices=sorted({*STAGES, *KAFKA_STAGES}), help="the stage to run")
    parser.add_argument("--topology", required=True, metavar="FILE", help="topology file")
    parser.add_argument("--web-port", type=int, metavar="N",
                        help="port of /metrics on 127.0.0.1 (default: a free port, written to "
                             "DATA_DIR/web_port)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="RocksDB state of this worker (default $KOTEL_HOME/worker/<prefix>-<stage>); "
                             "each worker on a host needs its own")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line (time, level, logger, message) for log shippers")
    parser.set_defaults(func=_run)


def load_binding(stage: str) -> Callable[..., Any]:
    module, _, name = {**STAGES, **KAFKA_STAGES}[stage].partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _lock(data_dir: Path) -> IO[str] | None:
    """Hold ``data_dir/.lock`` for the life of the process; None when another worker holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / ".lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    try:
        topology: Topology = load_topology(args.topology)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir) if args.data_dir else paths.home() / "worker" / (
        f"{topology.topics.prefix}-{args.stage}")
    lock = _lock(data_dir)
    if lock is None:
        print(f"{data_dir} is in use by another worker; give each worker its own --data-dir",
              file=sys.stderr)
        return 2
    from kotel import gc_pauses, heap
    from streams.app import SettledWorker, create_app

    if heap.fix_mmap_threshold():
        log.info("glibc's mmap threshold fixed at %d bytes: freed fetch buffers go back to the system",
                 heap.MMAP_THRESHOLD)

    try:
        bind = load_binding(args.stage)
    except (ImportError, AttributeError) as exc:
        print(f"stage {args.stage!r} is not available: {exc}", file=sys.stderr)
        return 2
    if args.stage in KAFKA_STAGES:
        try:
            return int(bind(topology, data_dir, args.web_port))
        except ValueError as exc:  # the topology has nothing for this stage to do
            print(exc, file=sys.stderr)
            return 2
        finally:
            lock.close()
    app = create_app(topology, args.stage, data_dir=data_dir, web_port=args.web_port)
    bind(app, topology)
    log.info("worker %s of %s: data %s, metrics http://127.0.0.1:%d/metrics", args.stage, args.topology,
             data_dir, app.web_port)  # type: ignore[attr-defined]
    gc_pauses.settle()  # and again once the worker is up
    worker = SettledWorker(app, loglevel=args.log_level, override_logging=False, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        lock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streams.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
