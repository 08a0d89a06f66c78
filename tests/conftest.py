"""Session fixtures every test folder shares: a real Kafka broker.

One broker per test session, on ports picked at runtime and with its data in a temp dir, so several
sessions (or a developer's own `kotel kafka start`) can run side by side. The jar cache is the
machine's default one (``kotel.paths.cache_dir()``), so the jars download once per machine.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from kotel.kafka.broker import BrokerSettings, KafkaBroker


def free_ports(count: int) -> list[int]:
    """Distinct ports free on 127.0.0.1 right now (held open together so they cannot repeat)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A running single-node broker for the whole session, stopped and deleted at the end."""
    port, controller_port = free_ports(2)
    state_dir = tmp_path_factory.mktemp("kafka")
    settings = BrokerSettings.from_env(port=port, controller_port=controller_port, state_dir=state_dir)
    broker = KafkaBroker(settings)
    broker.start(timeout=90)
    try:
        yield broker
    finally:
        broker.stop()
        # tmp_path_factory keeps the last few sessions' dirs; a broker's data is not worth keeping.
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """``"127.0.0.1:<port>"`` of the session broker, for any Kafka client."""
    return kafka_broker.settings.bootstrap


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory creating uniquely named topics (default 1 partition) that are deleted after the test.

    The broker never auto-creates topics, like a production cluster where topology apply owns them.
    """
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def create(prefix: str = "test", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:12]}"
        futures = admin.create_topics(
            [NewTopic(name, partitions, 1, config=config or {})], operation_timeout=30
        )
        futures[name].result(timeout=30)
        created.append(name)
        return name

    yield create
    if created:
        for future in admin.delete_topics(created, operation_timeout=30).values():
            future.result(timeout=30)
