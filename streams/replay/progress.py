"""Progress on a terminal (rich) and the rate limit that keeps a backfill from flattening a backend."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from streams.replay.plan import Unit

MAX_BARS = 16  # beyond this many units (an archive's files), only the total bar is drawn


class RateLimiter:
    """A token bucket of ``rate`` records/s holding at most ``rate / 10`` (0.1 s of burst).

    Hand-written: the libraries that do this (aiolimiter, pyrate-limiter) are not dependencies, and the
    replay needs one call — take n tokens, sleeping off any debt — with an injectable clock for tests.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = max(1.0, rate / 10)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()

    async def take(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


class _Window:
    """Records and items per second over the last few seconds (rich's own speed counts offsets)."""

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[float, int, int]] = deque()
        self.first: tuple[float, int, int] | None = None

    def add(self, now: float, records: int, items: int, *, whole_run: bool = False) -> tuple[float, float]:
        self.samples.append((now, records, items))
        self.first = self.first or self.samples[0]
        while len(self.samples) > 2 and now - self.samples[0][0] > self.seconds:
            self.samples.popleft()
        t0, r0, i0 = self.first if whole_run else self.samples[0]
        elapsed = now - t0
        if elapsed <= 0:
            return 0.0, 0.0
        return (records - r0) / elapsed, (items - i0) / elapsed


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rps, ips = task.fields.get("rps", 0.0), task.fields.get("ips", 0.0)
        return Text(f"{rps:>9,.0f} rec/s {ips:>11,.0f} items/s", style="progress.data.speed")


class Display:
    """A bar per unit (up to MAX_BARS) and a total bar; nothing at all when disabled (--quiet, no tty)."""

    def __init__(
        self, units: Sequence[Unit], *, enabled: bool, title: str, console: Console | None = None
    ) -> None:
        self.enabled = enabled
        self.units = list(units)
        self._windows: dict[str, _Window] = {}
        self._tasks: dict[str, int] = {}
        self._progress: Progress | None = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            _RateColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True, width=None if sys.stderr.isatty() else 120),
            transient=False,
            refresh_per_second=4,
        )
        if len(self.units) <= MAX_BARS:
            for unit in self.units:
                self._tasks[unit.key] = self._progress.add_task(
                    _label(unit), total=max(unit.span, 1), completed=self._done(unit)
                )
        total = sum(u.span for u in self.units)
        self._tasks["*"] = self._progress.add_task(
            f"[bold]{title}", total=max(total, 1), completed=sum(self._done(u) for u in self.units)
        )

    @staticmethod
    def _done(unit: Unit) -> int:
        return max(unit.span, 1) if unit.done else unit.next - unit.start

    def __enter__(self) -> Display:
        if self._progress is not None:
            self.update()  # the first sample of every rate window
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self.update(whole_run=True)  # the bars stay on screen with the run's average rates
            self._progress.stop()

    def update(self, *, whole_run: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        for unit in self.units:
            if unit.key in self._tasks:
                self._set(unit.key, now, self._done(unit), unit.stats.records, unit.stats.items, whole_run)
        self._set(
            "*",
            now,
            sum(self._done(u) for u in self.units),
            sum(u.stats.records for u in self.units),
            sum(u.stats.items for u in self.units),
            whole_run,
        )

    def _set(self, key: str, now: float, completed: int, records: int, items: int, whole_run: bool) -> None:
        assert self._progress is not None
        rps, ips = self._windows.setdefault(key, _Window()).add(now, records, items, whole_run=whole_run)
        self._progress.update(self._tasks[key], completed=completed, rps=rps, ips=ips)


def _label(unit: Unit) -> str:
    name = unit.key if not unit.key.isdigit() else f"partition {unit.key}"
    return name if len(name) <= 40 else "…" + name[-39:]
