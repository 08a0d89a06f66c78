"""`kotel replay`: re-deliver a topic's history (or a spill's / archive's) to a topic, a sink or Parquet.

Also runnable without the entry point as ``python -m streams.replay.cli --topic ... --to-topic ...``.
Exit status: 0 done, 1 the target or Kafka failed mid-way (resume later), 2 bad input (nothing was
sent), 130 interrupted (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaException
from rich.console import Console

from kotel.kafka.topics import SIGNALS
from streams.replay.job import Job, prepare
from streams.replay.progress import Display, RateLimiter
from streams.replay.report import print_result
from streams.replay.runner import Interrupted, ReplayResult, TargetRefused, replay
from streams.replay.timespec import ReplayError, parse_duration

EXAMPLES = """examples:
  kotel replay --topic kotel.tenant.acme.traces --from -2h --to-sink otlp/tempo --topology gw.yaml
  kotel replay --topic kotel.raw.traces --from-offset 0:1200,1:900 --to-topic kotel.raw.traces
  kotel replay --topic kotel.deadletter --redrive --reason 'remote write 400'
  kotel replay --from-parquet .kotel/agent/spill --to-origin
  kotel replay --topic kotel.raw.logs --from 2024-06-01T00:00:00Z --to 2024-06-02T00:00:00Z --dry-run

Interrupted (Ctrl-C, kill -9)? Run the same command with --resume: nothing is skipped, and the chunk in
flight may be delivered again. Into a raw topic, dedup drops those repeats; Prometheus takes the same
sample at the same timestamp as a no-op; Loki drops identical entries; the archive holds the rows twice.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse reads "-2h" as an unknown option unless it looks like a negative number; relative times
    # are values here (`--from -2h`, as the issue and every log tool write them), so they look like one.
    parser._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?[smhdw]?$")
    source = parser.add_argument_group("source (one of)").add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--topic", metavar="NAME", help="a Kafka topic (raw, deduped, sampled, tenant, deadletter)"
    )
    source.add_argument(
        "--from-parquet", metavar="PATH", help="an agent spill directory or a Parquet archive root"
    )
    rng = parser.add_argument_group("range (Kafka source; the end is fixed when the replay starts)")
    rng.add_argument(
        "--partitions", metavar="LIST", help="partitions to replay, such as 0,2 or 0-3 (default all)"
    )
    start = rng.add_mutually_exclusive_group()
    start.add_argument(
        "--from-offset", metavar="OFFSET", help="first offset: 1200 (every partition) or 0:1200,2:900"
    )
    start.add_argument(
        "--from",
        dest="from_time",
        metavar="TIME",
        help="first record at or after TIME: ISO-8601 (naive = UTC) or relative (-30m, -2h, -1d)",
    )
    start.add_argument(
        "--from-group",
        metavar="GROUP",
        help="from that consumer group's committed position (read, never joined)",
    )
    end = rng.add_mutually_exclusive_group()
    end.add_argument("--to-offset", metavar="OFFSET", help="end offset, excluded: 5000 or 0:5000,2:4100")
    end.add_argument(
        "--to", dest="to_time", metavar="TIME", help="stop before the first record at or after TIME"
    )
    target = parser.add_argument_group("target (one of)").add_mutually_exclusive_group()
    target.add_argument(
        "--to-topic", metavar="NAME", help="a topic (idempotent producer, acks=all, keys and headers kept)"
    )
    target.add_argument("--to-sink", metavar="NAME", help="an exporter of the gateway section of --topology")
    target.add_argument(
        "--to-parquet", metavar="DIR", help="a Parquet file set with the archive's layout and schema"
    )
    target.add_argument(
        "--to-origin",
        action="store_true",
        help="each record to the topic it names (a spill's or archive's topic column)",
    )
    target.add_argument(
        "--redrive",
        action="store_true",
        help="dead letters back to their origin topic (kotel.dlq.topic), without the kotel.dlq.* headers",
    )
    filters = parser.add_argument_group("filters")
    filters.add_argument(
        "--tenant", metavar="T", help="only this tenant (header kotel.tenant or tenant topic name)"
    )
    filters.add_argument("--signal", choices=SIGNALS, help="only this signal")
    filters.add_argument(
        "--reason", metavar="TEXT", help="only dead letters whose kotel.dlq.reason contains TEXT"
    )
    conn = parser.add_argument_group("connection")
    conn.add_argument("--topology", metavar="FILE", help="topology file (Kafka settings, prefix, sinks)")
    conn.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: the topology's, else $KOTEL_BOOTSTRAP, else 127.0.0.1:9092)",
    )
    conn.add_argument("--prefix", help="topic prefix (default: the topology's, else kotel)")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--dry-run", action="store_true", help="read and count the range per partition, send nothing"
    )
    run.add_argument(
        "--checkpoint", metavar="FILE", help="checkpoint file (default $KOTEL_HOME/replay/<job>.json)"
    )
    run.add_argument(
        "--resume", action="store_true", help="continue the interrupted replay of its checkpoint"
    )
    run.add_argument(
        "--fresh", action="store_true", help="start over although an unfinished checkpoint exists"
    )
    run.add_argument(
        "--max-rate", type=_positive(float), metavar="N", help="at most N records/s to the target"
    )
    run.add_argument(
        "--batch",
        type=_positive(int),
        default=1000,
        metavar="N",
        help="records per chunk: one delivery and one checkpoint write (default 1000)",
    )
    run.add_argument(
        "--retry-for",
        default="5m",
        metavar="DURATION",
        help="give up when the target refuses for this long (default 5m; 0 = never)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress, no tables")
    run.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end")


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "replay",
        help="re-deliver a topic's history by offset or time to a topic, a sink or Parquet",
        description="Replay records by manual partition assignment (no consumer group is joined, no offset "
        "committed), checkpointed per partition after each acknowledged chunk.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kotel replay", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except KeyboardInterrupt:  # before the replay loop installed its own handler
        return 130


def run(args: argparse.Namespace) -> int:
    stream = sys.stderr if args.json else sys.stdout
    out = Console(
        file=stream, quiet=args.quiet, highlight=False, soft_wrap=True, width=None if stream.isatty() else 160
    )
    try:
        retry_for = parse_duration(args.retry_for, "--retry-for")
        job = prepare(args)
    except ReplayError as exc:
        print(f"kotel replay: {exc}", file=sys.stderr)
        return 2
    _header(out, job)
    if job.already_done:
        out.print(f"replay {job.id} is already complete: nothing left to send")
        result = ReplayResult(job.units, 0.0, True)
    else:
        if job.checkpoint is not None:
            job.checkpoint.save()  # the fixed range is on disk before the first record is sent
        try:
            result = asyncio.run(_execute(job, args, retry_for))
        except (Interrupted, KeyboardInterrupt):
            _resume_hint(job, "interrupted")
            return 130
        except TargetRefused as exc:
            _resume_hint(job, str(exc))
            return 1
        except (KafkaException, RuntimeError, OSError) as exc:
            _resume_hint(job, f"failed: {exc}")
            return 1
    if args.json:
        print(json.dumps(result.summary(**job.about()), indent=1))
    else:
        print_result(out, result, dry_run=job.dry_run, seconds=result.seconds)
    if not result.complete:
        _resume_hint(job, "interrupted")
        return 130
    return 0


def _header(out: Console, job: Job) -> None:
    if job.uses_kafka_source:
        out.print(
            f"kotel replay: reading {job.source_text} by manual partition assignment (no consumer group "
            "joined, no offset committed): live consumer groups are not disturbed"
        )
    else:
        out.print(f"kotel replay: reading {job.source_text} (Parquet files, no Kafka consumer)")
    where = f", checkpoint {job.checkpoint.path}" if job.checkpoint else ""
    action = "dry run, nothing is sent" if job.dry_run else f"to {job.target_text}"
    out.print(f"job {job.id}: {action}{where}")
    for note in job.notes:
        out.print(f"note: {note}")


def _resume_hint(job: Job, why: str) -> None:
    where = f": rerun with --resume to continue from {job.checkpoint.path}" if job.checkpoint else ""
    print(f"kotel replay: {why}{where}", file=sys.stderr)


async def _execute(job: Job, args: argparse.Namespace, retry_for: float) -> ReplayResult:
    from kotel.topology.exporters import RetryConfig

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    retry = RetryConfig(initial_interval="500ms", max_interval="30s", max_elapsed_time=f"{retry_for}s")
    limiter = RateLimiter(args.max_rate) if args.max_rate else None
    batch = args.batch if not args.max_rate else max(1, min(args.batch, int(args.max_rate / 5)))
    show = not args.quiet and (sys.stderr.isatty() or not args.json)
    source = await asyncio.to_thread(job.open_source)
    try:
        with Display(job.units, enabled=show, title="total") as display:
            return await replay(
                source,
                job.units,
                job.filters,
                None if job.dry_run else job.target,
                dead_letter=job.dead_letter,
                checkpoint=job.checkpoint,
                display=display,
                limiter=limiter,
                batch=batch,
                retry=retry,
                stop=stop,
            )
    finally:
        await asyncio.to_thread(source.close)
        if job.target is not None:
            await job.target.close()
        if job.dead_letter is not None:
            await asyncio.to_thread(job.dead_letter.close)


if __name__ == "__main__":
    sys.exit(main())
