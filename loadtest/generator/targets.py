"""Where generated requests go: an agent over OTLP/gRPC or OTLP/HTTP, or straight into the raw topics.

Each target answers True once the data is acknowledged (the agent's OK, or Kafka's delivery report)
and retries what OTLP calls retryable, with backoff and the server's hint, for up to ``give_up_after``
seconds, as an OpenTelemetry SDK exporter does; a request that still fails counts as refused.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import defaultdict
from typing import Any, Protocol

import aiohttp
import grpc
from confluent_kafka import Producer

from kotel.kafka.topics import TopicNames
from kotel.otlp import Signal, entries, join
from loadtest.generator.shapes import Built

_GRPC_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                   grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS}
_HTTP_RETRYABLE = {429, 502, 503, 504}


class Target(Protocol):
    name: str

    async def start(self) -> None: ...

    async def send(self, built: Built, body: bytes) -> bool: ...

    async def close(self) -> None: ...


async def _with_retries(attempt: Any, give_up_after: float) -> bool:
    """Call ``attempt()`` -> (ok, retryable, hint seconds) until ok, a permanent error, or the deadline."""
    deadline = time.monotonic() + give_up_after
    delay = 0.1
    while True:
        ok, retryable, hint = await attempt()
        if ok:
            return True
        if not retryable or time.monotonic() + max(hint, delay) > deadline:
            return False
        await asyncio.sleep(max(hint, delay))
        delay = min(delay * 2, 5.0)


class GrpcTarget:
    name = "grpc"

    def __init__(self, endpoint: str, give_up_after: float = 60.0, timeout: float = 30.0) -> None:
        self.endpoint = endpoint.removeprefix("http://").removeprefix("grpc://")
        self.give_up_after, self.timeout = give_up_after, timeout
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[Signal, Any] = {}

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self.endpoint, options=[("grpc.max_send_message_length", 64 << 20)])
        for signal in Signal:
            self._calls[signal] = self._channel.unary_unary(
                signal.grpc_method, request_serializer=None, response_deserializer=None)

    async def send(self, built: Built, body: bytes) -> bool:
        call = self._calls[built.signal]

        async def attempt() -> tuple[bool, bool, float]:
            try:
                await call(body, timeout=self.timeout)
                return True, False, 0.0
            except grpc.aio.AioRpcError as exc:
                return False, exc.code() in _GRPC_RETRYABLE, 0.0

        return await _with_retries(attempt, self.give_up_after)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class HttpTarget:
    name = "http"

    def __init__(self, endpoint: str, give_up_after: float = 60.0, timeout: float = 30.0) -> None:
        base = endpoint if "://" in endpoint else f"http://{endpoint}"
        self.base = base.rstrip("/")
        self.give_up_after, self.timeout = give_up_after, timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=256))

    async def send(self, built: Built, body: bytes) -> bool:
        assert self._session is not None, "start() first"
        session, url = self._session, self.base + built.signal.http_path

        async def attempt() -> tuple[bool, bool, float]:
            try:
                async with session.post(url, data=body,
                                        headers={"Content-Type": "application/x-protobuf"}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return True, False, 0.0
                    hint = float(resp.headers.get("Retry-After", "0") or 0)
                    return False, resp.status in _HTTP_RETRYABLE, hint
            except (aiohttp.ClientError, TimeoutError):
                return False, True, 0.0

        return await _with_retries(attempt, self.give_up_after)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class KafkaTarget:
    """Records as the agent writes them (one per partition key, kotel headers), acks=all, idempotent."""

    name = "kafka"

    def __init__(self, config: dict[str, Any], prefix: str, timeout: float = 60.0) -> None:
        self.config, self.topics, self.timeout = config, TopicNames(prefix), timeout
        self._producer: Producer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = itertools.count()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = Producer({**self.config, "enable.idempotence": True, "acks": "all",
                                   "linger.ms": 5, "compression.type": "zstd",
                                   "message.timeout.ms": int(self.timeout * 1000)})
        self._thread = threading.Thread(target=self._poll, name="loadtest-kafka-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            assert self._producer is not None
            self._producer.poll(0.1)

    async def send(self, built: Built, body: bytes) -> bool:
        assert self._producer is not None and self._loop is not None, "start() first"
        loop, signal = self._loop, built.signal
        by_key: dict[str, list[bytes]] = defaultdict(list)
        tenants: dict[str, str] = {}
        for entry in entries(signal, built.request, "loadtest", "tenant"):
            by_key[entry.key].append(entry.framed)
            tenants[entry.key] = entry.tenant
        futures = []
        for key, framed in by_key.items():
            future: asyncio.Future[bool] = loop.create_future()

            def done(err: Any, _msg: Any, f: asyncio.Future[bool] = future) -> None:
                loop.call_soon_threadsafe(lambda: f.done() or f.set_result(err is None))

            headers = [("kotel.tenant", tenants[key].encode()), ("kotel.signal", signal.value.encode()),
                       ("kotel.schema", b"otlp-proto-v1"), ("kotel.agent", b"loadtest"),
                       ("kotel.seq", str(next(self._seq)).encode())]
            while True:
                try:
                    self._producer.produce(self.topics.raw(signal.value), join(framed), key.encode(),
                                           headers=headers, on_delivery=done)
                    break
                except BufferError:
                    await asyncio.sleep(0.01)
            futures.append(future)
        results = await asyncio.gather(*futures)
        return all(results)

    async def close(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, 30)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def make_target(kind: str, endpoint: str = "", kafka_config: dict[str, Any] | None = None,
                prefix: str = "kotel") -> Target:
    if kind == "grpc":
        return GrpcTarget(endpoint)
    if kind == "http":
        return HttpTarget(endpoint)
    if kind == "kafka":
        return KafkaTarget(kafka_config or {}, prefix)
    raise ValueError(f"unknown target {kind!r} (expected grpc, http or kafka)")
