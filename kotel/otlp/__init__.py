"""OTLP shared core: signals, protobuf and OTLP/JSON codecs, validation, partition keys and splitting.

Import from here; the submodules are internal and may be reorganised.
"""

from kotel.otlp.batching import merge_requests, resource_key, split_by_key
from kotel.otlp.entries import Entry, entries, frame, join
from kotel.otlp.jsoncodec import decode_json, encode_json
from kotel.otlp.signals import (
    OtlpDecodeError,
    OtlpSizeError,
    Signal,
    count_items,
    decode_protobuf,
    signal_of,
)
from kotel.otlp.sizing import split_serialized, split_to_max_bytes, split_wire
from kotel.otlp.validate import validate_request

__all__ = [
    "Entry",
    "OtlpDecodeError",
    "OtlpSizeError",
    "Signal",
    "count_items",
    "decode_json",
    "decode_protobuf",
    "encode_json",
    "entries",
    "frame",
    "join",
    "merge_requests",
    "resource_key",
    "signal_of",
    "split_by_key",
    "split_serialized",
    "split_to_max_bytes",
    "split_wire",
    "validate_request",
]
