"""Seeking Faust's consumer goes through its consumer thread (aiokafka is not thread-safe)."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any

from streams.offset_guard import seek


class _Thread:
    """Stands in for Faust's AIOKafkaConsumerThread: runs calls on another thread, records where."""

    def __init__(self) -> None:
        self.seeks: list[tuple[Any, int, str]] = []

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp, offset, threading.current_thread().name))

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        done = threading.Event()
        result: list[Any] = []
        worker = threading.Thread(target=lambda: (result.append(fun(*args)), done.set()), name="consumer")
        worker.start()
        await asyncio.to_thread(done.wait)
        return result[0]


class _Consumer:
    def __init__(self) -> None:
        self._thread = _Thread()
        self._read_offset: dict[Any, int | None] = defaultdict(lambda: None)

    async def seek(self, tp: Any, offset: int) -> None:
        raise AssertionError("seeking from the app's loop races with the fetcher")


class _App:
    def __init__(self) -> None:
        self.consumer = _Consumer()


def test_seek_runs_in_the_consumer_thread_and_resets_the_read_offset() -> None:
    app = _App()
    asyncio.run(seek(app, ("t", 3), 42))  # type: ignore[arg-type]
    assert app.consumer._thread.seeks == [(("t", 3), 42, "consumer")]
    assert app.consumer._read_offset[("t", 3)] == 42
