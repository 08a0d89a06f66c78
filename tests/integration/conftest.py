"""Everything under tests/integration is marked ``integration``; broker fixtures: tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import free_ports

__all__ = ["free_ports"]

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only ours, hence the path check.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)
