"""Checks on decoded requests that protobuf cannot express: id lengths and the all-zero invalid ids.

Runs on every accepted request, so each loop tests a span with a handful of comparisons and only builds
path strings for the items that fail.
"""

from __future__ import annotations

from google.protobuf.message import Message

from kotel.otlp.signals import Signal

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


def validate_request(signal: Signal, request: Message, max_problems: int = 100) -> list[str]:
    """Problems found, each as "<JSON path>: <what>"; empty when the request is fine.

    Past max_problems the list ends with one "... and N more problems" entry, so a hostile batch cannot
    make the error response huge.
    """
    sig = Signal(signal)
    problems: list[str] = []
    if sig is Signal.TRACES:
        _check_traces(request, problems)
    elif sig is Signal.LOGS:
        _check_logs(request, problems)
    else:
        _check_metrics(request, problems)
    if len(problems) > max_problems:
        extra = len(problems) - max_problems
        problems[max_problems:] = [f"... and {extra} more problems"]
    return problems


def _check_id(
    problems: list[str], path: str, value: bytes, size: int, optional: bool, zero: bytes | None
) -> None:
    if len(value) != size and not (optional and not value):
        want = f"empty or {size} bytes" if optional else f"{size} bytes"
        problems.append(f"{path}: expected {want}, got {len(value)}")
    elif zero is not None and value == zero:
        problems.append(f"{path}: all zeros, which is an invalid id")


def _check_traces(request: Message, problems: list[str]) -> None:
    for r, rs in enumerate(request.resource_spans):
        for s, ss in enumerate(rs.scope_spans):
            for i, span in enumerate(ss.spans):
                tid = span.trace_id
                sid = span.span_id
                parent = span.parent_span_id
                if (
                    len(tid) == 16 and len(sid) == 8 and tid != _ZERO_TRACE and sid != _ZERO_SPAN
                    and (not parent or len(parent) == 8) and not span.links
                ):
                    continue  # the common case: nothing to report, no strings built
                base = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                _check_id(problems, f"{base}.traceId", tid, 16, False, _ZERO_TRACE)
                _check_id(problems, f"{base}.spanId", sid, 8, False, _ZERO_SPAN)
                _check_id(problems, f"{base}.parentSpanId", parent, 8, True, None)
                for k, link in enumerate(span.links):
                    # Links may carry an all-zero (invalid) context when they have attributes or a
                    # trace state (the trace API allows recording those), so only lengths are checked.
                    if len(link.trace_id) != 16 or len(link.span_id) != 8:
                        _check_id(problems, f"{base}.links[{k}].traceId", link.trace_id, 16, False, None)
                        _check_id(problems, f"{base}.links[{k}].spanId", link.span_id, 8, False, None)


def _check_logs(request: Message, problems: list[str]) -> None:
    for r, rl in enumerate(request.resource_logs):
        for s, sl in enumerate(rl.scope_logs):
            for i, rec in enumerate(sl.log_records):
                tid = rec.trace_id
                sid = rec.span_id
                if (not tid or len(tid) == 16) and (not sid or len(sid) == 8):
                    continue
                base = f"resourceLogs[{r}].scopeLogs[{s}].logRecords[{i}]"
                _check_id(problems, f"{base}.traceId", tid, 16, True, None)
                _check_id(problems, f"{base}.spanId", sid, 8, True, None)


def _check_metrics(request: Message, problems: list[str]) -> None:
    for r, rm in enumerate(request.resource_metrics):
        for s, sm in enumerate(rm.scope_metrics):
            for m, metric in enumerate(sm.metrics):
                kind = metric.WhichOneof("data")
                if kind is None or kind == "summary":  # summaries have no exemplars
                    continue
                for p, point in enumerate(getattr(metric, kind).data_points):
                    for e, ex in enumerate(point.exemplars):
                        tid = ex.trace_id
                        sid = ex.span_id
                        if (not tid or len(tid) == 16) and (not sid or len(sid) == 8):
                            continue
                        json_kind = "exponentialHistogram" if kind == "exponential_histogram" else kind
                        base = (
                            f"resourceMetrics[{r}].scopeMetrics[{s}].metrics[{m}].{json_kind}"
                            f".dataPoints[{p}].exemplars[{e}]"
                        )
                        _check_id(problems, f"{base}.traceId", tid, 16, True, None)
                        _check_id(problems, f"{base}.spanId", sid, 8, True, None)
