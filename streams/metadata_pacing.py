"""aiokafka retries a failed metadata request at once, in a loop: the broker out of reach made a stage
worker spin (~3,000 attempts a second, each logged twice, a core burnt for the whole outage).

aiokafka's producer sender, finding partitions without a known leader, asks for a metadata update and
waits for the first of its futures; a refused connection fails that update at once, so it asks again.
Kafka's Java client waits ``retry.backoff.ms`` before retrying a failed metadata request; here every
aiokafka client in the process does the same (its own ``retry_backoff_ms``, 100 ms by default): a
worker paces `AIOKafkaClient._metadata_update` when its app is created. Successful updates are not
delayed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.client import AIOKafkaClient

_PACED = "_kotel_paced"


def pace_metadata_retries(client_class: type[Any] = AIOKafkaClient) -> None:
    """Make a failed metadata update wait out the client's retry backoff before the next one."""
    update = client_class._metadata_update
    if getattr(update, _PACED, False):
        return

    async def paced_update(self: Any, cluster_metadata: Any, topics: Any) -> bool:
        failed_at = getattr(self, "_kotel_md_failed_at", None)
        if failed_at is not None:
            wait = failed_at + self._retry_backoff - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        ok = bool(await update(self, cluster_metadata, topics))
        self._kotel_md_failed_at = None if ok else time.monotonic()
        return ok

    setattr(paced_update, _PACED, True)
    client_class._metadata_update = paced_update

