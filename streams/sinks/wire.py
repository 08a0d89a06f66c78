"""Protobuf wire pieces for the remote-write and Loki push bodies, written directly as bytes.

Building one protobuf message per sample or log entry was the costliest step of both sinks
(loadtest/sink_bench.py --offline profiles it): each request holds thousands of tiny messages, while
their encoding is plain concatenation of tagged, length-prefixed fields. These helpers produce the
canonical encoding protobuf itself writes (proto3 defaults left out), so a body's bytes equal what
the generated classes would serialize; tests/unit/test_sink_wire.py compares them on random input.
OTLP input is read through the views in `proto/otlp_views.proto`, parsed by upb, never by hand.
"""

from __future__ import annotations

import struct
from typing import NoReturn, TypeVar

from google.protobuf.message import DecodeError, Message

from kotel.otlp import OtlpDecodeError, Signal, decode_protobuf
from kotel.otlp.sizing import encode_varint

M = TypeVar("M", bound=Message)
_DOUBLE = struct.Struct("<Bd")  # a field-1 double: tag 0x09, then the value
_ZERO_DOUBLE = b"\x09" + bytes(8)  # +0.0 has all bits clear: proto3 leaves it out (-0.0 is kept)
_UINT64 = (1 << 64) - 1


def varint(n: int) -> bytes:
    """A varint; negative numbers (int64 fields) as their 64-bit two's complement, as protobuf does."""
    if 0 <= n < 0x80:
        return bytes((n,))
    if 0 < n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if 0 < n < 0x10000000:  # unrolled up to four bytes; nanoseconds of a second take four or five
        if n < 0x200000:
            return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
    return encode_varint(n & _UINT64 if n < 0 else n)  # five bytes or more, or negative: the core's loop


def field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message) with a one-byte tag."""
    size = len(payload)
    return bytes((tag, size)) + payload if size < 0x80 else bytes((tag,)) + varint(size) + payload


def string_field(tag: int, text: str) -> bytes:
    """A proto3 string field: nothing at all when empty."""
    return field(tag, text.encode()) if text else b""


def label_pair(name: str, value: str) -> bytes:
    """A remote-write Label or a Loki LabelPairAdapter (name = 1, value = 2), without its own tag."""
    return string_field(0x0A, name) + string_field(0x12, value)


def sample_time(ms: int) -> bytes:
    """A Sample's timestamp field (2, int64), to be shared by the samples of one time."""
    return b"\x10" + varint(ms) if ms else b""


def sample(value: float, time_field: bytes) -> bytes:
    """A remote-write Sample (value = 1 double, timestamp = 2 int64) framed as TimeSeries.samples (2)."""
    body = _DOUBLE.pack(0x09, value)
    body = time_field if body == _ZERO_DOUBLE else body + time_field
    return _SAMPLE_HEADS[len(body)] + body  # at most 9 + 11 bytes: a one-byte length


_SAMPLE_HEADS = tuple(bytes((0x12, size)) for size in range(21))


def timestamp(time_ns: int) -> bytes:
    """A google.protobuf.Timestamp (seconds = 1, nanos = 2) from nanoseconds since the epoch."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return (b"\x08" + varint(seconds) if seconds else b"") + (b"\x10" + varint(nanos) if nanos else b"")


def parse_view(view: type[M], signal: Signal, data: bytes) -> M:
    """Parse a record with a view; a malformed record fails with decode_protobuf's own error."""
    try:
        return view.FromString(data)
    except DecodeError:
        raise_invalid(signal, data)


def raise_invalid(signal: Signal, data: bytes) -> NoReturn:
    """Raise the OtlpDecodeError the full OTLP parse gives (a part a view keeps as bytes was invalid)."""
    decode_protobuf(signal, data)
    raise OtlpDecodeError(f"invalid OTLP/protobuf {Signal(signal).request_class.__name__}: malformed field")
