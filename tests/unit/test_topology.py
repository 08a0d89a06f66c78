"""Topology validation: every shipped file is valid; broken files fail with the exact message."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from kotel.topology import TopologyError, load_topology, parse_topology
from kotel.topology.durations import parse_duration

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = sorted((ROOT / "topologies").glob("*.yaml"))
# The seed's §4.1 block uses ${TENANT} and ${ENV} without defaults, as users will.
SEED_ENV = {"TENANT": "team-a", "ENV": "prod"}

MINIMAL_AGENT = """
agent:
  receivers:
    otlp:
      protocols:
        grpc: {endpoint: "0.0.0.0:4317"}
  processors:
    batch: {}
  exporters:
    kafka: {}
  service:
    pipelines:
      traces:
        receivers: [otlp]
        processors: [batch]
        exporters: [kafka]
"""


def test_there_are_topologies_to_check() -> None:
    names = {p.name for p in TOPOLOGIES}
    assert {"dev.yaml", "compose.yaml", "seed-edge-agent.yaml", "seed-gateway.yaml", "seed-ordering.yaml",
            "seed-spill.yaml", "seed-tenant-labels.yaml", "seed-tenant-pipelines.yaml",
            "seed-remote-config.yaml"} <= names


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.name)
def test_every_shipped_topology_is_valid(path: Path) -> None:
    topology = load_topology(path, env=SEED_ENV)
    assert topology.planned_topics()


def test_minimal_agent_is_valid_and_has_collector_defaults() -> None:
    topology = parse_topology(MINIMAL_AGENT)
    batch = topology.agent.processors["batch"]
    assert batch.timeout == timedelta(milliseconds=200)
    assert batch.send_batch_size == 8192
    kafka = topology.agent.exporters["kafka"]
    assert kafka.producer.compression == "zstd"
    assert kafka.retry_on_failure.initial_interval == timedelta(seconds=1)
    assert kafka.retry_on_failure.max_interval == timedelta(seconds=30)
    assert kafka.retry_on_failure.max_elapsed_time == timedelta(minutes=5)
    assert kafka.backpressure.high_water_mark == 0.8


def _error(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "t.yaml", env=env or {})
    return info.value.messages


def test_unknown_key_is_an_error_with_line_and_path() -> None:
    text = MINIMAL_AGENT.replace("    batch: {}", "    batch:\n      timeoutt: 1s")
    assert _error(text) == ["t.yaml:9: agent.processors.batch.timeoutt: unknown key (not part of this "
                            "section; check the spelling)"]


def test_bad_type() -> None:
    text = MINIMAL_AGENT.replace("    batch: {}", "    batch:\n      send_batch_size: many")
    assert _error(text) == ["t.yaml:9: agent.processors.batch.send_batch_size: input should be a valid "
                            "integer, unable to parse string as an integer, got 'many'"]


def test_bad_duration() -> None:
    text = MINIMAL_AGENT.replace("    batch: {}", "    batch:\n      timeout: 10 seconds")
    assert _error(text) == ["t.yaml:9: agent.processors.batch.timeout: expected a duration like 200ms, 10s "
                            "or 1m30s, got '10 seconds'"]


def test_missing_pipeline_exporter() -> None:
    text = MINIMAL_AGENT.replace("exporters: [kafka]", "exporters: [kafka, otlp/backend]")
    assert _error(text) == ["t.yaml:2: agent: pipeline 'traces' uses exporter 'otlp/backend', which is not "
                            "defined under exporters (defined: kafka)"]


def test_pipeline_without_exporters() -> None:
    text = MINIMAL_AGENT.replace("exporters: [kafka]", "exporters: []")
    assert _error(text) == [
        "t.yaml:16: agent.service.pipelines.traces.exporters: expected at least 1 item(s), got []"
    ]


def test_undefined_env_var_without_default() -> None:
    text = MINIMAL_AGENT + "  agent_id: ${KOTEL_TEST_UNSET_VAR}\n"
    assert _error(text) == ["t.yaml:17: agent.agent_id: environment variable KOTEL_TEST_UNSET_VAR is not set "
                            "and has no default (write ${KOTEL_TEST_UNSET_VAR:-value} to give one)"]


def test_env_expansion_default_and_typed_scalar() -> None:
    text = MINIMAL_AGENT.replace("    batch: {}", "    batch:\n      send_batch_size: ${SIZE:-512}")
    assert parse_topology(text, env={}).agent.processors["batch"].send_batch_size == 512
    assert parse_topology(text, env={"SIZE": "64"}).agent.processors["batch"].send_batch_size == 64
    dollar = MINIMAL_AGENT + "  agent_id: cost-$$5\n"
    assert parse_topology(dollar, env={}).agent.agent_id == "cost-$5"


def test_unknown_processor_type() -> None:
    text = MINIMAL_AGENT.replace("    batch: {}", "    batch: {}\n    tail_sampler: {}")
    assert _error(text) == [
        "t.yaml:9: agent.processors.tail_sampler: unknown processor type 'tail_sampler'; expected one of: "
        "batch, filter, groupbyattrs, memory_limiter, probabilistic_sampler, resource"
    ]


def test_several_errors_are_reported_together() -> None:
    broken = "    batch:\n      timeout: soon\n      send_batch_size: -1"
    text = MINIMAL_AGENT.replace("    batch: {}", broken)
    assert len(_error(text)) == 2


def test_bad_yaml_names_the_line() -> None:
    assert _error("agent:\n  receivers: [a\n") == [
        "t.yaml:3: <root>: not valid YAML: expected ',' or ']', but got '<stream end>'"
    ]


def test_tail_sampling_policy_errors() -> None:
    base = "gateway:\n  processors:\n    tail_sampling:\n      policies:\n"
    wrong_block = base + "        - {name: slow, type: latency, status_code: {status_codes: [ERROR]}}\n"
    assert _error(wrong_block) == [
        "t.yaml:5: gateway.processors.tail_sampling.policies[0]: policy of type 'latency' has a "
        "'status_code' block; did you mean type: status_code?"
    ]
    unknown = base + "        - {name: x, type: latencyy}\n"
    assert _error(unknown)[0].startswith(
        "t.yaml:5: gateway.processors.tail_sampling.policies[0]: unknown policy type 'latencyy'; expected "
        "one of: always_sample, and, boolean_attribute,"
    )
    bad_code = base + "        - {name: e, type: status_code, status_code: {status_codes: [FAIL]}}\n"
    assert _error(bad_code) == [
        "t.yaml:5: gateway.processors.tail_sampling.policies[0].status_code.status_codes[0]: expected one of "
        "'OK', 'ERROR' or 'UNSET', got 'FAIL'"
    ]


def test_routing_to_undefined_exporter() -> None:
    text = """
gateway:
  processors:
    routing:
      table:
        - {value: tenant-a, exporters: [otlp/a]}
  exporters:
    otlp/b: {endpoint: "b:4317"}
"""
    assert _error(text) == [
        "t.yaml:2: gateway: routing sends to exporter 'otlp/a', which is not defined under exporters"
    ]


def test_tenant_name_must_fit_a_topic_name() -> None:
    text = """
gateway:
  processors:
    routing:
      table:
        - {value: "tenant a", exporters: [file]}
  exporters:
    file: {path: /tmp/x}
"""
    assert _error(text) == [
        "t.yaml:6: gateway.processors.routing.table[0].value: string should match pattern "
        "'^[A-Za-z0-9._-]{1,100}$', got 'tenant a'"
    ]


def test_remote_config_fragment_is_validated() -> None:
    text = """
control_plane:
  remote_config:
    priority: URGENT
    config:
      processors:
        probabilistic_sampler: {sampling_percentage: 500}
"""
    assert _error(text) == [
        "t.yaml:7: control_plane.remote_config.config.processors.probabilistic_sampler.sampling_percentage: "
        "expected a number <= 100, got 500"
    ]


def test_secrets_are_not_printed() -> None:
    text = "kafka:\n  sasl: {username: u, password: hunter2}\n  security_protocol: SASL_SSL\n"
    topology = parse_topology(text)
    assert "hunter2" not in repr(topology)
    assert topology.kafka.librdkafka_config()["sasl.password"] == "hunter2"


def test_librdkafka_clients_disable_nagle_unless_the_topology_says_otherwise() -> None:
    assert parse_topology("kafka: {}\n").kafka.librdkafka_config()["socket.nagle.disable"] is True
    text = "kafka:\n  librdkafka: {socket.nagle.disable: false}\n"
    assert parse_topology(text).kafka.librdkafka_config()["socket.nagle.disable"] is False


def test_topic_plan_layers_defaults_group_and_signal() -> None:
    text = """
topics:
  prefix: acme
  defaults: {partitions: 4, retention: 48h}
  raw: {partitions: 8, metrics: {partitions: 2, cleanup_policy: compact}}
"""
    plan = {t.name: t for t in parse_topology(text).planned_topics()}
    assert plan["acme.raw.traces"].partitions == 8
    assert plan["acme.raw.metrics"].partitions == 2
    assert plan["acme.raw.metrics"].config == {"retention.ms": "172800000", "cleanup.policy": "compact"}
    assert plan["acme.deduped.logs"].partitions == 4
    assert "acme.sampled.traces" not in plan  # no tail_sampling configured


@pytest.mark.parametrize(("text", "seconds"), [("200ms", 0.2), ("10s", 10), ("1m30s", 90), ("2h", 7200),
                                               ("0", 0), ("1.5s", 1.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10 s", "1x", "-1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like 200ms, 10s or 1m30s"):
        parse_duration(text)


def test_filter_condition_that_does_not_parse_names_its_position() -> None:
    text = MINIMAL_AGENT.replace(
        "    batch: {}", "    batch: {}\n    filter:\n      traces:\n        span:\n"
        "          - 'name == \"a\"'\n          - 'attributes[\"x\"] == '"
    )
    assert _error(text) == [
        "t.yaml:11: agent.processors.filter.traces.span: condition [1]: invalid OTTL condition "
        "'attributes[\"x\"] == ': unexpected end of input at column 19, expected a value (string, number, "
        "bool, nil, path or function call)"
    ]
