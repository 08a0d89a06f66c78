"""Load a live agent and broker with the seed's edge pipeline and print what it sustained.

Run: .venv/bin/python -m loadtest.agent_bench [--seconds 30] [--signal traces|metrics|logs|all]
     [--concurrency 8] [--items 1024] [--rate REQ_PER_S] [--bootstrap 127.0.0.1:9092]
Needs a running broker (`kotel kafka start`). Starts `kotel agent` as a child process with the seed §1.2
pipeline (resource labels, the /health filter, 50 % probabilistic sampling, batch 1024), offers
pre-encoded OTLP/gRPC requests as fast as the agent answers (closed loop, bounded concurrency), and
prints accepted-and-acknowledged items/s, the agent's CPU and RSS, client round-trip latency and the
agent-added processing latency (from its own histogram). A script, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import psutil

from kotel.kafka.admin import create_topics
from kotel.otlp import Signal, count_items, samples
from kotel.topology import parse_topology

TOPOLOGY = """
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics: {{prefix: "{prefix}", defaults: {{partitions: 6}}}}
agent:
  agent_id: bench
  data_dir: "{data}"
  metrics_endpoint: "127.0.0.1:{metrics_port}"
  receivers:
    otlp:
      protocols:
        grpc: {{endpoint: "127.0.0.1:{grpc_port}", max_recv_msg_size_mib: 16}}
  processors:
    resource:
      attributes:
        - {{key: tenant, value: tenant-a, action: upsert}}
        - {{key: env, value: prod, action: insert}}
        - {{key: region, value: us-west, action: insert}}
    filter:
      traces:
        span: ['attributes["http.target"] == "/health"']
    probabilistic_sampler: {{sampling_percentage: 50}}
    batch: {{timeout: 10s, send_batch_size: 1024}}
  exporters:
    kafka: {{backpressure: {{max_in_flight_mib: 256}}}}
    file: {{path: "{data}/spill"}}
  service:
    pipelines:
      traces: {{processors: [resource, filter, probabilistic_sampler, batch], exporters: [kafka, file]}}
      metrics: {{processors: [resource, batch], exporters: [kafka, file]}}
      logs: {{processors: [resource, batch], exporters: [kafka, file]}}
"""

BUILDERS = {
    Signal.TRACES: lambda n, seed: samples.traces(n, seed=seed, health_share=0.1),
    Signal.METRICS: lambda n, seed: samples.metrics(n, seed=seed),
    Signal.LOGS: lambda n, seed: samples.logs(n, seed=seed),
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _histogram_quantiles(text: str, name: str, signal: str, qs: tuple[float, ...]) -> dict[float, float]:
    """Quantiles from a Prometheus histogram's cumulative buckets (upper bound of the bucket reached)."""
    buckets = []
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket\{{le="([^"]+)",signal="{signal}"\}} (\S+)', line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    return {q: next(le for le, c in buckets if c >= q * total) for q in qs}


def _counter(text: str, name: str, signal: str) -> float:
    m = re.search(rf'{name}_total\{{signal="{signal}"\}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


async def _drive(target: str, signal: Signal, payloads: list[tuple[bytes, int]], seconds: float,
                 concurrency: int, rate: float = 0.0) -> tuple[int, int, list[float], int]:
    """Closed loop (``concurrency`` senders, as fast as answered) or, with ``rate`` > 0, open loop:
    requests leave on a fixed schedule and latency counts from the scheduled time, so a stalled agent
    cannot hide behind a slowed-down sender."""
    method = signal.grpc_method
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        sent_items = ok_items = refused = 0
        latencies: list[float] = []
        deadline = time.monotonic() + seconds

        async def worker(offset: int) -> None:
            nonlocal sent_items, ok_items, refused
            i = offset
            while time.monotonic() < deadline:
                body, items = payloads[i % len(payloads)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    await call(body, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    refused += 1
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.05)
                    continue
                finally:
                    sent_items += items
                latencies.append(time.perf_counter() - t0)
                ok_items += items

        async def one(body: bytes, items: int, scheduled: float) -> None:
            nonlocal sent_items, ok_items, refused
            sent_items += items
            try:
                await call(body, timeout=30)
            except grpc.aio.AioRpcError:
                refused += 1
                return
            latencies.append(time.perf_counter() - scheduled)
            ok_items += items

        if rate > 0:
            start, tasks, i = time.perf_counter(), set(), 0
            while time.perf_counter() - start < seconds:
                scheduled = start + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body, items = payloads[i % len(payloads)]
                task = asyncio.create_task(one(body, items, scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks)
        else:
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return sent_items, ok_items, latencies, refused


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(args: argparse.Namespace) -> dict:
    data = Path(tempfile.mkdtemp(prefix="kotel-bench-"))
    grpc_port, metrics_port = _free_port(), _free_port()
    text = TOPOLOGY.format(bootstrap=args.bootstrap, prefix=f"bench{uuid.uuid4().hex[:6]}", data=data,
                           grpc_port=grpc_port, metrics_port=metrics_port)
    topology_file = data / "topology.yaml"
    topology_file.write_text(text)
    from confluent_kafka.admin import AdminClient

    create_topics(AdminClient({"bootstrap.servers": args.bootstrap}), parse_topology(text).planned_topics())
    log = (data / "agent.log").open("w")
    agent = subprocess.Popen([sys.executable, "-m", "kotel.cli", "agent", "--topology", str(topology_file),
                              "--log-level", "WARNING"], stderr=log)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        proc = psutil.Process(agent.pid)
        signals = list(Signal) if args.signal == "all" else [Signal(args.signal)]
        results = {}
        for signal in signals:
            payloads = []
            for seed in range(16):
                request = BUILDERS[signal](args.items, seed)
                payloads.append((request.SerializeToString(), count_items(request)))
            cpu0, t0 = proc.cpu_times(), time.monotonic()
            rss_peak = 0

            async def sample_rss(stop: asyncio.Event) -> None:
                nonlocal rss_peak
                while not stop.is_set():
                    rss_peak = max(rss_peak, proc.memory_info().rss)
                    await asyncio.sleep(0.5)

            async def main(sig: Signal = signal, pl: list = payloads) -> tuple:
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_rss(stop))
                out = await _drive(f"127.0.0.1:{grpc_port}", sig, pl, args.seconds, args.concurrency,
                                   args.rate)
                stop.set()
                await sampler
                return out

            _sent, ok, latencies, refused = asyncio.run(main())
            wall = time.monotonic() - t0
            cpu1 = proc.cpu_times()
            scraped = _scrape(metrics_port)
            quantiles = _histogram_quantiles(scraped, "kotel_agent_processing_seconds", signal.value,
                                             (0.5, 0.95, 0.99))
            cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            results[signal.value] = r = {
                "seconds": round(wall, 1),
                "accepted_items_per_s": round(ok / wall),
                "published_records": _counter(scraped, "kotel_agent_published_records", signal.value),
                "refused_requests": refused,
                "agent_cpu_percent": round(100 * cpu / wall),
                "agent_rss_peak_mib": round(rss_peak / 2**20, 1),
                "client_latency_ms": {f"p{int(q * 100)}": round(_pct(latencies, q) * 1000, 2)
                                      for q in (0.5, 0.95, 0.99)},
                "agent_processing_ms_upper_bound": {
                    f"p{int(q * 100)}": v * 1000 for q, v in quantiles.items()
                },
            }
            print(f"{signal.value:8s} {r['accepted_items_per_s']:>9,} items/s accepted+acked  "
                  f"cpu {r['agent_cpu_percent']}%  rss {r['agent_rss_peak_mib']} MiB  "
                  f"client p50/p95/p99 {r['client_latency_ms']} ms  "
                  f"agent-added {r['agent_processing_ms_upper_bound']} ms", flush=True)
        return results
    finally:
        agent.terminate()
        agent.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KOTEL_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--signal", default="all", choices=["all", "traces", "metrics", "logs"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--items", type=int, default=1024, help="items per OTLP request")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests/s, open loop (default 0: closed loop at --concurrency)")
    args = parser.parse_args()
    results = run(args)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
