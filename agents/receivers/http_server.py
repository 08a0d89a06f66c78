"""OTLP/HTTP receiver (:4318): POST protobuf or JSON on the three signal paths, on aiohttp.

aiohttp's own request decompression is switched off: it would inflate a gzip body without our size
limit, so the body is read here with the limit enforced while reading, then inflated with a cap on the
output (a gzip bomb costs at most max_request_body_size + 1 bytes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import NoReturn

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2

from agents.contracts import ExportHandler, InvalidRequest, Overloaded, Unavailable
from agents.receivers import _common
from agents.receivers._common import Encoding, InvalidData
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal
from kotel.topology.exporters import HttpServerConfig

log = logging.getLogger("agents.receivers.http")

TRANSPORT = "http"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_CONTENT_TYPES = {PROTOBUF: Encoding.PROTOBUF, JSON: Encoding.JSON}
_MEDIA_TYPES = {enc: media for media, enc in _CONTENT_TYPES.items()}
# gzip framing (wbits 16 + 15): zlib then checks the gzip header and trailer (CRC32, length).
_GZIP_WBITS = 31


class HttpError(Exception):
    """A rejection decided by the HTTP layer (before or instead of the codec)."""

    def __init__(self, http_status: int, code: int, reason: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.reason = reason
        self.headers = headers or {}


class HttpReceiver:
    """Serves OTLP/HTTP for the three signals and hands each decoded request to an ExportHandler."""

    def __init__(
        self,
        config: HttpServerConfig,
        handler: ExportHandler,
        metrics: AgentMetrics,
        *,
        endpoint: str | None = None,
    ) -> None:
        """endpoint overrides config.endpoint (the config refuses port 0; tests bind 127.0.0.1:0)."""
        self._config = config
        self._handler = handler
        self._metrics = metrics
        self._endpoint = endpoint or config.endpoint
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def port(self) -> int:
        """The bound port (the real one when the endpoint asked for port 0); 0 before start()."""
        return self._port

    @property
    def in_flight(self) -> int:
        """Requests being handled right now (stop() waits for these)."""
        return self._inflight

    @property
    def paths(self) -> dict[Signal, str]:
        cfg = self._config
        return {Signal.TRACES: cfg.traces_url_path, Signal.METRICS: cfg.metrics_url_path,
                Signal.LOGS: cfg.logs_url_path}

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("HTTP receiver already started")
        app = web.Application()
        for signal, path in self.paths.items():
            app.router.add_route("*", path, self._route(signal))
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # stop() waits for in-flight exports itself, so the runner's own wait can be short.
        runner = web.AppRunner(app, auto_decompress=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        host, port = _common.split_endpoint(self._endpoint)
        site = web.TCPSite(runner, host or None, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info("OTLP/HTTP receiver listening on %s (port %d)", self._endpoint, self._port)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop listening; in-flight exports get `grace` seconds to finish, then are cancelled."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        if grace:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("OTLP/HTTP receiver: %d export(s) still running after %.1fs; cancelling",
                            self._inflight, grace)
        await runner.cleanup()

    # --- request handling ----------------------------------------------------------------------

    def _route(self, signal: Signal) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            self._inflight += 1
            self._idle.clear()
            try:
                return await self._serve(signal, request)
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.set()

        return serve

    async def _serve(self, signal: Signal, request: web.Request) -> web.Response:
        # Errors answer in the request's encoding when it has a known one, else in protobuf.
        encoding = _CONTENT_TYPES.get(request.content_type)
        reply = encoding or Encoding.PROTOBUF
        try:
            if request.method != "POST":
                _fail(405, code_pb2.UNIMPLEMENTED, "method_not_allowed",
                      f"method {request.method} is not allowed on {request.path} (OTLP/HTTP uses POST)",
                      {"Allow": "POST"})
            if encoding is None:
                _fail(415, code_pb2.INVALID_ARGUMENT, "unsupported_media_type",
                      f"unsupported Content-Type {request.content_type!r} "
                      f"(expected {PROTOBUF} or {JSON})")
            data = await self._read_body(request)
            result = await _common.export(self._handler, self._metrics, TRANSPORT, signal, data, encoding)
        except HttpError as exc:
            _common.rejected(self._metrics, TRANSPORT, exc.reason, str(exc))
            st = status_pb2.Status(code=exc.code, message=str(exc))
            return _reply(st, reply, exc.http_status, exc.headers)
        except InvalidRequest as exc:
            _common.rejected(self._metrics, TRANSPORT, exc.reason, str(exc))
            violations = exc.violations if isinstance(exc, InvalidData) else None
            st = _common.status(code_pb2.INVALID_ARGUMENT, str(exc), violations=violations)
            return _reply(st, reply, 400)
        except (Overloaded, Unavailable) as exc:
            log.debug("refused OTLP/HTTP %s export (%s): %s", signal, exc.reason, exc)
            st = _common.status(_common.error_code(exc), str(exc), retry_after=exc.retry_after)
            http_status = 429 if isinstance(exc, Overloaded) else 503
            headers = {"Retry-After": _common.retry_after_header(exc.retry_after)}
            return _reply(st, reply, http_status, headers)
        except Exception:  # CancelledError is a BaseException: a cancelled call still unwinds
            # A bug below us must cost one request, not the server; 500 is not retryable (OTLP).
            log.exception("OTLP/HTTP %s export failed unexpectedly", signal)
            st = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error in the agent")
            return _reply(st, reply, 500)
        return _reply(_common.response(signal, result), reply, 200)

    async def _not_found(self, request: web.Request) -> web.Response:
        paths = ", ".join(self.paths.values())
        message = f"no OTLP endpoint at {request.path} (this receiver serves {paths})"
        _common.rejected(self._metrics, TRANSPORT, "not_found", message)
        st = status_pb2.Status(code=code_pb2.NOT_FOUND, message=message)
        return _reply(st, _CONTENT_TYPES.get(request.content_type, Encoding.PROTOBUF), 404)

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, decompressed, never holding more than the limit (+1 byte) of either form."""
        limit = self._config.max_request_body_size
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            _fail(415, code_pb2.INVALID_ARGUMENT, "unsupported_encoding",
                  f"unsupported Content-Encoding {encoding!r} (expected gzip or identity)")
        too_large = f"request body exceeds max_request_body_size ({limit} bytes)"
        if request.content_length is not None and request.content_length > limit:
            _fail(413, code_pb2.RESOURCE_EXHAUSTED, "too_large", too_large)
        body = bytearray()
        try:
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > limit:
                    _fail(413, code_pb2.RESOURCE_EXHAUSTED, "too_large", too_large)
        except (HttpProcessingError, ClientPayloadError) as exc:
            _fail(400, code_pb2.INVALID_ARGUMENT, "malformed", f"cannot read the request body: {exc}")
        if encoding == "gzip":
            return gunzip(bytes(body), limit)
        return bytes(body)


def gunzip(data: bytes, limit: int) -> bytes:
    """Inflate gzip (all members, as RFC 1952 allows) producing at most `limit` bytes, else 413."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(_GZIP_WBITS)
        try:
            # max_length caps the output; leftover input stays in unconsumed_tail, unread.
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            _fail(400, code_pb2.INVALID_ARGUMENT, "malformed", f"invalid gzip body: {exc}")
        if len(out) > limit:
            _fail(413, code_pb2.RESOURCE_EXHAUSTED, "too_large",
                  f"decompressed request body exceeds max_request_body_size ({limit} bytes)")
        if not inflater.eof:
            _fail(400, code_pb2.INVALID_ARGUMENT, "malformed", "invalid gzip body: truncated")
        data = inflater.unused_data
    return bytes(out)


def _fail(http_status: int, code: int, reason: str, message: str,
          headers: dict[str, str] | None = None) -> NoReturn:
    raise HttpError(http_status, code, reason, message, headers)


def _reply(msg: Message, encoding: Encoding, http_status: int,
           headers: dict[str, str] | None = None) -> web.Response:
    if encoding is Encoding.JSON:
        body = json.dumps(json_format.MessageToDict(msg), separators=(",", ":")).encode()
    else:
        body = msg.SerializeToString()
    return web.Response(body=body, status=http_status, headers=headers,
                        content_type=_MEDIA_TYPES[encoding])
