"""The edge agent's processors: pure functions over OTLP export requests, built by component type.

``build_processor("filter/tenant-a", FilterConfig(...), metrics)`` returns the processor for the Collector
type before the slash. Each processor mutates the request in place and returns it, or None once nothing
is left; drops are counted in ``AgentMetrics.dropped`` by reason. Batching is not a processor here: the
agent's batcher does it.
"""

from __future__ import annotations

from pydantic import BaseModel

from agents.contracts import Processor
from agents.processors.degrade import DegradeProcessor
from agents.processors.filter import FilterProcessor
from agents.processors.groupbyattrs import GroupByAttrsProcessor
from agents.processors.memory_limiter import MemoryLimiter
from agents.processors.resource import ResourceProcessor
from agents.processors.sampler import ProbabilisticSampler
from agents.telemetry import AgentMetrics
from kotel.topology.base import component_type
from kotel.topology.exporters import DegradeConfig
from kotel.topology.processors import (
    FilterConfig,
    GroupByAttrsConfig,
    MemoryLimiterConfig,
    ProbabilisticSamplerConfig,
    ResourceConfig,
)

__all__ = [
    "DegradeProcessor",
    "FilterProcessor",
    "GroupByAttrsProcessor",
    "MemoryLimiter",
    "ProbabilisticSampler",
    "ResourceProcessor",
    "build_processor",
]

_MODELS: dict[str, type[BaseModel]] = {
    "resource": ResourceConfig,
    "filter": FilterConfig,
    "probabilistic_sampler": ProbabilisticSamplerConfig,
    "groupbyattrs": GroupByAttrsConfig,
    "memory_limiter": MemoryLimiterConfig,
    "degrade": DegradeConfig,  # kotel: the backpressure step, configured under the kafka exporter
}


def build_processor(
    name: str,
    config: BaseModel,
    metrics: AgentMetrics,
    tenancy_attribute: str = "tenant",
    *,
    hash_seed: int = 0,
) -> Processor:
    """The processor for component ``name`` (``type[/id]``); ``hash_seed`` is the degrade step's sampler seed.

    Raises ValueError for a type the agent has no processor for, TypeError for a config of the wrong model.
    """
    kind = component_type(name)
    model = _MODELS.get(kind)
    if model is None:
        hint = " (batching is the agent's batcher, not a processor)" if kind == "batch" else ""
        raise ValueError(
            f"no agent processor for component {name!r} of type {kind!r}{hint}; "
            f"known types: {', '.join(sorted(_MODELS))}"
        )
    if not isinstance(config, model):
        raise TypeError(f"component {name!r} needs a {model.__name__}, got {type(config).__name__}")
    if isinstance(config, ResourceConfig):
        return ResourceProcessor(config, metrics, name, tenancy_attribute)
    if isinstance(config, FilterConfig):
        return FilterProcessor(config, metrics, name)
    if isinstance(config, ProbabilisticSamplerConfig):
        return ProbabilisticSampler(config, metrics, name)
    if isinstance(config, GroupByAttrsConfig):
        return GroupByAttrsProcessor(config, metrics, name)
    if isinstance(config, MemoryLimiterConfig):
        return MemoryLimiter(config, name=name)
    assert isinstance(config, DegradeConfig)
    return DegradeProcessor(config, metrics, name, hash_seed=hash_seed)
