"""Consumer group names come from one place, as topic names do."""

from __future__ import annotations

from kotel.kafka.topics import TopicNames


def test_stage_and_sink_groups_carry_the_prefix_and_a_name_kafka_accepts() -> None:
    names = TopicNames("acme")
    assert names.stage_group("dedup") == "kotel-acme-dedup"
    assert names.sink_group("otlp/tempo") == "kotel-acme-sink-otlp_tempo"
    assert names.sink_group("loki.eu-1") == "kotel-acme-sink-loki.eu-1"
