"""From command-line options to a ready replay: every check that can fail runs here, before any send."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from kotel.topology import Topology, TopologyError, load_topology
from kotel.topology.exporters import FileExporterConfig
from streams.replay.checkpoint import Checkpoint, default_path, job_id
from streams.replay.kafka_io import DeadLetterer, KafkaSource, TopicTarget, topic_exists
from streams.replay.parquet_io import Kind, ParquetSource, plan_parquet
from streams.replay.plan import RangeSpec, Unit, plan_topic
from streams.replay.records import Filters
from streams.replay.runner import Source
from streams.replay.timespec import ReplayError, parse_offsets, parse_partitions, parse_time
from streams.sinks.runtime import Deliverer

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
_KAFKA_RANGE = ("partitions", "from_offset", "to_offset", "from_time", "to_time", "from_group")


@dataclass
class Job:
    id: str
    source_text: str  # "topic kotel.raw.traces", "archive /data/archive"
    target_text: str
    uses_kafka_source: bool
    units: list[Unit]
    filters: Filters
    open_source: Callable[[], Source]  # opened only once the plan is printed
    target: Deliverer | None
    dead_letter: DeadLetterer | None
    checkpoint: Checkpoint | None
    dry_run: bool = False  # the target was built to validate it, and is not sent to
    notes: list[str] = field(default_factory=list)
    already_done: bool = False

    def about(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "source": self.source_text,
            "target": self.target_text,
            "dry_run": self.dry_run,
        }


def _range_spec(args: argparse.Namespace) -> RangeSpec:
    now = datetime.now(UTC)
    return RangeSpec(
        partitions=parse_partitions(args.partitions) if args.partitions else None,
        from_offset=parse_offsets(args.from_offset, "--from-offset") if args.from_offset else None,
        to_offset=parse_offsets(args.to_offset, "--to-offset") if args.to_offset else None,
        from_ms=parse_time(args.from_time, now) if args.from_time else None,
        to_ms=parse_time(args.to_time, now) if args.to_time else None,
        from_group=args.from_group,
        from_text=args.from_time or "",
        to_text=args.to_time or "",
    )


def _check_options(args: argparse.Namespace) -> None:
    targets = [args.to_topic, args.to_sink, args.to_parquet, args.to_origin or None, args.redrive or None]
    if not args.dry_run and not any(t is not None for t in targets):
        raise ReplayError(
            "choose a target: --to-topic, --to-sink, --to-parquet, --to-origin or --redrive (or --dry-run)"
        )
    if args.to_sink and not args.topology:
        raise ReplayError("--to-sink needs --topology FILE (the sink is an exporter of its gateway section)")
    if args.from_parquet and any(getattr(args, name) for name in _KAFKA_RANGE):
        raise ReplayError(
            "--partitions, --from, --to, --from-offset, --to-offset and --from-group select Kafka "
            "records; --from-parquet replays whole files"
        )
    if args.resume and args.fresh:
        raise ReplayError("--resume and --fresh exclude each other")
    if args.redrive and not args.topic:
        raise ReplayError(
            "--redrive re-sends dead letters read from a topic: add --topic <prefix>.deadletter"
        )
    if args.to_origin and args.topic:
        raise ReplayError(
            "--to-origin sends Parquet rows to the topic each names; from a topic, use --to-topic "
            "(or --redrive for dead letters)"
        )


def _kafka(args: argparse.Namespace, topology: Topology | None) -> dict[str, Any]:
    config = topology.kafka.librdkafka_config() if topology else {}
    bootstrap = args.bootstrap or (None if topology else os.environ.get("KOTEL_BOOTSTRAP", DEFAULT_BOOTSTRAP))
    if bootstrap:
        config["bootstrap.servers"] = bootstrap
    config.setdefault("client.id", "kotel-replay")
    return config


def identity(args: argparse.Namespace, kafka: dict[str, Any], prefix: str) -> dict[str, Any]:
    """What makes two replays the same replay (and so share a checkpoint)."""

    def path(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value else None

    return {
        "topic": args.topic,
        "parquet": path(args.from_parquet),
        "range": [getattr(args, n) for n in _KAFKA_RANGE],
        "to_topic": args.to_topic,
        "to_sink": args.to_sink,
        "to_parquet": path(args.to_parquet),
        "to_origin": args.to_origin,
        "redrive": args.redrive,
        "tenant": args.tenant,
        "signal": args.signal,
        "reason": args.reason,
        "bootstrap": kafka.get("bootstrap.servers"),
        "prefix": prefix,
        "topology": path(args.topology),
    }


def _target(
    args: argparse.Namespace, topology: Topology | None, kafka: dict[str, Any], admin: AdminClient | None
) -> tuple[Deliverer | None, str, tuple[str, ...] | None]:
    if args.to_topic:
        assert admin is not None
        if not topic_exists(admin, args.to_topic):
            raise ReplayError(f"topic {args.to_topic!r} does not exist")
        return TopicTarget(kafka, args.to_topic), f"topic {args.to_topic}", None
    if args.to_sink:
        from streams.sinks.factory import SinkConfigError, build_deliverer

        assert topology is not None
        try:
            deliverer = build_deliverer(topology, args.to_sink)
        except SinkConfigError as exc:
            raise ReplayError(str(exc)) from None
        if args.signal and args.signal not in deliverer.signals:
            raise ReplayError(
                f"sink {args.to_sink!r} takes {', '.join(deliverer.signals)}, not {args.signal}"
            )
        return deliverer, f"sink {args.to_sink}", tuple(deliverer.signals)
    if args.to_parquet:
        from streams.sinks.archive import ParquetArchive

        config = FileExporterConfig(
            path=str(Path(args.to_parquet).resolve()), format="parquet", mode="always"
        )
        return ParquetArchive(f"parquet {args.to_parquet}", config), f"parquet {args.to_parquet}", None
    if args.to_origin or args.redrive:
        return TopicTarget(kafka, None), "origin topics" + (" (re-drive)" if args.redrive else ""), None
    return None, "nothing (dry run)", None


def prepare(args: argparse.Namespace) -> Job:
    """Parse, load, plan, validate the target and find the checkpoint; ReplayError means exit 2."""
    _check_options(args)
    spec = _range_spec(args)
    spec.check_order()
    topology: Topology | None = None
    if args.topology:
        try:
            topology = load_topology(args.topology)
        except TopologyError as exc:
            raise ReplayError(str(exc).splitlines()[0]) from None
    prefix = args.prefix or (topology.topics.prefix if topology else "kotel")
    kafka = _kafka(args, topology)
    uses_kafka = bool(args.topic or args.to_topic or args.to_origin or args.redrive)
    admin = AdminClient(kafka) if uses_kafka else None
    job = job_id(identity(args, kafka, prefix))
    checkpoint_path = Path(args.checkpoint).resolve() if args.checkpoint else default_path(job)

    notes: list[str] = []
    previous: Checkpoint | None = None
    kind: Kind = "archive"
    if args.resume:
        previous = Checkpoint.load(checkpoint_path)
        if previous.job != job:
            raise ReplayError(
                f"checkpoint {checkpoint_path} belongs to another replay (job {previous.job}); "
                f"this one is job {job}"
            )
    elif not args.dry_run and not args.fresh and checkpoint_path.exists():
        # Checked before planning: it needs no broker, and nothing may be sent for this job anyway.
        try:
            unfinished = not Checkpoint.load(checkpoint_path).done
        except ReplayError:
            unfinished = True
        if unfinished:
            raise ReplayError(
                f"an unfinished replay of this job has a checkpoint at {checkpoint_path}: add "
                "--resume to continue it or --fresh to start over"
            )
    if args.topic:
        if previous is None:
            consumer = Consumer({**kafka, "group.id": f"kotel-replay-{job}", "enable.auto.commit": False})
            try:
                units, notes = plan_topic(consumer, admin, args.topic, spec)
            finally:
                consumer.close()
    else:
        kind, units = plan_parquet(Path(args.from_parquet))
    if previous is not None:
        units = previous.units  # the range fixed by the first run, and how far it got

    target, target_text, target_signals = _target(args, topology, kafka, admin)
    filters = Filters(args.tenant, args.signal, args.reason, target_signals, args.redrive)
    open_source: Callable[[], Source]
    if args.topic:
        source_text = f"topic {args.topic}"
        open_source = partial(KafkaSource, kafka, args.topic, units, prefix, f"kotel-replay-{job}")
    else:
        source_text = f"{kind} {args.from_parquet}"
        open_source = partial(ParquetSource, Path(args.from_parquet), kind, units, prefix)
    checkpoint = None
    if not args.dry_run:
        about = {"source": source_text, "target": target_text}
        checkpoint = Checkpoint(checkpoint_path, job, units, about, previous.done if previous else False)
    dead_letter = None
    if uses_kafka or args.to_sink:
        dead_letter = DeadLetterer(kafka, f"{prefix}.deadletter")
    return Job(
        job, source_text, target_text, bool(args.topic), units, filters, open_source, target, dead_letter,
        checkpoint, args.dry_run, notes, already_done=bool(previous and previous.done),
    )  # fmt: skip
