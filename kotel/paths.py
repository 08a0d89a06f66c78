"""Where kotel keeps its state on this machine.

Everything lives under one project-local folder (``$KOTEL_HOME``, default ``./.kotel``) so a
newcomer can see, and delete, all of it: downloaded jars, broker data, logs, spill files.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("KOTEL_HOME", ".kotel")).resolve()


def cache_dir() -> Path:
    """Downloads that can be shared by every broker and test run (Kafka jars, built test servers)."""
    return Path(os.environ.get("KOTEL_CACHE", str(home() / "cache"))).resolve()


def logs_dir() -> Path:
    return home() / "logs"


def data_dir() -> Path:
    return home() / "data"
