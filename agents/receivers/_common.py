"""What both OTLP receivers share: decode + validate, the export call, and google.rpc.Status building.

The transports differ only in framing and in how they spell an error; everything that decides *whether*
a request is good lives here, so gRPC and HTTP can never disagree on it.
"""

from __future__ import annotations

import enum
import logging
import math

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from agents.contracts import ExportHandler, ExportResult, InvalidRequest, Overloaded, Unavailable
from agents.telemetry import AgentMetrics
from kotel.otlp import OtlpDecodeError, Signal, count_items, decode_json, decode_protobuf, validate_request

log = logging.getLogger("agents.receivers")

# The reasons used as the `reason` label of rejected_requests (besides those an ExportHandler raises).
MALFORMED = "malformed"  # not decodable as OTLP in the declared encoding
INVALID = "invalid"  # decodable, but fails validation (id lengths, all-zero ids)


class Encoding(enum.StrEnum):
    PROTOBUF = "protobuf"
    JSON = "json"


class InvalidData(InvalidRequest):
    """InvalidRequest that also names the offending fields, for a google.rpc.BadRequest detail."""

    def __init__(self, message: str, reason: str, violations: list[tuple[str, str]]) -> None:
        super().__init__(message, reason)
        self.violations = violations


def decode(signal: Signal, data: bytes, encoding: Encoding) -> Message:
    """Bytes -> a validated request, or InvalidRequest whose message says exactly what is wrong."""
    try:
        decoder = decode_json if encoding is Encoding.JSON else decode_protobuf
        request = decoder(signal, data)
    except OtlpDecodeError as exc:
        raise InvalidRequest(str(exc), MALFORMED) from None
    problems = validate_request(signal, request)
    if problems:
        name = signal.request_class.__name__
        violations = [_split_problem(p) for p in problems]
        raise InvalidData(f"invalid {name}: {'; '.join(problems)}", INVALID, violations)
    return request


def _split_problem(problem: str) -> tuple[str, str]:
    path, sep, what = problem.partition(": ")
    return (path, what) if sep else ("", problem)


async def export(
    handler: ExportHandler,
    metrics: AgentMetrics,
    transport: str,
    signal: Signal,
    data: bytes,
    encoding: Encoding,
) -> ExportResult:
    """Decode, count and hand over one request; raises the contract's exceptions for the caller to map.

    `received` counts items that passed decoding and validation (a rejected request has none).

    Retryable refusals are counted here as `refused` items; bad input is counted by the transport (it
    also rejects things this function never sees, such as a wrong content type).
    """
    request = decode(signal, data, encoding)
    items = count_items(request)
    metrics.received.labels(signal.value, transport).inc(items)
    if not items:
        # The spec asks for success on an empty request; empty envelopes MAY be ignored, so they are.
        return ExportResult()
    # The handler budgets by protobuf size, which for JSON is not the body size.
    size = len(data) if encoding is Encoding.PROTOBUF else request.ByteSize()
    try:
        return await handler.export(signal, request, size)
    except (Overloaded, Unavailable) as exc:
        metrics.refused.labels(signal.value, exc.reason).inc(items)
        raise


def rejected(metrics: AgentMetrics, transport: str, reason: str, message: str) -> None:
    """Count and log (debug: a bad client must not be able to flood the agent's log) one rejection."""
    metrics.rejected_requests.labels(transport, reason).inc()
    log.debug("rejected OTLP/%s request (%s): %s", transport, reason, message)


def response(signal: Signal, result: ExportResult) -> Message:
    """The Export response; partial_success set only when something was rejected or said."""
    return signal.response(result.rejected_items, result.error_message)


def status(code: int, message: str, retry_after: float | None = None,
           violations: list[tuple[str, str]] | None = None) -> status_pb2.Status:
    """A google.rpc.Status with a RetryInfo (retryable errors) or BadRequest (bad data) detail."""
    st = status_pb2.Status(code=code, message=message)
    if retry_after is not None:
        st.details.append(_pack(retry_info(retry_after)))
    if violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
        ])
        st.details.append(_pack(bad))
    return st


def retry_info(retry_after: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(max(0, round(retry_after * 1e9)))
    return info


def retry_after_header(retry_after: float) -> str:
    """Retry-After takes whole seconds; round up so a client never comes back too early."""
    return str(max(0, math.ceil(retry_after)))


def _pack(msg: Message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(msg)
    return detail


def error_code(exc: Exception) -> int:
    """The google.rpc.Code for one of the contract's exceptions."""
    if isinstance(exc, Overloaded):
        return code_pb2.RESOURCE_EXHAUSTED
    if isinstance(exc, Unavailable):
        return code_pb2.UNAVAILABLE
    return code_pb2.INVALID_ARGUMENT


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """host:port (host may be [v6], empty for all interfaces) -> (host, port)."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)
