"""The load test's topology keeps event time where tail sampling decides on it; scenarios warm up."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from loadtest.pipeline import Wiring, write_topology
from loadtest.scenario import Scenario, load_scenario

SCENARIOS = Path(__file__).parents[2] / "loadtest" / "scenarios"


@pytest.mark.parametrize("tail_sampling", [True, False])
def test_trace_topics_keep_the_agents_time_only_when_tail_sampling_decides_on_it(
        tmp_path: Path, tail_sampling: bool) -> None:
    wiring = Wiring(bootstrap="127.0.0.1:9092", prefix="lt", home=tmp_path, grpc_port=1, http_port=2,
                    metrics_port=3, backends={"tempo": "127.0.0.1:4", "prometheus": "http://127.0.0.1:5",
                                              "loki": "http://127.0.0.1:6"})
    topology = write_topology(load_scenario(SCENARIOS / "outage.yaml"), wiring, tail_sampling,
                              tmp_path / "topology.yaml")
    topics, names = topology.topics, topology.topic_names

    def stamp(name: str, group: object, signal: str) -> str:
        return topics.resolve(name, group, signal).config["message.timestamp.type"]  # type: ignore[arg-type]

    event_time = "CreateTime" if tail_sampling else "LogAppendTime"
    assert stamp(names.raw("traces"), topics.raw, "traces") == event_time
    assert stamp(names.deduped("traces"), topics.deduped, "traces") == event_time
    assert stamp(names.raw("metrics"), topics.raw, "metrics") == "LogAppendTime"
    assert stamp(names.deduped("logs"), topics.deduped, "logs") == "LogAppendTime"
    assert stamp(names.sampled_traces, topics.sampled, "traces") == "LogAppendTime"


def test_the_latency_scenario_measures_a_warm_pipeline_and_a_run_needs_some_warm_up() -> None:
    assert load_scenario(SCENARIOS / "latency.yaml").warmup >= timedelta(seconds=60)
    assert Scenario(name="default").warmup == timedelta(seconds=1)
    with pytest.raises(ValidationError, match="warmup must be positive"):
        Scenario(name="cold", warmup="0s")
