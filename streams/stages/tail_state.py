"""One partition's tail-sampling state in RocksDB: trace buffers, a deadline index, the decision cache.

The key layout is in streams.stages.tail_layout. Every change is planned first (`Plan`, a key overlay)
and committed in one write batch; the binding commits only after the outputs a plan implies are
acknowledged, and logs the same input (`B`/`D`/`P` record) to the changelog. `apply` replays such a
record through the very same planning code, so a worker that recovers from the changelog ends up with
the state the lost worker had.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from rocksdict import Rdict, ReadOptions, WriteBatch

from streams.stages.tail_core import (
    SPAN_ID_SIZE,
    BundleRecord,
    ClockRecord,
    Cover,
    Fragment,
    Verdict,
    decode_record,
    decode_trace,
    drop_spans,
    fragments,
    join_fragments,
    span_ids,
    summarize,
)
from streams.stages.tail_layout import (
    META,
    META_KEY,
    MS,
    TRACE,
    Decision,
    Late,
    Limits,
    Meta,
    Output,
    Plan,
    Sampler,
    Trace,
    decode_decision,
    decode_fragment,
    encode_decision,
    encode_fragment,
    frag_key,
    index_key,
    trace_key,
)
from streams.stages.tail_policy_leaves import TraceData

__all__ = ["Late", "Limits", "Output", "Plan", "TraceState"]


def _read_trace(tid: bytes, wire: bytes) -> tuple[TraceData, list[bytes] | None]:
    """A buffered trace for the policies: summarized in C, or decoded (then with its span ids)."""
    summary = summarize(wire)
    if summary is not None:
        return TraceData(tid, wire=wire, summary=summary), None
    request = decode_trace(wire)
    return TraceData(tid, request.resource_spans), span_ids(request)


def _span_count(wire: bytes) -> int:
    summary = summarize(wire)
    return summary.spans if summary is not None else len(span_ids(decode_trace(wire)))


def _ids(packed: bytes) -> list[bytes]:
    return [packed[i:i + SPAN_ID_SIZE] for i in range(0, len(packed), SPAN_ID_SIZE)]


class TraceState:
    """The state of one partition over its RocksDB (rocksdict, raw mode)."""

    def __init__(self, db: Rdict, limits: Limits) -> None:
        self.db = db
        self.limits = limits
        raw = db.get(META_KEY)
        if raw:
            applied, cp, co, pending, sh, st, nh, nt, stream = META.unpack(raw)
            self.meta = Meta(applied, (cp, co), pending, sh, st, nh, nt, stream)
        else:
            self.meta = Meta()
        self._low = 0  # no deadline below this is left in the index (deleted keys are not rescanned)

    # --- reads through a plan's overlay ------------------------------------------------------------

    def _get(self, plan: Plan, key: bytes) -> bytes | None:
        if key in plan.writes:
            return plan.writes[key]
        if key in plan.reads:
            return plan.reads[key]
        return self.db.get(key)  # type: ignore[no-any-return]

    def _many(self, plan: Plan | None, keys: list[bytes]) -> list[bytes | None]:
        found: list[bytes | None] = self.db.get(keys) if keys else []
        if plan is not None and plan.writes:
            found = [plan.writes.get(k, v) for k, v in zip(keys, found, strict=True)]
        return found

    def decision(self, tid: bytes) -> Decision | None:
        raw = self.db.get(b"c" + tid)
        return decode_decision(raw) if raw else None

    def trace(self, tid: bytes) -> Trace | None:
        raw = self.db.get(trace_key(tid))
        return Trace(*TRACE.unpack(raw)) if raw else None

    # --- ingest ----------------------------------------------------------------------------------

    def ingest(self, offset: int, stamp_ms: int, tenant: str, frags: Sequence[Fragment]) -> Plan:
        """Plan adding a bundle's fragments; late ones follow their decision (outputs for sampled)."""
        plan = Plan(replace(self.meta))
        if offset <= self.meta.applied:
            plan.skipped = True
            return plan
        plan.meta.applied = offset
        tids = [f.trace_id for f in frags]
        decisions = self._many(plan, [b"c" + t for t in tids])
        traces = self._many(plan, [trace_key(t) for t in tids])
        for frag, raw_decision, raw_trace in zip(frags, decisions, traces, strict=True):
            if raw_decision is not None:
                self._late(plan, frag, tenant, decode_decision(raw_decision), stamp_ms)
            else:
                self._buffer(plan, frag, tenant, Trace(*TRACE.unpack(raw_trace)) if raw_trace else None,
                             stamp_ms)
        return plan

    def _late(self, plan: Plan, frag: Fragment, tenant: str, decision: Decision, stamp_ms: int) -> None:
        plan.late.append(Late(decision.sampled, frag.spans, max(0, stamp_ms - decision.decided_ms)))
        if not decision.sampled:
            return
        value, kept = drop_spans(decode_trace(frag.framed), set(decision.emitted))
        if kept:
            plan.outputs.append(Output(frag.trace_id, tenant, value, len(kept)))
            plan.writes[b"c" + frag.trace_id] = encode_decision(
                decision._replace(emitted=decision.emitted + tuple(kept)))

    def _buffer(self, plan: Plan, frag: Fragment, tenant: str, trace: Trace | None, stamp_ms: int) -> None:
        limits, tid = self.limits, frag.trace_id
        old_deadline = None
        if trace is None:
            trace = Trace(stamp_ms, stamp_ms + limits.decision_wait_ms)
            plan.meta.pending += 1
        else:
            old_deadline = trace.deadline_ms
        reason = self._over(trace)
        if reason:
            plan.truncated[reason] += frag.spans
            return
        value = encode_fragment(tenant, frag.framed)
        plan.writes[frag_key(tid, trace.frags)] = value
        trace.frags += 1
        trace.spans += frag.spans
        trace.size += len(frag.framed)
        plan.buffered += frag.spans
        if frag.root and trace.root_ms < 0:
            trace.root_ms = stamp_ms
            if limits.root_wait_ms:
                trace.deadline_ms = min(trace.deadline_ms, stamp_ms + limits.root_wait_ms)
        reason = self._over(trace)
        if reason:
            plan.early[reason] += 1
            trace.deadline_ms = min(trace.deadline_ms, stamp_ms)
        plan.writes[trace_key(tid)] = TRACE.pack(trace.first_ms, trace.deadline_ms, trace.root_ms,
                                                   trace.spans, trace.size, trace.frags)
        if old_deadline != trace.deadline_ms:
            if old_deadline is not None:
                plan.writes[index_key(old_deadline, tid)] = None
            plan.writes[index_key(trace.deadline_ms, tid)] = b""
            plan.low = trace.deadline_ms if plan.low is None else min(plan.low, trace.deadline_ms)

    def _over(self, trace: Trace) -> str:
        if trace.spans >= self.limits.max_spans:
            return "max_spans_per_trace"
        if trace.size >= self.limits.max_bytes:
            return "max_bytes_per_trace"
        return ""

    # --- decisions -------------------------------------------------------------------------------

    def due(self, now_ms: int, limit: int) -> list[tuple[bytes, str]]:
        """Up to ``limit`` traces to decide now: deadline passed, then the oldest over num_traces."""
        out: list[tuple[bytes, str]] = []
        over = self.meta.pending - self.limits.num_traces
        options = ReadOptions()
        upper = b"d" + MS.pack(now_ms + 1) if over <= 0 else b"e"
        options.set_iterate_upper_bound(upper)
        cut = b"d" + MS.pack(now_ms + 1)
        for key in self.db.keys(from_key=b"d" + MS.pack(self._low), read_opt=options):
            if not out:
                self._low = MS.unpack_from(key, 1)[0]
            if key >= cut:
                if over <= 0:
                    break
                over -= 1
                out.append((key[9:], "num_traces"))
            else:
                out.append((key[9:], "deadline"))
            if len(out) >= limit:
                break
        return out

    def decide(self, tids: Sequence[bytes], sampler: Sampler) -> Plan:
        """Plan the decisions of pending traces: outputs of the sampled ones and the verdicts."""
        plan = Plan(replace(self.meta))
        trace_keys, decision_keys = [trace_key(t) for t in tids], [b"c" + t for t in tids]
        traces, decisions = self._many(None, trace_keys), self._many(None, decision_keys)
        plan.reads.update(zip(trace_keys, traces, strict=True))  # settle reads them again
        plan.reads.update(zip(decision_keys, decisions, strict=True))
        found = [(t, Trace(*TRACE.unpack(raw)), d) for t, raw, d in zip(tids, traces, decisions, strict=True)
                 if raw is not None]
        keys = [frag_key(t, n) for t, trace, _ in found for n in range(trace.frags)]
        values = iter(self._many(None, keys))
        for tid, trace, raw_decision in found:
            groups: dict[str, list[bytes]] = {}
            for _ in range(trace.frags):
                raw = next(values)
                if raw is not None:
                    tenant, framed = decode_fragment(raw)
                    groups.setdefault(tenant, []).append(framed)
            data, ids = _read_trace(tid, join_fragments(f for parts in groups.values() for f in parts))
            before = decode_decision(raw_decision) if raw_decision else None
            if before is not None and before.sampled:
                sampled, policy = True, before.policy  # outputs found after a takeover: it was sampled
            else:
                sampled, policy = sampler.decide(tid, data)
            emitted: tuple[bytes, ...] = ()
            if sampled:
                emitted = self._emit(plan, tid, groups, ids or _ids(data.summary.span_ids),
                                     before.emitted if before else ())
            plan.verdicts.append(Verdict(tid, bool(sampled), str(policy), emitted, trace.frags))
            plan.decided[bool(sampled), str(policy)] += 1
            plan.decided_spans[bool(sampled), str(policy)] += data.span_count
        return plan

    def _emit(self, plan: Plan, tid: bytes, groups: dict[str, list[bytes]], ids: list[bytes],
              already: tuple[bytes, ...]) -> tuple[bytes, ...]:
        if not already and len(set(ids)) == len(ids):
            for tenant, parts in groups.items():
                value = join_fragments(parts)
                count = _span_count(value) if len(groups) > 1 else len(ids)
                plan.outputs.append(Output(tid, tenant, value, count))
            return tuple(ids)
        emitted = set(already)
        out = list(already)
        for tenant, parts in groups.items():
            value, kept = drop_spans(decode_trace(join_fragments(parts)), emitted)
            if kept:
                emitted.update(kept)
                out.extend(kept)
                plan.outputs.append(Output(tid, tenant, value, len(kept)))
        return tuple(out)

    def settle(self, plan: Plan, verdicts: Sequence[Verdict], stamp_ms: int, primed: bool = False) -> Plan:
        """Add the verdicts to ``plan``: buffers removed (kept when primed) and decisions cached.

        Fragments past those a verdict saw (a replay where bundles were logged before the verdict)
        are handled as the late spans they were when the decision was taken.
        """
        meta = plan.meta
        for v in verdicts:
            tid = v.trace_id
            raw = None if primed else self._get(plan, trace_key(tid))
            later: list[bytes] = []
            if raw is not None:
                trace = Trace(*TRACE.unpack(raw))
                plan.writes[trace_key(tid)] = None
                plan.writes[index_key(trace.deadline_ms, tid)] = None
                if trace.frags > v.fragments:
                    later = [r for r in self._many(plan, [frag_key(tid, n) for n in
                                                          range(v.fragments, trace.frags)]) if r]
                for n in range(trace.frags):
                    plan.writes[frag_key(tid, n)] = None
                meta.pending -= 1
            self._cache(plan, v, stamp_ms)
            for raw_fragment in later:
                tenant, framed = decode_fragment(raw_fragment)
                spans = len(span_ids(decode_trace(framed)))
                cached = plan.writes.get(b"c" + tid)
                if cached:
                    self._late(plan, Fragment(tid, framed, spans, False), tenant, decode_decision(cached),
                               stamp_ms)
                else:  # no cache for this kind: counted, nothing to remember
                    plan.late.append(Late(v.sampled, spans, 0))
        return plan

    def _cache(self, plan: Plan, v: Verdict, stamp_ms: int) -> None:
        meta, key = plan.meta, b"c" + v.trace_id
        cap = self.limits.sampled_cache if v.sampled else self.limits.dropped_cache
        if cap <= 0:
            plan.writes[key] = None
            return
        raw = self._get(plan, key)
        if raw is not None:
            known = decode_decision(raw)
            if known.sampled == v.sampled and set(known.emitted).issuperset(v.emitted):
                return  # a record applied twice (replay after a crash) must not cache it twice
        prefix = b"s" if v.sampled else b"n"
        seq = meta.s_tail if v.sampled else meta.n_tail
        plan.writes[key] = encode_decision(Decision(v.sampled, stamp_ms, seq, v.policy, v.emitted))
        plan.writes[prefix + MS.pack(seq)] = v.trace_id
        if v.sampled:
            meta.s_tail += 1
        else:
            meta.n_tail += 1
        while True:
            head, tail = (meta.s_head, meta.s_tail) if v.sampled else (meta.n_head, meta.n_tail)
            if tail - head <= cap:
                break
            fifo = prefix + MS.pack(head)
            old = self._get(plan, fifo)
            plan.writes[fifo] = None
            if old is not None:
                raw = self._get(plan, b"c" + old)
                if raw is not None and decode_decision(raw).seq == head:
                    plan.writes[b"c" + old] = None
            if v.sampled:
                meta.s_head += 1
            else:
                meta.n_head += 1

    def prime(self, found: dict[bytes, list[bytes]], stamp_ms: int) -> Plan:
        """Plan recording outputs that reached the sampled topic but not the changelog: their traces
        count as sampled and their spans as emitted, so replayed inputs and decisions skip them."""
        plan = Plan(replace(self.meta))
        tids = list(found)
        verdicts = []
        for tid, raw in zip(tids, self._many(None, [b"c" + t for t in tids]), strict=True):
            before = decode_decision(raw) if raw else None
            known = set(before.emitted) if before is not None and before.sampled else set()
            new = [sid for sid in dict.fromkeys(found[tid]) if sid not in known]
            if new or before is None or not before.sampled:
                emitted = (before.emitted if before is not None and before.sampled else ()) + tuple(new)
                policy = before.policy if before is not None and before.sampled else "recovered"
                verdicts.append(Verdict(tid, True, policy, emitted))
        plan.verdicts = verdicts
        return self.settle(plan, verdicts, stamp_ms, primed=True)

    def clocked(self, clock_ms: int) -> Plan:
        """Plan logging the decision clock (a `W` record), where a new owner of the partition starts."""
        plan = Plan(replace(self.meta))
        plan.meta.stream_ms = clock_ms
        return plan

    # --- writing and replay ------------------------------------------------------------------------

    def commit(self, plan: Plan, cover: Cover | None = None, extra: dict[bytes, bytes] | None = None) -> None:
        """Write a plan, the last output its log record covers and ``extra`` keys in one batch."""
        if plan.skipped:
            return
        meta = plan.meta
        if cover is not None and cover[1] >= 0 and (cover[0] != meta.cover[0] or cover[1] > meta.cover[1]):
            meta.cover = cover
        batch = WriteBatch(raw_mode=True)
        for key, value in plan.writes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(META_KEY, META.pack(meta.applied, *meta.cover, meta.pending, meta.s_head, meta.s_tail,
                                        meta.n_head, meta.n_tail, meta.stream_ms))
        for key, value in (extra or {}).items():
            batch.put(key, value)
        self.db.write(batch)
        if plan.low is not None:  # inputs with older timestamps (another input partition's backlog)
            self._low = min(self._low, plan.low)
        self.meta = meta

    def apply(self, value: bytes | None, extra: dict[bytes, bytes] | None = None) -> bool:
        """Replay one changelog record (recovery, standby); False when it is not one of ours.

        ``extra`` (the changelog offset) is written in the same batch, so no record is applied twice.
        """
        decoded = decode_record(value)
        if decoded is None:
            return False
        cover, record = decoded
        self._low = 0  # a replayed record may index a deadline below the one last scanned
        if isinstance(record, BundleRecord):
            try:
                frags = fragments(record.bundle, record.index)
            except ValueError:
                frags = []
            plan = self.ingest(record.offset, record.stamp_ms, record.tenant, frags)
        elif isinstance(record, ClockRecord):
            plan = self.clocked(record.clock_ms)
        else:
            plan = self.settle(Plan(replace(self.meta)), record.verdicts, record.stamp_ms, record.primed)
        self.commit(plan, cover, extra)
        return True
