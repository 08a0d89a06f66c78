"""glibc's malloc with a fixed mmap threshold, so that large buffers go back to the system when freed.

glibc serves a block above its mmap threshold (128 KiB at first) with its own mapping, returned to the
system on free, but raises the threshold to the size of every such block that is freed, up to 32 MiB. A
stage worker frees a fetch response of up to 16 MiB per partition every few milliseconds: after the first
one, the next ones are carved from the heap, and the freed space between live records stays resident.
Measured with the dedup stage draining a 15M-identity window (`loadtest.dedup_bench --skip-throughput`):
peak RSS 512 MiB with glibc's sliding threshold, 446-468 MiB with a fixed 4 MiB one, at the same
throughput (loadtest/results/stages.md, round 9). A fixed 128 KiB threshold held memory lower still but
cost a third of the throughput: every record value then got its own mapping and its page faults.

``MALLOC_MMAP_THRESHOLD_`` or a ``glibc.malloc.mmap_threshold`` tunable in the environment wins: the
process then keeps what the operator chose. Elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 << 20  # above a record value (~0.3 MiB for 1000 spans), below a fetch buffer
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, <malloc.h>


def _chosen_by_operator(environ: Mapping[str, str]) -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in environ or "mmap_threshold" in environ.get("GLIBC_TUNABLES", "")


def fix_mmap_threshold(size: int = MMAP_THRESHOLD, environ: Mapping[str, str] | None = None) -> bool:
    """Fix glibc's mmap threshold at ``size`` bytes for this process; False when left as it was."""
    if _chosen_by_operator(os.environ if environ is None else environ):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, size))
    if not done:
        log.warning("glibc refused an mmap threshold of %d bytes; freed buffers may stay resident", size)
    return done
