"""The agent's own metrics, in a registry per agent instance (no globals: tests run several agents)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kotel.gc_pauses import PauseHistogram


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.gc_pauses = PauseHistogram("kotel_agent_gc_pause_seconds", r)
        self.received = Counter("kotel_agent_received_items", "Items received, by signal and transport",
                                ["signal", "transport"], registry=r)
        self.accepted = Counter("kotel_agent_accepted_items", "Items acknowledged to clients (durable)",
                                ["signal"], registry=r)
        self.refused = Counter("kotel_agent_refused_items", "Items refused with a retryable error, by reason",
                               ["signal", "reason"], registry=r)
        self.rejected_requests = Counter("kotel_agent_rejected_requests",
                                         "Requests rejected as bad input, by transport and reason",
                                         ["transport", "reason"], registry=r)
        self.dropped = Counter("kotel_agent_dropped_items",
                               "Items dropped on purpose, by reason (filtered, sampled_out, degraded, ...)",
                               ["signal", "reason"], registry=r)
        self.tenant_overwrites = Counter("kotel_agent_tenant_overwrites",
                                         "Resources whose tenant label the agent overwrote", ["signal"],
                                         registry=r)
        self.published = Counter("kotel_agent_published_records", "Kafka records acknowledged", ["signal"],
                                 registry=r)
        self.publish_errors = Counter("kotel_agent_publish_errors", "Failed Kafka deliveries, by error",
                                      ["error"], registry=r)
        self.queue_utilisation = Gauge("kotel_agent_queue_utilisation",
                                       "In-flight bytes over the in-flight budget (0..1)", registry=r)
        self.in_flight_bytes = Gauge("kotel_agent_in_flight_bytes", "Bytes accepted but not yet durable",
                                     registry=r)
        self.degraded = Gauge("kotel_agent_degraded", "1 while above the high-water mark", registry=r)
        self.breaker_open = Gauge("kotel_agent_circuit_open", "1 while the Kafka circuit breaker is open",
                                  registry=r)
        self.spill_files = Gauge("kotel_agent_spill_files", "Parquet spill files waiting for replay",
                                 registry=r)
        self.spill_bytes = Gauge("kotel_agent_spill_bytes", "Bytes in spill files waiting for replay",
                                 registry=r)
        self.spilled = Counter("kotel_agent_spilled_records", "Records written to the spill", ["signal"],
                               registry=r)
        self.replayed = Counter("kotel_agent_replayed_records", "Spilled records replayed into Kafka",
                                ["signal"], registry=r)
        self.processing_latency = Histogram(
            "kotel_agent_processing_seconds",
            "Agent-added time after decoding: admission and processors, up to the batcher, per request",
            ["signal"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
                                 0.01, 0.015, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.delivery_latency = Histogram(
            "kotel_agent_delivery_seconds", "From receipt to durable (Kafka ack or spill fsync)", ["signal"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
