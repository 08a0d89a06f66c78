"""What the generator offered: one row per item and per request, kept as typed arrays.

A baseline run offers tens of millions of items, so the ledger stores columns in ``array.array``
(8-30 bytes an item instead of a few hundred for a dict entry) and hands numpy views to the
accounting. Item identities are sequence numbers per signal; how a sequence number travels inside
the OTLP data is the generator's business (see ``identity.py``).
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIGNALS = ("traces", "metrics", "logs")

# Item flags: why an item may legitimately not arrive, and which sampling policy must keep it.
HEALTH = 1  # a /health span: the agent's filter drops it
UNKNOWN = 2  # resource of the unknown tenant: routed to <prefix>.unrouted.<signal>
LATE = 4  # a span emitted after its trace's decision_wait
ERROR = 8  # a span of a trace holding an ERROR status
SLOW = 16  # a span of a trace longer than the latency threshold
WARMUP = 32  # offered before the measured run (accounted, left out of latency)

# Request status
PENDING, ACKED, REFUSED = 0, 1, 2


@dataclass
class SignalLedger:
    """Columns of one signal. Items: request, tenant, flags, trace (spans only), key (metrics only)."""

    signal: str
    req: array = field(default_factory=lambda: array("i"))
    tenant: array = field(default_factory=lambda: array("B"))
    flags: array = field(default_factory=lambda: array("B"))
    trace: array = field(default_factory=lambda: array("i"))
    key: array = field(default_factory=lambda: array("q"))
    # requests
    scheduled_ns: array = field(default_factory=lambda: array("q"))
    ack_ns: array = field(default_factory=lambda: array("q"))
    status: array = field(default_factory=lambda: array("b"))
    copies: array = field(default_factory=lambda: array("B"))
    req_items: array = field(default_factory=lambda: array("I"))

    @property
    def items(self) -> int:
        return len(self.flags)

    @property
    def requests(self) -> int:
        return len(self.scheduled_ns)

    def new_request(self, scheduled_ns: int, items: int, copies: int) -> int:
        self.scheduled_ns.append(scheduled_ns)
        self.ack_ns.append(-1)
        self.status.append(PENDING)
        self.copies.append(copies)
        self.req_items.append(items)
        return len(self.scheduled_ns) - 1

    def settle(self, request: int, ok: bool, ack_ns: int) -> None:
        if ok:
            self.status[request] = ACKED
            self.ack_ns[request] = ack_ns
        else:
            self.status[request] = REFUSED

    def np(self, column: str) -> np.ndarray:
        return np.frombuffer(getattr(self, column), dtype=getattr(self, column).typecode) \
            if len(getattr(self, column)) else np.zeros(0, dtype=getattr(self, column).typecode)


@dataclass
class Ledger:
    tenants: list[str]
    run_tag: int
    series: int = 0
    trace_flags: array = field(default_factory=lambda: array("B"))
    signals: dict[str, SignalLedger] = field(
        default_factory=lambda: {s: SignalLedger(s) for s in SIGNALS})

    def __getitem__(self, signal: str) -> SignalLedger:
        return self.signals[signal]

    def tenant_index(self, tenant: str) -> int:
        return self.tenants.index(tenant)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per signal: items offered, requests, acknowledged items, refused items, duplicated requests."""
        out = {}
        for name, led in self.signals.items():
            status, items = led.np("status"), led.np("req_items")
            out[name] = {
                "items": led.items, "requests": led.requests,
                "acked_items": int(items[status == ACKED].sum()) if led.requests else 0,
                "refused_items": int(items[status == REFUSED].sum()) if led.requests else 0,
                "duplicated_requests": int((led.np("copies") > 1).sum()) if led.requests else 0,
            }
        return out

    def save(self, folder: Path) -> None:
        """Columns as .npy files plus a JSON header: a report can be recomputed from a finished run."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ledger.json").write_text(json.dumps(
            {"tenants": self.tenants, "run_tag": self.run_tag, "series": self.series}))
        np.save(folder / "trace_flags.npy", np.frombuffer(self.trace_flags, dtype="B"))
        for name, led in self.signals.items():
            for column in ("req", "tenant", "flags", "trace", "key", "scheduled_ns", "ack_ns", "status",
                           "copies", "req_items"):
                np.save(folder / f"{name}.{column}.npy", led.np(column))

    @classmethod
    def load(cls, folder: Path) -> Ledger:
        head = json.loads((folder / "ledger.json").read_text())
        ledger = cls(head["tenants"], head["run_tag"], head["series"])
        ledger.trace_flags = array("B", np.load(folder / "trace_flags.npy").tobytes())
        for name, led in ledger.signals.items():
            for column in ("req", "tenant", "flags", "trace", "key", "scheduled_ns", "ack_ns", "status",
                           "copies", "req_items"):
                col: array = getattr(led, column)
                col.frombytes(np.load(folder / f"{name}.{column}.npy").astype(col.typecode).tobytes())
        return ledger
