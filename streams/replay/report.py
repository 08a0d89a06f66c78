"""The replay's tables for people: the dry run's plan and the final summary (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from streams.replay.plan import Unit
from streams.replay.runner import ReplayResult
from streams.replay.timespec import iso


def _name(unit: Unit) -> str:
    return unit.key if not unit.key.isdigit() else f"partition {unit.key}"


def _span(first: int | None, last: int | None) -> tuple[str, str]:
    return iso(first) or "-", iso(last) or "-"


def table(result: ReplayResult, *, dry_run: bool, title: str) -> Table:
    """Per unit: the fixed range, the counts and the time span of the records read; then the totals."""
    out = Table(title=title, title_justify="left")
    out.add_column("unit")
    out.add_column("offsets [start, end)")
    out.add_column("records", justify="right")
    out.add_column("skipped", justify="right")
    out.add_column("would send" if dry_run else "delivered", justify="right")
    if not dry_run:
        out.add_column("dead-lettered", justify="right")
    out.add_column("items", justify="right")
    out.add_column("first record")
    out.add_column("last record")
    for unit in result.units:
        s = unit.stats
        row = [
            _name(unit),
            f"{unit.start}-{unit.end}",
            f"{s.records:,}",
            f"{s.skipped:,}",
            f"{s.delivered:,}",
        ]
        if not dry_run:
            row.append(f"{s.dead_lettered:,}")
        out.add_row(*row, f"{s.items:,}", *_span(s.first_ts, s.last_ts))
    t = result.totals()
    total = ["[bold]total", "", f"{t.records:,}", f"{t.skipped:,}", f"{t.delivered:,}"]
    if not dry_run:
        total.append(f"{t.dead_lettered:,}")
    out.add_row(*total, f"{t.items:,}", *_span(t.first_ts, t.last_ts))
    return out


def print_result(console: Console, result: ReplayResult, *, dry_run: bool, seconds: float) -> None:
    t = result.totals()
    rates = f"{t.records / seconds:,.0f} records/s, {t.items / seconds:,.0f} items/s" if seconds > 0 else ""
    if dry_run:
        title = "dry run: nothing was sent" if result.complete else f"dry run stopped after {seconds:.1f}s"
    elif seconds <= 0:
        title = "the whole replay (nothing was left to send)"
    elif result.complete:
        title = f"replayed in {seconds:.1f}s ({rates}); totals include earlier runs of a resumed replay"
    else:
        title = f"stopped after {seconds:.1f}s ({rates}); the rest is sent with --resume"
    console.print(table(result, dry_run=dry_run, title=title))
