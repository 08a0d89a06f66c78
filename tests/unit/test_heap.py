"""kotel.heap: a freed large buffer no longer moves glibc's mmap threshold; the next one is mapped again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from kotel.heap import MMAP_THRESHOLD, fix_mmap_threshold

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Reports whether a 1 MiB buffer got its own mapping (mallinfo2's bytes in mapped blocks grow by its size)
# or came from the heap, then the same for an 8 MiB buffer allocated after another one was freed.
_PROBE = """
import ctypes, sys
from kotel.heap import fix_mmap_threshold

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else None

def mapped(size):
    before = libc.mallinfo2().hblkhd
    block = bytearray(size)
    return libc.mallinfo2().hblkhd - before >= size

small = mapped(1 << 20)
first = bytearray(8 << 20)
del first
print(fixed, small, mapped(8 << 20))
"""


def _probe(mode: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_" and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_glibc_alone_maps_a_megabyte_but_serves_the_second_large_buffer_from_the_heap() -> None:
    assert _probe("leave") == "None True False"


def test_a_fixed_threshold_keeps_a_megabyte_on_the_heap_and_maps_every_large_buffer() -> None:
    assert _probe("fix") == "True False True"


def test_the_operators_choice_in_the_environment_wins() -> None:
    assert _probe("fix", MALLOC_MMAP_THRESHOLD_=str(64 << 20)) == "False False False"
    assert _probe("fix", GLIBC_TUNABLES=f"glibc.malloc.mmap_threshold={64 << 20}") == "False False False"


def test_the_threshold_sits_between_a_record_and_a_fetch_buffer() -> None:
    assert 1 << 20 <= MMAP_THRESHOLD <= 16 << 20
    assert fix_mmap_threshold(environ={"MALLOC_MMAP_THRESHOLD_": "1"}) is False
