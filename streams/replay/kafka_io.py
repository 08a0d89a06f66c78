"""The replay's Kafka side: a source read by manual assignment, a topic target, the dead-letter writer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from kotel.kafka.deadletter import dead_letter_headers
from kotel.kafka.topics import SIGNALS
from streams.replay.plan import Unit
from streams.replay.records import make_record
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord

log = logging.getLogger("kotel.replay")

Read = tuple[Unit, int, SinkRecord]

# Produce errors no retry can fix: the record itself, or the target's rules, refuse it.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError._INVALID_ARG,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_EXCEPTION,
    }
)


_BATCH_TOO_LARGE = ("MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE")


class TargetFailed(RuntimeError):
    """The target cannot go on at all (a fatal producer error): retrying would not help."""


def classify(error: KafkaError) -> Result:
    if error.fatal():  # the idempotent producer cannot go on; the checkpoint holds the position
        raise TargetFailed(f"the producer failed for good: {error.name()}: {error.str()}")
    outcome = Outcome.PERMANENT if error.code() in _PERMANENT else Outcome.RETRY
    return Result(outcome, f"{error.name()}: {error.str()}")


class KafkaSource:
    """Reads each unit's [next, end) of one topic; never subscribes, never commits, so no group notices.

    librdkafka needs a group.id even for assign(); the one given is only a name here (the consumer never
    joins it). A partition is finished at the first record at or past its end, or at end of partition.
    """

    def __init__(
        self, config: dict[str, Any], topic: str, units: Sequence[Unit], prefix: str, group_id: str
    ) -> None:
        self.topic, self.prefix = topic, prefix
        self.consumer = Consumer(
            {
                **config,
                "group.id": group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )
        self._units = {u.partition: u for u in units}
        self._position = {u.partition: u.next for u in units}
        self._open = {u.partition for u in units if not u.done}
        if self._open:
            self.consumer.assign([TopicPartition(topic, p, self._position[p]) for p in sorted(self._open)])

    def read(self, max_records: int, timeout: float) -> list[Read] | None:
        """The next records in range (possibly none yet); None once every partition reached its end."""
        if not self._open:
            return None
        out: list[Read] = []
        for msg in self.consumer.consume(max_records, timeout):
            p = msg.partition()
            if p not in self._open:
                continue
            unit = self._units[p]
            error = msg.error()
            if error is not None:
                self._on_error(msg, error, unit)
                continue
            offset = msg.offset()
            if offset >= unit.end:
                self._finish(p)
                continue
            record = make_record(
                self.topic,
                p,
                offset,
                msg.key(),
                msg.value() or b"",
                msg.headers() or (),
                msg.timestamp()[1],
                self.prefix,
            )
            out.append((unit, offset, record))
            self._position[p] = offset + 1
            if offset + 1 >= unit.end:
                self._finish(p)
        return out

    def _on_error(self, msg: Message, error: KafkaError, unit: Unit) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            if msg.offset() >= unit.end:  # a compacted or transactional tail: no record sits at end - 1
                self._finish(unit.partition)
            return
        if error.fatal():
            raise KafkaException(error)
        log.warning("reading %s[%d]: %s", self.topic, unit.partition, error.str())

    def _finish(self, partition: int) -> None:
        self._open.discard(partition)
        self._position[partition] = self._units[partition].end
        self.consumer.pause([TopicPartition(self.topic, partition)])

    def positions(self) -> dict[str, int]:
        return {str(p): pos for p, pos in self._position.items()}

    def close(self) -> None:
        self.consumer.close()  # auto commit is off: closing commits nothing


def topic_exists(client: Any, topic: str, timeout: float = 15.0) -> bool:
    meta = client.list_topics(timeout=timeout).topics.get(topic)
    return meta is not None and (meta.error is None or meta.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART)


class TopicTarget:
    """A Deliverer for topics: idempotent, acks=all, key and headers kept, one Result per record.

    The original timestamp is not kept: a record replayed with a week-old CreateTime would fall to the
    target topic's time retention right away. ``topic=None`` sends each record to its own ``topic``
    (the origin of a re-driven dead letter, the topic column of a spill or archive row).
    """

    signals = SIGNALS

    def __init__(self, config: dict[str, Any], topic: str | None, *, timeout: float = 60.0) -> None:
        self.name = topic or "origin topics"
        self.topic = topic
        self.timeout = timeout
        self.producer = Producer(
            {
                **config,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 20,
                "compression.type": "lz4",
                "message.timeout.ms": int(timeout * 1000),
            }
        )
        self._exists: dict[str, bool] = {}

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        return await asyncio.to_thread(self._send, records)

    def _known(self, topic: str) -> bool:
        if topic not in self._exists:
            self._exists[topic] = topic_exists(self.producer, topic)
        return self._exists[topic]

    def _send(self, records: Sequence[SinkRecord]) -> list[Result]:
        results = self._produce(records)
        oversize = [i for i, r in enumerate(results) if r.reason.startswith(_BATCH_TOO_LARGE)]
        if len(records) > 1 and oversize:
            # The broker refuses a whole batch over the topic's max.message.bytes, small records with the
            # big one: sent alone, only the records too large by themselves are refused for good. (They
            # land after the rest of the chunk: order holds among them, not across the refusal.)
            for i in oversize:
                results[i] = self._produce([records[i]])[0]
        return results

    def _produce(self, records: Sequence[SinkRecord]) -> list[Result]:
        results: list[Result | None] = [None] * len(records)

        def done(index: int, error: KafkaError | None, _msg: Message) -> None:
            results[index] = OK if error is None else classify(error)

        for i, record in enumerate(records):
            topic = self.topic or record.topic
            if not self._known(topic):
                results[i] = Result(Outcome.PERMANENT, f"topic {topic!r} does not exist")
                continue
            while True:
                try:
                    self.producer.produce(
                        topic,
                        record.value,
                        record.key,
                        headers=list(record.headers),
                        on_delivery=partial(done, i),
                    )
                    break
                except BufferError:  # librdkafka's queue is full: let deliveries drain first
                    self.producer.poll(0.1)
                except KafkaException as exc:
                    results[i] = classify(exc.args[0])
                    break
        while any(r is None for r in results):
            self.producer.flush(1.0)  # message.timeout.ms bounds this: every record gets a report
        return [r for r in results if r is not None]

    async def close(self) -> None:
        await asyncio.to_thread(self.producer.flush, 10)


class DeadLetterer:
    """Writes records the target refused for good to ``<prefix>.deadletter`` with their origin."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self._config = config
        self._producer: Producer | None = None

    def send(self, failed: Sequence[tuple[SinkRecord, str]]) -> None:
        """Blocking; raises when the dead-letter topic does not acknowledge (nothing may be lost)."""
        if self._producer is None:
            self._producer = Producer({**self._config, "enable.idempotence": True, "acks": "all"})
            if not topic_exists(self._producer, self.topic):
                raise RuntimeError(
                    f"dead-letter topic {self.topic!r} does not exist (kotel topology apply creates it)"
                )
        errors: list[KafkaError] = []
        for record, reason in failed:
            headers = dead_letter_headers(
                reason, record.topic, record.partition, record.offset, record.headers
            )
            self._producer.produce(
                self.topic,
                record.value,
                record.key,
                headers=headers,
                on_delivery=lambda err, _m: errors.append(err) if err else None,
            )
        if self._producer.flush(60) != 0 or errors:
            raise RuntimeError(
                f"dead-letter topic {self.topic!r} did not acknowledge "
                f"({errors[0].str() if errors else 'timeout'})"
            )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
