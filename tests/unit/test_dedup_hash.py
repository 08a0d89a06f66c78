"""Span identities: the C, numpy and plain-Python paths give the same bits, and the bits spread."""

from __future__ import annotations

import random

import pytest

from kotel.otlp.spanwire import MATERIAL_SIZE
from streams.stages import dedup_hash
from streams.stages.dedup_hash import DIGEST_SIZE, digests_python, span_digests

GOLDEN = "83b3fc08ac4ce0b89c8506aa5945be65"  # computed by the numpy path before the C one existed


def _rows(count: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(32) + b"\x10\x08" for _ in range(count))


@pytest.mark.parametrize("count", [0, 1, 11, 12, 13, 500])
def test_c_numpy_and_loop_agree(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(count)
    vectorised = digests_python(rows)
    assert span_digests(rows) == vectorised  # C when built (test_spanscan.py checks that it is)
    monkeypatch.setattr(dedup_hash, "_NUMPY_FROM", 10**9)
    assert digests_python(rows) == vectorised
    assert len(vectorised) == count and all(len(d) == DIGEST_SIZE for d in vectorised)


def test_a_known_identity_keeps_its_bits() -> None:
    """Stored identities must not change between releases (or paths): a window of spans would pass again."""
    material = bytes(range(1, 25)) + (1234567890123456789).to_bytes(8, "little") + b"\x10\x08"
    assert span_digests(material) == digests_python(material) == [bytes.fromhex(GOLDEN)]


def test_trailing_zero_bytes_are_kept() -> None:
    """numpy's bytes strings drop trailing NULs; the void rows used here must not."""
    rows = _rows(4000)
    assert {len(d) for d in span_digests(rows)} == {DIGEST_SIZE}


def test_one_bit_changes_about_half_the_bits_in_both_lanes() -> None:
    base = bytearray(_rows(1))
    reference = int.from_bytes(span_digests(bytes(base))[0], "little")
    flips = []
    for bit in range(32 * 8):
        changed = bytearray(base)
        changed[bit // 8] ^= 1 << (bit % 8)
        diff = int.from_bytes(span_digests(bytes(changed))[0], "little") ^ reference
        flips.append((bin(diff & (1 << 64) - 1).count("1"), bin(diff >> 64).count("1")))
    for low, high in flips:
        assert 14 <= low <= 50 and 14 <= high <= 50, flips
    assert 30 <= sum(low + high for low, high in flips) / len(flips) / 2 <= 34


def test_no_collisions_among_structured_inputs() -> None:
    """Sequential span ids and start times one nanosecond apart, within one trace and across traces
    that differ only in their upper half (64-bit trace ids padded with zeros)."""
    rows = []
    for trace in range(64):
        tid = bytes(8) + trace.to_bytes(8, "big")
        for n in range(256):
            rows.append(tid + n.to_bytes(8, "big") + (1_700_000_000_000_000_000 + n).to_bytes(8, "little")
                        + b"\x10\x08")
    digests = span_digests(b"".join(rows))
    assert len(rows) * MATERIAL_SIZE == len(b"".join(rows))
    assert len(set(digests)) == len(rows)
