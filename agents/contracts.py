"""The seams between the agent's parts: receivers -> pipeline -> publisher.

Receivers only decode and answer; the pipeline decides; the publisher makes data durable. These
exceptions carry what each transport needs to answer correctly (OTLP spec, "Failures").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message

from kotel.otlp import Signal


class InvalidRequest(Exception):
    """Not retryable: HTTP 400 / gRPC INVALID_ARGUMENT, with a message that says what was wrong."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class Overloaded(Exception):
    """Retryable refusal: HTTP 429 / gRPC RESOURCE_EXHAUSTED with Retry-After / RetryInfo."""

    def __init__(self, message: str, retry_after: float, reason: str = "backpressure") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class Unavailable(Exception):
    """Retryable: HTTP 503 / gRPC UNAVAILABLE, when neither Kafka nor the spill can take the data."""

    def __init__(self, message: str, retry_after: float, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


@dataclass(frozen=True)
class ExportResult:
    """OTLP partial success: items the agent rejected for good (not retryable), with why."""

    rejected_items: int = 0
    error_message: str = ""


class ExportHandler(Protocol):
    async def export(self, signal: Signal, request: Message, size_bytes: int) -> ExportResult:
        """Return once the accepted part is durable (Kafka ack or fsynced spill), or raise one of these."""
        ...


class Processor(Protocol):
    """One Collector-style processor: a pure transformation of a request, counting what it drops."""

    name: str

    def process(self, signal: Signal, request: Message) -> Message | None:
        """Return the (possibly modified in place) request, or None when nothing is left of it."""
        ...
