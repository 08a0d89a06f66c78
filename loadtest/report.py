"""The results folder of a run: ``result.json`` (everything), ``summary.md`` (for people and commits)
and ``chart.png`` (throughput and end-to-end latency over time, per stage and signal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.accounting import STAGE_ORDER

FATES = ("offered", "acked", "refused", "delivered", "filtered", "sampled_out", "deduplicated",
         "dead_lettered", "lost", "queued_at_end", "sink_duplicates", "misrouted")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _arrivals(workload: dict[str, Any]) -> str:
    if workload.get("mode") == "max":
        return "closed loop, as fast as answered"
    return f"open loop, {workload.get('arrivals', 'aligned')} arrivals"


def markdown(result: dict[str, Any]) -> str:
    sc, machine = result["scenario"], result["machine"]
    lines = [f"# Load test `{sc['name']}`: {'PASS' if result['passed'] else 'FAIL'}", ""]
    if sc.get("description"):
        lines += [sc["description"], ""]
    lines += [f"Machine: {machine['cpus']} CPUs, {machine['memory_gib']} GiB, Python {machine['python']}, "
              f"load average at start {machine['load_average']}. Started {result['started']}; "
              f"{result['duration_s']} s of load via {sc['pipeline']['target']} "
              f"({_arrivals(sc['workload'])}) "
              f"(after {sc.get('warmup', '1s')} of warm-up, not in the latencies), "
              f"tail sampling: {result['tail_sampling']}.", ""]
    for problem in result["problems"]:
        lines.append(f"- **{problem}**")
    if result["problems"]:
        lines.append("")
    signals = list(result["signals"])
    lines += ["## Accounting (items)", "", "| fate | " + " | ".join(signals) + " |",
              "|---|" + "---|" * len(signals)]
    for fate in FATES:
        cells = " | ".join(_fmt(result["signals"][s]["fates"].get(fate, 0)) for s in signals)
        lines.append(f"| {fate} | {cells} |")
    lines += ["", "## Rates (items/s over the load window)", "",
              "| stage | " + " | ".join(signals) + " |", "|---|" + "---|" * len(signals)]
    for stage in ("offered", "accepted", *STAGE_ORDER):
        row = [result["signals"][s]["rates"].get(stage) for s in signals]
        if any(v is not None for v in row):
            lines.append(f"| {stage} | " + " | ".join(_fmt(v) for v in row) + " |")
    lines += ["", "## Latency (ms): p50 / p95 / p99", "",
              "| step | " + " | ".join(signals) + " |", "|---|" + "---|" * len(signals)]
    steps = ("client_ack", *STAGE_ORDER, "end_to_end", "end_to_end_without_decision_wait")
    for step in steps:
        cells = []
        for s in signals:
            lat = result["signals"][s]["latency_ms"].get(step)
            cells.append("-" if not lat or not lat["n"] else f"{lat['p50']} / {lat['p95']} / {lat['p99']}")
        if any(c != "-" for c in cells):
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Steps: `client_ack` scheduled send -> agent's answer; `agent` scheduled send -> record in "
              "the raw topic; each stage: previous stage's record -> its own output record (broker append "
              "time); `sink` -> Parquet file fsynced; `end_to_end` scheduled send -> sink."]
    if result.get("tail_sampling") == "on":
        lines += ["With tail sampling on, the raw and deduped trace topics keep the time the agent received "
                  "the spans (CreateTime: the event time the tail stage decides on), so the traces' `agent` "
                  "step ends at the agent's receipt, `dedup` shows 0 and `tail` counts from the receipt."]
    lines += [""]
    lines += _backends(result["signals"])
    sampling = result["signals"].get("traces", {}).get("sampling", {})
    lines += ["## Sampling", ""]
    if sampling.get("applicable"):
        lines += [f"- ERROR traces kept: {sampling['error_traces_kept']} / {sampling['error_traces']}"
                  f"{_delayed(sampling, 'error')}",
                  f"- slow traces kept: {sampling['slow_traces_kept']} / {sampling['slow_traces']}"
                  f"{_delayed(sampling, 'slow')}",
                  f"- other traces kept: {sampling['plain_kept_percent']} % (setting "
                  f"{sampling['expected_percent']} %, z = {sampling['z_score']})",
                  f"- late spans delivered: {sampling['late_spans_of_kept_traces_delivered']} of "
                  f"{sampling['late_spans']}; spans missing from kept traces: "
                  f"{sampling['spans_missing_from_kept_traces']}", ""]
    else:
        lines += [f"Not applicable: {result['tail_sampling']}.", ""]
    lines += ["## Processes", "", "| process | CPU avg % | CPU max % | RSS start MiB | RSS peak MiB | "
              "RSS end MiB |", "|---|---|---|---|---|---|"]
    for name, p in result["processes"].items():
        lines.append(f"| {name} | {_fmt(p['cpu_avg'])} | {_fmt(p['cpu_max'])} | {_fmt(p['rss_start_mib'])} | "
                     f"{_fmt(p['rss_peak_mib'])} | {_fmt(p['rss_end_mib'])} |")
    if result.get("lag"):
        lines += ["", f"Consumer lag (records, all groups): max {_fmt(result['lag']['max'])}, "
                      f"at the end of the load {_fmt(result['lag']['end_of_load'])}."]
    gen = result.get("generator", {})
    if gen:
        lines += ["", f"Generator: fell behind its schedule by up to {gen.get('max_behind_s')} s "
                      "(a large value means the generator, not the pipeline, limited the rate)."]
    if result.get("faults"):
        lines += ["", "Faults: " + "; ".join(result["faults"])]
    return "\n".join(lines) + "\n"


def _delayed(sampling: dict[str, Any], kind: str) -> str:
    """Traces whose spans reached the tail stage further apart than decision_wait (held back upstream)."""
    delayed = sampling.get(f"{kind}_traces_delayed", 0)
    if not delayed:
        return ""
    return (f" ({delayed} arrived spread over more than decision_wait, e.g. held back by lag or an outage; "
            f"{sampling.get(f'{kind}_traces_delayed_dropped', 0)} of those dropped)")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _backends(signals: dict[str, Any]) -> list[str]:
    """What each real backend holds against what the archive says it should (loadtest/readback.py)."""
    rows = [(s, name, b) for s, res in signals.items() for name, b in res.get("backends", {}).items()]
    if not rows:
        return []
    lines = ["## Backends (items read back)", "",
             "| signal | backend | expected | found | missing | duplicates | unexpected | note |",
             "|---|---|---|---|---|---|---|---|"]
    for signal, name, b in rows:
        if "error" in b:
            lines.append(f"| {signal} | {name} | - | - | - | - | - | read-back failed: {_cell(b['error'])} |")
            continue
        cells = " | ".join(_fmt(b[k]) for k in ("expected", "found", "missing", "duplicates", "unexpected"))
        lines.append(f"| {signal} | {name} | {cells} | {_cell(b.get('note', ''))} |")
    return [*lines, "", "Expected: delivered to the archive by a tenant routed to the backend. Prometheus "
            "keeps one sample per series and time, so it cannot show duplicates; histograms are checked by "
            "their `_count` series.", ""]


def chart(result: dict[str, Any], path: Path) -> bool:
    """Two panels per signal; False when matplotlib is missing (the JSON and Markdown still exist)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    signals = [s for s, r in result["signals"].items() if r.get("timeline")]
    if not signals:
        return False
    fig, axes = plt.subplots(2, len(signals), figsize=(6 * len(signals), 7), squeeze=False)
    for col, signal in enumerate(signals):
        tl = result["signals"][signal]["timeline"]
        ax = axes[0][col]
        for stage in ("offered", "accepted", *STAGE_ORDER):
            if stage in tl:
                ax.plot([i * tl["bin_s"] for i in range(len(tl[stage]))], tl[stage], label=stage, linewidth=1)
        ax.set_title(f"{signal}: items/s per stage")
        ax.set_xlabel("s since start")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for key in ("e2e_p50_ms", "e2e_p95_ms"):
            if key in tl:
                ax.plot([i * tl["bin_s"] for i in range(len(tl[key]))],
                        [v if v is not None else float("nan") for v in tl[key]], label=key, linewidth=1)
        ax.set_title(f"{signal}: end-to-end latency (ms) by send second")
        ax.set_xlabel("s since start")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"kotel load test {result['scenario']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_results(result: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {"json": folder / "result.json", "markdown": folder / "summary.md"}
    out["json"].write_text(json.dumps(result, indent=1, default=str))
    out["markdown"].write_text(markdown(result))
    if chart(result, folder / "chart.png"):
        out["chart"] = folder / "chart.png"
    return out
