"""Telemetry that proves what ran: the decision, the traffic per backend, mode and layer, load imbalance, round-trip
latency and buffer memory. Turned on by ``RTP_LLM_DEEPEP_METRICS=1`` (settings field ``metrics``).

**Off** (the default) nothing here runs: a router holds ``_metrics = None`` and pays one attribute check per
``prepare`` / ``finalize``; the wrapper never calls in.

**On**:

* the wrapper reports its :class:`~deepep_switch.decision.BackendDecision`, its plan's buffer bytes (memory outside
  PyTorch's allocator too: NVSHMEM / NCCL-registered buffers) and the device bytes it measured, once per
  construction (:func:`record_wrapper`);
* each router counts, on every call, one dispatch, the tokens it sent (host integers) and the token rows its
  experts received (normal mode: a host integer; low-latency mode: an in-place device add of the per-expert counts,
  no host sync, queued after the round trip);
* every Nth call of each router (``metrics_sample_every``, default 64) is *sampled*: CUDA events at ``prepare``
  start and ``finalize`` end time the round trip, and after the end event a few device ops copy the per-expert
  counts and this rank's per-destination-rank counts into pinned host memory (``non_blocking``) for the load
  imbalance (max / mean);
* while the router's stream is being captured into a CUDA graph, nothing is recorded: graph replays run no
  Python, so the router never sees them (see docs/operations.md#metrics for what is measured under graphs).

**Reading is lazy and never synchronises the hot path**: device results are folded in once ``event.query()`` says
they are complete, by the router itself at its sampled calls (on the thread that runs the model, outside
capture) and by :func:`snapshot` with ``harvest=True`` (call it from that thread too). A plain :func:`snapshot` and
the Prometheus collectors read host memory only, so a scrape from any thread is safe even while the engine
captures CUDA graphs: ``cudaEventQuery`` from another thread would invalidate a capture in PyTorch's default
(global) capture mode.

**Labels are bounded**: ``backend`` (registered generations), ``mode`` (normal, low_latency), ``layer``
(:class:`routers.RouterOptions` ``layer_id``, a non-negative int, or ``all`` when None), ``pool`` (the plan's
pools), ``reason`` (:data:`FALLBACK_REASONS`). Router series: backends x 2 modes x (layers + 1).

``prometheus_client`` is optional (the ``metrics`` extra) and imported only by :func:`collectors` /
:func:`register`.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .config import DeepEPMode
from .settings import ProviderChoice

if TYPE_CHECKING:  # annotations only: the wrapper and the routers import this module
    from .decision import BackendDecision
    from .wrapper import DeepEPWrapper

logger = logging.getLogger("deepep_switch.telemetry")

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

_METRICS_EXTRA_HINT = ("prometheus_client is not installed: install deepep-switch's 'metrics' extra "
                       "(pip install 'deepep-switch[metrics]'), or read deepep_switch.telemetry.snapshot()")


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
        self.recorders: "weakref.WeakSet[RouterMetrics]" = weakref.WeakSet()

    def get_series(self, backend: str, mode: str, layer: str) -> _Series:
        with self.lock:
            key = (backend, mode, layer)
            if key not in self.series:
                self.series[key] = _Series(backend, mode, layer)
            return self.series[key]


_STORE = _Store()


def reset() -> None:
    """Forget everything recorded (tests; a deliberate re-start of the counters). Live routers keep recording."""
    global _STORE
    old, _STORE = _STORE, _Store()
    for recorder in list(old.recorders):
        recorder.rebind(_STORE)


# ---------------------------------------------------------------------------------------------- device reads
class _HostClock:
    """Round-trip timing on the host (CPU routers: every op is synchronous, so wall time is the round trip)."""

    @staticmethod
    def start() -> float:
        return time.perf_counter()

    @staticmethod
    def stop(start: float) -> float:
        return time.perf_counter() - start

    @staticmethod
    def result(pending: float) -> Optional[float]:
        return pending

    @staticmethod
    def wait(pending: float) -> None:
        return None


class _CudaClock:
    """Round-trip timing with CUDA events on the current stream, read once both have completed (``query()``)."""

    @staticmethod
    def start() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def stop(start: torch.cuda.Event) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return start, end

    @staticmethod
    def result(pending: tuple[torch.cuda.Event, torch.cuda.Event]) -> Optional[float]:
        start, end = pending
        if not (end.query() and start.query()):
            return None
        return start.elapsed_time(end) / 1e3

    @staticmethod
    def wait(pending: tuple[torch.cuda.Event, torch.cuda.Event]) -> None:
        pending[1].synchronize()


class _HostReads:
    """Reading a small int64 tensor that already lives on the host: at once."""

    @staticmethod
    def submit(values: torch.Tensor) -> list[int]:
        return values.tolist()

    @staticmethod
    def result(pending: list[int]) -> Optional[list[int]]:
        return pending

    @staticmethod
    def wait(pending: list[int]) -> None:
        return None


class _CudaReads:
    """Reading a small int64 device tensor without a sync: a non-blocking copy into pinned host memory plus an
    event on the current stream; the host memory is read once the event has completed."""

    @staticmethod
    def submit(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def result(pending: tuple[torch.Tensor, torch.cuda.Event]) -> Optional[list[int]]:
        host, event = pending
        return host.tolist() if event.query() else None

    @staticmethod
    def wait(pending: tuple[torch.Tensor, torch.cuda.Event]) -> None:
        pending[1].synchronize()


def _never_capturing() -> bool:
    return False


# ---------------------------------------------------------------------------------------------- router hook
_LATENCY, _SAMPLE, _TOTAL = 0, 1, 2  # what a pending device read holds


class RouterMetrics:
    """One router's recorder, bound at its construction (routers hold None when metrics are off).

    The router calls :meth:`prepare` / :meth:`finalize` around its own ``_prepare`` / ``_finalize``; everything
    that depends on the device (clock, reads, capture check) or the mode (how received rows are counted) was
    chosen here, once.
    """

    def __init__(self, store: _Store, backend: str, mode: DeepEPMode, layer_id: Optional[int], device: torch.device,
                 num_local_experts: int, num_ranks: int, sample_every: int) -> None:
        cuda = device.type == "cuda"
        self._labels = (backend, mode_label(mode), layer_label(layer_id))
        self._every = sample_every
        self._countdown = 1  # the first call is sampled, then every ``sample_every``-th
        self._num_local_experts, self._num_ranks = num_local_experts, num_ranks
        self._capturing: Callable[[], bool] = torch.cuda.is_current_stream_capturing if cuda else _never_capturing
        self._clock: Any = _CudaClock if cuda else _HostClock
        self._reads: Any = _CudaReads if cuda else _HostReads
        low_latency = mode is DeepEPMode.LOW_LATENCY
        # Low-latency counts live on the device: accumulate them there (int64 [E_local]), read them with samples.
        self._acc: Optional[torch.Tensor] = (torch.zeros(num_local_experts, dtype=torch.int64, device=device)
                                             if low_latency else None)
        self._acc_folded = 0
        self._received: Callable[[Any], Optional[torch.Tensor]] = (
            self._received_low_latency if low_latency else self._received_normal)
        self._open: Optional[tuple[Any, Optional[torch.Tensor], torch.Tensor]] = None
        self._pending: deque[tuple[int, Any]] = deque()  # (_LATENCY | _SAMPLE | _TOTAL, pending read), stream order
        self._store = store
        self._series = store.get_series(*self._labels)
        store.recorders.add(self)

    @property
    def labels(self) -> tuple[str, str, str]:
        """``(backend, mode, layer)``."""
        return self._labels

    def rebind(self, store: _Store) -> None:
        """Record into ``store`` from now on, from zero (after :func:`reset`)."""
        self._pending.clear()
        if self._acc is not None:
            self._acc.zero_()
        self._acc_folded = 0
        self._store = store
        self._series = store.get_series(*self._labels)
        store.recorders.add(self)

    # -- hot path -------------------------------------------------------------------------------------------
    def prepare(self, fn: Callable[..., tuple[Any, Any]], x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> tuple[Any, Any]:
        """Run the router's ``_prepare(x [T,H] bf16, ids [T,K] int64, weights [T,K] float32)`` and count it."""
        if self._capturing():
            self._open = None
            return fn(x, ids, weights)
        self._countdown -= 1
        start = None
        if not self._countdown:
            self._countdown = self._every
            start = self._clock.start()
        result = fn(x, ids, weights)
        series = self._series
        series.dispatches += 1
        series.tokens_sent += x.shape[0]
        self._open = (start, self._received(result[0]), ids)
        return result

    def finalize(self, fn: Callable[..., torch.Tensor], y: torch.Tensor, handle: Any, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:
        """Run the router's ``_finalize``; on a sampled call stop the clock first, then queue the sample's reads
        (so the timed window holds no telemetry work)."""
        opened, self._open = self._open, None
        out = fn(y, handle, weights, ids)
        if opened is not None:
            start, counts, sent_ids = opened
            if start is not None:
                self._queue(_LATENCY, self._clock.stop(start))
            if self._acc is not None:
                self._acc.add_(counts)
            if start is not None:
                self._sample(counts, sent_ids)
                self._harvest()
        return out

    def _received_normal(self, payload: Any) -> Optional[torch.Tensor]:
        # One row per (source token, this rank), known on the host: the path already synchronised for the counts.
        self._series.tokens_received += payload.expert_x.shape[0]
        return payload.expert_tokens_meta.expert_num_tokens

    @staticmethod
    def _received_low_latency(payload: Any) -> Optional[torch.Tensor]:
        # One row per (token, local expert), accumulated on the device in finalize (int32 [E_local]).
        return payload.expert_tokens_meta.expert_num_tokens

    # -- sampled calls --------------------------------------------------------------------------------------
    def _queue(self, kind: int, pending: Any) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._series.samples_dropped += 1
            return
        self._pending.append((kind, pending))

    def _sample(self, counts: Optional[torch.Tensor], sent_ids: torch.Tensor) -> None:
        """Queue one read of ``[rows received per local expert (E_local), (token, expert) pairs sent per
        destination rank (R), the low-latency accumulator (E_local, low-latency only)]`` as int64, no host sync.
        ``counts``: int32 ``[E_local]`` (normal mode: aligned to the expert alignment); ``sent_ids``: int64
        ``[T, K]`` global expert ids, -1 for none."""
        if counts is None:
            return
        ranks = self._num_ranks
        dest = torch.where(sent_ids >= 0, torch.div(sent_ids, self._num_local_experts, rounding_mode="floor"),
                           ranks).flatten()
        per_rank = torch.zeros(ranks + 1, dtype=torch.int64, device=sent_ids.device)
        per_rank.scatter_add_(0, dest, torch.ones_like(dest))
        parts = [counts.to(device=per_rank.device, dtype=torch.int64), per_rank[:ranks]]
        if self._acc is not None:
            parts.append(self._acc)
        self._queue(_SAMPLE, self._reads.submit(torch.cat(parts)))

    def _harvest(self) -> None:
        """Fold every completed read, oldest first (``query()`` only; stops at the first one still running)."""
        pending, series = self._pending, self._series
        e, r = self._num_local_experts, self._num_ranks
        with self._store.lock:
            while pending:
                kind, item = pending[0]
                value = (self._clock if kind == _LATENCY else self._reads).result(item)
                if value is None:
                    return
                pending.popleft()
                if kind == _LATENCY:
                    series.round_trip.observe(value)
                    continue
                if kind == _SAMPLE:
                    series.samples += 1
                    _observe_imbalance(series.expert_imbalance, value[:e])
                    _observe_imbalance(series.rank_imbalance, value[e:e + r])
                    value = value[e + r:]
                if self._acc is not None:
                    total = sum(value)
                    series.tokens_received += total - self._acc_folded
                    self._acc_folded = total

    def flush(self, wait: bool) -> None:
        """Outside the hot path, on the model's thread: queue a read of the low-latency accumulator, then fold
        what has completed (``wait``: first block until every queued read has completed)."""
        if self._capturing():
            return
        if self._acc is not None:
            self._queue(_TOTAL, self._reads.submit(self._acc))
        if wait:
            for kind, item in self._pending:
                (self._clock if kind == _LATENCY else self._reads).wait(item)
        self._harvest()


def _observe_imbalance(histogram: _Histogram, counts: list[int]) -> None:
    """max / mean of ``counts``; an empty batch (all zero) is not a sample."""
    total = sum(counts)
    if total and counts:
        histogram.observe(max(counts) * len(counts) / total)


def router_metrics(router: Any, previous: Optional[RouterMetrics] = None) -> Optional[RouterMetrics]:
    """The recorder for ``router`` (a :class:`routers.RouterBase`), or None when metrics are off. ``previous``
    (the router's recorder before its wrapper rebuilt the buffer) is kept when its labels still hold."""
    settings = router.wrapper.decision.settings
    if not settings.metrics:
        return None
    if previous is not None and previous.labels == (router.backend.value, mode_label(router.mode),
                                                    layer_label(router.options.layer_id)):
        return previous
    return RouterMetrics(_STORE, router.backend.value, router.mode, router.options.layer_id, router.device,
                         router.num_local_experts, router.ep_size, settings.metrics_sample_every)


# ---------------------------------------------------------------------------------------------- wrapper hook
def device_free_bytes(provider: ProviderChoice) -> Optional[int]:
    """Free bytes on the current CUDA device (real DeepEP only), to measure what a buffer takes; else None."""
    if provider is not ProviderChoice.DEEP_EP or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def record_wrapper(wrapper: "DeepEPWrapper", free_before: Optional[int]) -> None:
    """The wrapper's report after construction: its decision, the plan's buffer bytes and, when ``free_before``
    (from :func:`device_free_bytes`) is given, the device bytes the construction took."""
    decision = wrapper.decision
    mode, backend = mode_label(wrapper.mode), decision.resolved.value
    after = device_free_bytes(wrapper.provider) if free_before is not None else None
    device_bytes = free_before - after if free_before is not None and after is not None else None
    reason = fallback_reason(decision)
    store = _STORE
    with store.lock:
        store.decisions[mode] = {
            "requested": decision.requested.value, "requested_mode": decision.requested_mode.value,
            "resolved": backend, "fallback_reason": reason, "fallback": decision.fallback,
            "reasons": list(decision.reasons), "provider": decision.settings.provider.value,
            "strict": decision.strict, "ep_rank": wrapper.ep_rank, "ep_size": wrapper.ep_size,
            "buffer_bytes": dict(decision.buffer_bytes), "device_bytes": device_bytes,
            "describe": decision.describe(),
        }
        key = (decision.requested_mode.value, backend, reason)
        store.fallbacks[key] = store.fallbacks.get(key, 0) + 1
        store.buffers[(backend, mode)] = dict(decision.buffer_bytes)
        if device_bytes is not None:
            store.device_bytes[(backend, mode)] = device_bytes
    logger.debug("telemetry: %s %s buffer, fallback reason %s, device bytes %s", backend, mode, reason, device_bytes)


# ---------------------------------------------------------------------------------------------- reading
def snapshot(harvest: bool = False, wait: bool = False) -> dict[str, Any]:
    """Everything recorded so far, as a plain (JSON-serialisable) dict.

    Args:
        harvest: first fold the routers' completed device reads and queue a read of their low-latency counts
            (``query()`` only). Call it from the thread that runs the model, never while it captures a CUDA
            graph. Without it nothing touches CUDA: safe from any thread, at any time (what the collectors do).
        wait: with ``harvest``, block until the queued reads complete (an explicit sync: tests, the end of a
            benchmark), so that the counters include every call so far.

    Returns:
        ``{"decisions": {mode: {...}}, "fallbacks": [...], "series": [...], "buffers": [...],
        "device_bytes": [...]}``; see docs/operations.md#metrics.
    """
    store = _STORE
    if harvest:
        for recorder in list(store.recorders):
            recorder.flush(wait)
    with store.lock:
        return {
            "decisions": {mode: dict(d) for mode, d in store.decisions.items()},
            "fallbacks": [{"requested": r, "resolved": s, "reason": k, "count": n}
                          for (r, s, k), n in sorted(store.fallbacks.items())],
            "series": [s.to_dict() for _, s in sorted(store.series.items())],
            "buffers": [{"backend": b, "mode": m, "pool": pool, "bytes": n}
                        for (b, m), pools in sorted(store.buffers.items()) for pool, n in sorted(pools.items())],
            "device_bytes": [{"backend": b, "mode": m, "bytes": n} for (b, m), n in sorted(store.device_bytes.items())],
        }


class _Collector:
    """A Prometheus collector over :func:`snapshot` (host memory only)."""

    def collect(self) -> Any:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            InfoMetricFamily)

        snap = snapshot()
        series_labels = ["backend", "mode", "layer"]
        info = InfoMetricFamily("deepep_switch_backend", "The backend decision per mode (1 = current).",
                                labels=["mode"])
        for mode, d in sorted(snap["decisions"].items()):
            info.add_metric([mode], {"requested": d["requested"], "requested_mode": d["requested_mode"],
                                     "resolved": d["resolved"], "fallback_reason": d["fallback_reason"],
                                     "provider": d["provider"], "strict": str(d["strict"]).lower()})
        yield info
        fallbacks = CounterMetricFamily("deepep_switch_fallbacks", "Wrapper constructions by requested backend, "
                                        "resolved backend and fallback reason (none = got what was asked).",
                                        labels=["requested", "resolved", "reason"])
        for f in snap["fallbacks"]:
            fallbacks.add_metric([f["requested"], f["resolved"], f["reason"]], f["count"])
        yield fallbacks
        counters = {
            "dispatches": "Router round trips (prepare calls) outside CUDA graph capture.",
            "tokens_sent": "Tokens this rank handed to prepare (after TP slicing).",
            "tokens_received": "Token rows this rank's experts received (normal: one per source token and rank; "
                               "low-latency: one per token and local expert).",
            "samples_dropped": "Samples skipped because MAX_PENDING device reads were still in flight.",
        }
        for name, doc in counters.items():
            family = CounterMetricFamily(f"deepep_switch_{name}", doc, labels=series_labels)
            for s in snap["series"]:
                family.add_metric([s["backend"], s["mode"], s["layer"]], s[name])
            yield family
        histograms = {
            "expert_imbalance": ("expert_imbalance_ratio", "Sampled max/mean of rows received per local expert."),
            "rank_imbalance": ("rank_imbalance_ratio", "Sampled max/mean of (token, expert) pairs this rank sent "
                                                       "per destination rank."),
            "round_trip_seconds": ("round_trip_seconds", "Sampled prepare-start to finalize-end time on the stream "
                                                         "(dispatch + expert compute + combine)."),
        }
        for key, (name, doc) in histograms.items():
            family = HistogramMetricFamily(f"deepep_switch_{name}", doc, labels=series_labels)
            for s in snap["series"]:
                h = s[key]
                family.add_metric([s["backend"], s["mode"], s["layer"]], h["buckets"], h["sum"])
            yield family
        buffers = GaugeMetricFamily("deepep_switch_buffer_bytes", "Bytes the buffer plan asked for, per pool "
                                    "(NVSHMEM / NCCL-registered memory outside PyTorch's allocator included).",
                                    labels=["backend", "mode", "pool"])
        for b in snap["buffers"]:
            buffers.add_metric([b["backend"], b["mode"], b["pool"]], b["bytes"])
        yield buffers
        device = GaugeMetricFamily("deepep_switch_device_bytes", "Device memory the wrapper's buffer construction "
                                   "took (cudaMemGetInfo before/after; real DeepEP only).", labels=["backend", "mode"])
        for d in snap["device_bytes"]:
            device.add_metric([d["backend"], d["mode"]], d["bytes"])
        yield device


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError(_METRICS_EXTRA_HINT) from exc


_registered: "weakref.WeakSet[Any]" = weakref.WeakSet()
_registered_lock = threading.Lock()


def collectors() -> list[Any]:
    """Prometheus collectors exposing :func:`snapshot` as ``deepep_switch_*`` metrics (ImportError naming the
    ``metrics`` extra when prometheus_client is missing)."""
    _require_prometheus()
    return [_Collector()]


def register(registry: Any = None) -> list[Any]:
    """Register :func:`collectors` with ``registry`` (default: prometheus_client's global ``REGISTRY``), once per
    registry; returns what was registered (empty when it already was)."""
    _require_prometheus()
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    with _registered_lock:
        if registry in _registered:
            return []
        found = collectors()
        for collector in found:
            registry.register(collector)
        _registered.add(registry)
        return found
