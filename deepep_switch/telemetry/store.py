"""The telemetry store: labels, the fallback classification, the aggregates and the process-wide store that
wrappers and routers write and :func:`~deepep_switch.telemetry.snapshot` reads (under one lock)."""

from __future__ import annotations

import bisect
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from ..config import DeepEPMode

if TYPE_CHECKING:  # annotations only
    from ..decision import BackendDecision
    from .recorder import RouterMetrics

FALLBACK_REASONS = ("none", "preflight", "construction", "disagreement", "unknown_value")
"""Why the resolved backend differs from the request: ``none`` (it does not), ``preflight`` (a rank failed a check
the requested generation needs), ``construction`` (its constructor raised on some rank), ``disagreement`` (ranks
asked for different backends), ``unknown_value`` (an unrecognised ``RTP_LLM_DEEPEP_BACKEND`` on some rank)."""

LATENCY_BUCKETS_S = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)
"""Upper bounds (seconds) of the round-trip histogram (+Inf implied)."""
IMBALANCE_BUCKETS = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0)
"""Upper bounds of the imbalance (max / mean) histograms (+Inf implied); 1.0 is a perfectly even batch."""
MAX_PENDING = 64
"""Device reads a router may have in flight; a sample that finds them all pending is dropped (and counted)."""

SWITCH_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the live-switch duration histogram (+Inf implied)."""
SWITCH_SOURCES = ("built", "kept", "unchanged")
"""Where a live switch's buffer came from: ``built`` (constructed now), ``kept`` (a buffer kept by an earlier
``switch(keep_previous=True)``), ``unchanged`` (the slot already ran the resolved backend)."""


def mode_label(mode: DeepEPMode) -> str:
    """``normal`` or ``low_latency``: the ``mode`` label."""
    return "low_latency" if mode is DeepEPMode.LOW_LATENCY else "normal"


def layer_label(layer_id: Optional[int]) -> str:
    """The ``layer`` label: the router's ``layer_id``, or ``all`` when it has none."""
    return "all" if layer_id is None else str(layer_id)


def fallback_reason(decision: "BackendDecision") -> str:
    """Classify why ``decision`` runs something other than what was asked (one of :data:`FALLBACK_REASONS`).

    The same on every rank: it reads the agreed fields and the gathered votes, not this rank's own view.
    """
    votes = decision.consensus.votes if decision.consensus is not None else []
    if decision.fallback:
        return "construction"
    if decision.settings.backend_problem or any(v.get("unknown_backend") for v in votes):
        return "unknown_value"
    if decision.consensus is not None and "backend" in decision.consensus.disagreements:
        return "disagreement"
    if decision.resolved is not decision.requested:
        return "preflight"
    return "none"


# ---------------------------------------------------------------------------------------------- aggregates
class _Histogram:
    """Bucket counts (non-cumulative, one per bound plus +Inf), sum, count, min, max and last value."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0
        self.min: Optional[float] = None
        self.max: Optional[float] = None
        self.last: Optional[float] = None

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)
        self.last = value

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ..., ("+Inf", count)]`` as Prometheus wants them."""
        out, running = [], 0
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self.sum, "mean": self.sum / self.count if self.count else None,
                "min": self.min, "max": self.max, "last": self.last, "buckets": self.cumulative()}


@dataclass
class _Series:
    """Everything recorded for one (backend, mode, layer)."""

    backend: str
    mode: str
    layer: str
    dispatches: int = 0
    tokens_sent: int = 0
    tokens_received: int = 0
    samples: int = 0
    samples_dropped: int = 0
    expert_imbalance: _Histogram = field(default_factory=lambda: _Histogram(IMBALANCE_BUCKETS))
    rank_imbalance: _Histogram = field(default_factory=lambda: _Histogram(IMBALANCE_BUCKETS))
    round_trip: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS_S))

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "mode": self.mode, "layer": self.layer, "dispatches": self.dispatches,
                "tokens_sent": self.tokens_sent, "tokens_received": self.tokens_received, "samples": self.samples,
                "samples_dropped": self.samples_dropped, "expert_imbalance": self.expert_imbalance.to_dict(),
                "rank_imbalance": self.rank_imbalance.to_dict(), "round_trip_seconds": self.round_trip.to_dict()}


class _Store:
    """The process's telemetry: written by wrappers and routers, read by :func:`snapshot` (under one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.series: dict[tuple[str, str, str], _Series] = {}
        self.decisions: dict[str, dict[str, Any]] = {}
        self.fallbacks: dict[tuple[str, str, str], int] = {}
        self.buffers: dict[tuple[str, str], dict[str, int]] = {}
        self.device_bytes: dict[tuple[str, str], int] = {}
        # live switches: (mode, from, to) -> count, last duration, last source; durations per mode
        self.switches: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.switch_seconds: dict[str, _Histogram] = {}
        # buffers kept alive by switch(keep_previous=True): (backend, mode) -> plan bytes (all pools)
        self.kept: dict[tuple[str, str], int] = {}
        self.recorders: "weakref.WeakSet[RouterMetrics]" = weakref.WeakSet()

    def get_series(self, backend: str, mode: str, layer: str) -> _Series:
        with self.lock:
            key = (backend, mode, layer)
            if key not in self.series:
                self.series[key] = _Series(backend, mode, layer)
            return self.series[key]


_STORE = _Store()


def current() -> _Store:
    """The store recording now (:func:`reset` replaces it)."""
    return _STORE


def reset() -> None:
    """Forget everything recorded (tests; a deliberate re-start of the counters). Live routers keep recording."""
    global _STORE
    old, _STORE = _STORE, _Store()
    for recorder in list(old.recorders):
        recorder.rebind(_STORE)

