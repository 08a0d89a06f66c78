"""`kotel status`: what `kotel up` runs, whether it is up, how fast it moves and how far behind it is.

Rates are the counters' increase between two scrapes of each process's /metrics about a second apart.
Lag is the process's own consumer-lag gauge, else the broker's view of its consumer group (committed
offsets, or the log start for an assigned partition never committed, against the high watermarks).
Exit codes, for scripts: 0 everything runs, 1 a process or the broker is down, 2 no `kotel up` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kotel.up_state import ChildState, UpState, is_alive, read_state, state_path

# (family, unit) by preference: a process's rate is the first family that has samples.
IN_FAMILIES = (("kotel_agent_received_items", "items"), ("kotel_stage_items_in", "items"),
               ("kotel_stage_records_in", "records"))
OUT_FAMILIES = (("kotel_agent_accepted_items", "items"), ("kotel_stage_items_out", "items"),
                ("kotel_stage_records_out", "records"), ("kotel_sink_exported_records", "records"))
LAG_FAMILIES = ("kotel_stage_consumer_lag", "kotel_sink_consumer_lag")
KAFKA_TIMEOUT_S = 5.0

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class Scrape:
    at: float  # time.monotonic() when the answer came
    samples: Samples


@dataclass(frozen=True)
class Rate:
    unit: str  # items (spans, data points, log records) or records (Kafka records)
    per_signal: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.per_signal.values())


def parse_metrics(text: str) -> Samples:
    """Family name -> its samples; a counter's ``_created`` series is left out."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        wanted = {family.name, family.name + "_total"}
        out[family.name] = [(s.labels, s.value) for s in family.samples if s.name in wanted]
    return out


def rate(first: Scrape, second: Scrape, families: Sequence[tuple[str, str]]) -> Rate | None:
    """Per-signal increase per second; None when the process exports none of ``families``.

    A counter lower in the second scrape was reset (the process restarted): its new value counts.
    """
    elapsed = second.at - first.at
    if elapsed <= 0:
        raise ValueError(f"the second scrape must come after the first (elapsed {elapsed:.3f} s)")
    for name, unit in families:
        if not second.samples.get(name):
            continue
        before = {_key(labels): value for labels, value in first.samples.get(name, [])}
        per_signal: dict[str, float] = defaultdict(float)
        for labels, value in second.samples[name]:
            prior = before.get(_key(labels), 0.0)
            per_signal[labels.get("signal", "all")] += (value - prior if value >= prior else value) / elapsed
        return Rate(unit, dict(per_signal))
    present = [unit for name, unit in families if name in second.samples]
    return Rate(present[0]) if present else None


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def metrics_lag(scrape: Scrape) -> int | None:
    """Records behind, summed over the partitions the process reports; None when it reports none."""
    values = [value for name in LAG_FAMILIES for _, value in scrape.samples.get(name, [])]
    return int(sum(values)) if values else None


async def scrape(session: aiohttp.ClientSession, url: str) -> Scrape | str:
    """One scrape, or why it failed (a process may be starting, or export no metrics at all)."""
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return f"HTTP {response.status}"
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        return Scrape(time.monotonic(), parse_metrics(text))
    except ValueError as exc:
        return f"unreadable metrics: {exc}"


# --- the broker's view -----------------------------------------------------------------------------


def admin_client(config: dict[str, Any]) -> Any:
    from confluent_kafka.admin import AdminClient

    # librdkafka's own connection errors would flood the terminal; failures surface as exceptions.
    quiet = logging.getLogger("kotel.status.librdkafka")
    quiet.setLevel(logging.CRITICAL)
    return AdminClient({**config, "logger": quiet})


def watermarks(admin: Any, partitions: Iterable[tuple[str, int]], *, latest: bool,
               timeout: float = KAFKA_TIMEOUT_S) -> dict[tuple[str, int], int]:
    """Each partition's high watermark (``latest``) or log start; partitions that fail are left out."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    spec = OffsetSpec.latest() if latest else OffsetSpec.earliest()
    request = {TopicPartition(t, p): spec for t, p in partitions}
    if not request:
        return {}
    out: dict[tuple[str, int], int] = {}
    for tp, future in admin.list_offsets(request, request_timeout=timeout).items():
        try:
            out[(tp.topic, tp.partition)] = future.result(timeout=timeout).offset
        except Exception:  # a topic deleted meanwhile, a leader moving: leave this partition out
            continue
    return out


def group_lag(admin: Any, group: str, prefix: str, timeout: float = KAFKA_TIMEOUT_S) -> int | None:
    """Records the group has yet to commit on the pipeline's topics (``<prefix>.*``; a Faust worker's
    changelog topics are not its input); None when the group has neither commits nor members."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    found = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=timeout)
    committed = {
        (tp.topic, tp.partition): tp.offset for tp in found[group].result(timeout=timeout).topic_partitions
        if tp.topic.startswith(prefix + ".") and tp.offset >= 0
    }
    assigned: set[tuple[str, int]] = set()
    try:
        description = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result(timeout)
        for member in description.members:
            assigned |= {(tp.topic, tp.partition) for tp in member.assignment.topic_partitions
                         if tp.topic.startswith(prefix + ".")}
    except Exception:  # an assignment librdkafka cannot decode: the committed offsets still tell most
        pass
    if not committed and not assigned:
        return None
    high = watermarks(admin, committed.keys() | assigned, latest=True, timeout=timeout)
    start = watermarks(admin, assigned - committed.keys(), latest=False, timeout=timeout)
    position = {**start, **committed}
    return sum(max(0, high[tp] - position[tp]) for tp in high if tp in position)


def kafka_view(config: dict[str, Any], groups: Sequence[str], prefix: str,
               timeout: float = KAFKA_TIMEOUT_S) -> tuple[dict[str, Any], dict[str, int | None]]:
    """The broker's status and each group's lag (groups are left out when the broker is down)."""
    broker: dict[str, Any] = {"bootstrap": config.get("bootstrap.servers"), "up": False, "brokers": 0,
                              "error": None}
    lags: dict[str, int | None] = {}
    try:
        admin = admin_client(config)
        metadata = admin.list_topics(timeout=timeout)
        broker.update(up=True, brokers=len(metadata.brokers))
        for group in groups:
            lags[group] = group_lag(admin, group, prefix, timeout)
    except Exception as exc:
        broker["error"] = str(exc) or type(exc).__name__
    return broker, lags


# --- one report ------------------------------------------------------------------------------------


def _kafka_config(state: UpState) -> dict[str, Any]:
    """The topology's client settings (security) with the bootstrap `kotel up` actually used."""
    from kotel.topology import TopologyError, load_topology

    try:
        config = dict(load_topology(state.topology).kafka.librdkafka_config())
    except (TopologyError, OSError):
        config = {}
    return {**config, "bootstrap.servers": state.bootstrap}


async def collect(state: UpState, interval: float = 1.0) -> dict[str, Any]:
    """Everything `kotel status` shows, as plain data (what ``--json`` prints)."""
    children = state.children
    groups = sorted({c.group for c in children if c.group})
    kafka = asyncio.create_task(asyncio.to_thread(kafka_view, _kafka_config(state), groups, state.prefix))
    urls = [c.metrics_url for c in children]
    timeout = aiohttp.ClientTimeout(total=max(interval, 1.0) * 2)

    async def all_once(session: aiohttp.ClientSession) -> list[Scrape | str | None]:
        return list(await asyncio.gather(*(scrape(session, u) if u else _none() for u in urls)))

    async with aiohttp.ClientSession(timeout=timeout) as session:
        first = await all_once(session)
        await asyncio.sleep(interval)
        second = await all_once(session)
    broker, lags = await kafka
    processes = [_process(c, a, b, lags) for c, a, b in zip(children, first, second, strict=True)]
    return {
        "up": {"pid": state.pid, "topology": state.topology, "started_at": state.started_at,
               "uptime_s": round(time.time() - state.started_at, 1)},
        "broker": broker,
        "processes": processes,
        "ok": broker["up"] and all(p["up"] for p in processes),
    }


async def _none() -> None:
    return None


def _process(child: ChildState, first: Scrape | str | None, second: Scrape | str | None,
             lags: dict[str, int | None]) -> dict[str, Any]:
    up = child.state in ("starting", "running") and is_alive(child.pid, child.started_at)
    out: dict[str, Any] = {
        "name": child.name, "role": child.role, "pid": child.pid if up else None, "up": up,
        "state": "up" if up else ("down" if child.state in ("running", "starting") else child.state),
        "restarts": child.restarts, "started_at": child.started_at, "metrics_url": child.metrics_url,
        "log_file": child.log_file, "metrics": None, "metrics_error": None, "in": None, "out": None,
        "lag": None, "lag_source": None,
    }
    if isinstance(second, Scrape):
        out["metrics"] = "ok"
        if isinstance(first, Scrape):
            for direction, families in (("in", IN_FAMILIES), ("out", OUT_FAMILIES)):
                found = rate(first, second, families)
                out[direction] = None if found is None else {**asdict(found), "total": found.total}
        out["lag"] = metrics_lag(second)
        out["lag_source"] = "metrics" if out["lag"] is not None else None
    else:
        out["metrics"] = "no metrics"
        out["metrics_error"] = second if isinstance(second, str) else "no metrics endpoint known"
    if out["lag"] is None and child.group and lags.get(child.group) is not None:
        out["lag"], out["lag_source"] = lags[child.group], "broker"
    return out


# --- terminal and CLI ------------------------------------------------------------------------------


def _fmt_rate(found: dict[str, Any] | None) -> str:
    """One line per signal that moves; Kafka records marked ``rec`` (items are the unmarked unit)."""
    if found is None:
        return "-"
    mark = " rec" if found["unit"] == "records" else ""
    lines = [f"{signal} {value:,.0f}{mark}" for signal, value in sorted(found["per_signal"].items())
             if value >= 0.5]
    return "\n".join(lines) or "0"


def _fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s" if minutes else f"{secs}s"


def render(report: dict[str, Any], console: Any) -> None:
    from rich import box
    from rich.table import Table

    up, broker = report["up"], report["broker"]
    console.print(f"kotel up: pid {up['pid']}, topology {up['topology']}, running for "
                  f"{_fmt_duration(up['uptime_s'])}")
    console.print(f"broker {broker['bootstrap']}: " + (
        f"[green]up[/] ({broker['brokers']} broker{'s' if broker['brokers'] != 1 else ''})" if broker["up"]
        else f"[red]down[/] ({broker['error']})"))
    table = Table("process", "pid", "state", "restarts", "in /s", "out /s", "lag", box=box.SIMPLE_HEAD,
                  caption="rates: items (spans, data points, log records) or Kafka records (rec); "
                          "lag: records behind, * as the broker sees the group's commits")
    table.columns[0].no_wrap = True
    for p in report["processes"]:
        colour = "green" if p["up"] else "red"
        if p["metrics"] == "ok":
            rate_in, rate_out = _fmt_rate(p["in"]), _fmt_rate(p["out"])
        else:
            rate_in = rate_out = "[yellow]no metrics[/]"
        lag = "-" if p["lag"] is None else f"{p['lag']:,}"
        if p["lag_source"] == "broker":
            lag += " *"
        table.add_row(p["name"], str(p["pid"] or "-"), f"[{colour}]{p['state']}[/]", str(p["restarts"]),
                      rate_in, rate_out, lag)
    console.print(table)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="show what `kotel up` runs: each process, its rate and its consumer lag",
        description="Read `kotel up`'s state file ($KOTEL_HOME/up/state.json), scrape every process's "
                    "/metrics twice, ask the broker for consumer lag. Exit 0: all up; 1: something is "
                    "down; 2: no `kotel up` is running.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON, for scripts")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="time between the two scrapes that give the rates (default 1)")
    parser.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    path = state_path()
    try:
        state = read_state(path)
    except ValueError as exc:
        print(f"kotel status: {exc}", file=sys.stderr)
        return 2
    if state is None:
        print(f"kotel status: no `kotel up` is running (no {path}); start one with `kotel up`",
              file=sys.stderr)
        return 2
    if not is_alive(state.pid, state.started_at):
        print(f"kotel status: no `kotel up` is running ({path} was left by pid {state.pid}, which is gone)",
              file=sys.stderr)
        return 2
    report = asyncio.run(collect(state, args.interval))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report, Console())
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kotel.status_cli [--json]``: the command without the entry point."""
    parser = argparse.ArgumentParser(prog="kotel")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
