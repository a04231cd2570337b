"""The routers' side of telemetry: :class:`RouterMetrics`, one recorder per router, bound at its construction,
with the device-dependent clock and reads chosen once (CUDA events and pinned non-blocking copies on GPUs, the
host clock on CPU)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Optional

import torch

from ..config import DeepEPMode
from . import store as _store
from .store import MAX_PENDING, _Histogram, _Store, layer_label, mode_label

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
        host = torch.empty(values.shape, dtype=values.dtype, device="cpu", pin_memory=True)
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
    settings = router.decision.settings
    if not settings.metrics:
        return None
    if previous is not None and previous.labels == (router.backend.value, mode_label(router.mode),
                                                    layer_label(router.options.layer_id)):
        return previous
    return RouterMetrics(_store.current(), router.backend.value, router.mode, router.options.layer_id, router.device,
                         router.num_local_experts, router.ep_size, settings.metrics_sample_every)


