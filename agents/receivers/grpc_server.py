"""OTLP/gRPC receiver (:4317): the three Export services on a grpc.aio server.

Methods are registered with raw bytes in and out, so decoding is ours: a bad payload gets
INVALID_ARGUMENT with the codec's precise message instead of grpc's generic deserialization failure.
Retryable refusals carry a google.rpc.RetryInfo twice: inside grpc-status-details-bin (the standard
status details that Go/Java clients read) and as google.rpc.retryinfo-bin (what the OpenTelemetry
Python exporter reads).
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.rpc import code_pb2, status_pb2

from agents.contracts import ExportHandler, InvalidRequest, Overloaded, Unavailable
from agents.receivers import _common
from agents.receivers._common import Encoding, InvalidData
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal
from kotel.topology.exporters import GrpcServerConfig

log = logging.getLogger("agents.receivers.grpc")

TRANSPORT = "grpc"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_RETRY_INFO_KEY = "google.rpc.retryinfo-bin"
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


class GrpcReceiver:
    """Serves OTLP/gRPC for the three signals and hands each decoded request to an ExportHandler."""

    def __init__(
        self,
        config: GrpcServerConfig,
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
        self._server: grpc.aio.Server | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The bound port (the real one when the endpoint asked for port 0); 0 before start()."""
        return self._port

    @property
    def max_message_bytes(self) -> int:
        return self._config.max_recv_msg_size_mib * 1024 * 1024

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("gRPC receiver already started")
        options: list[tuple[str, int]] = [
            # grpc checks this after decompression too, so a gzip bomb ends as RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Without this a second agent on the same port would silently share it.
            ("grpc.so_reuseport", 0),
        ]
        if self._config.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", self._config.max_concurrent_streams))
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers([self._service(sig) for sig in Signal])
        host, port = _common.split_endpoint(self._endpoint)
        address = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
        try:
            self._port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a failed bind this way
            raise OSError(f"OTLP/gRPC receiver cannot listen on {address}: {exc}") from None
        await server.start()
        self._server = server
        log.info("OTLP/gRPC receiver listening on %s (port %d)", address, self._port)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls; in-flight ones get `grace` seconds to finish, then are cancelled."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
            await server.wait_for_termination(timeout=0)

    def _service(self, signal: Signal) -> grpc.GenericRpcHandler:
        service, _, method = signal.grpc_method.lstrip("/").rpartition("/")

        async def export(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._export(signal, data, context)

        # No (de)serializers: the behaviour sees and returns raw bytes.
        handler = grpc.unary_unary_rpc_method_handler(export)
        return grpc.method_handlers_generic_handler(service, {method: handler})

    async def _export(self, signal: Signal, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            result = await _common.export(
                self._handler, self._metrics, TRANSPORT, signal, data, Encoding.PROTOBUF
            )
        except InvalidRequest as exc:
            _common.rejected(self._metrics, TRANSPORT, exc.reason, str(exc))
            violations = exc.violations if isinstance(exc, InvalidData) else None
            await _abort(context, _common.status(code_pb2.INVALID_ARGUMENT, str(exc), violations=violations))
        except (Overloaded, Unavailable) as exc:
            log.debug("refused OTLP/gRPC %s export (%s): %s", signal, exc.reason, exc)
            st = _common.status(_common.error_code(exc), str(exc), retry_after=exc.retry_after)
            info = _common.retry_info(exc.retry_after).SerializeToString()
            await _abort(context, st, ((_RETRY_INFO_KEY, info),))
        except Exception:  # CancelledError is a BaseException: a cancelled call still unwinds
            # A bug below us must cost one request, not the server; INTERNAL is not retryable (OTLP).
            log.exception("OTLP/gRPC %s export failed unexpectedly", signal)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the agent")
        return _common.response(signal, result).SerializeToString()


async def _abort(
    context: grpc.aio.ServicerContext,
    st: status_pb2.Status,
    extra: tuple[tuple[str, bytes], ...] = (),
) -> NoReturn:
    """End the call with a google.rpc.Status (code, message and details travel together)."""
    metadata = ((_STATUS_DETAILS_KEY, st.SerializeToString()), *extra)
    await context.abort(_GRPC_CODES[st.code], st.message, metadata)
    raise AssertionError("unreachable: ServicerContext.abort raises")
