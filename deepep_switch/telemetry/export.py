"""Reading telemetry: :func:`snapshot` (a plain dict) and the Prometheus collectors over it (the optional
``metrics`` extra). Neither touches CUDA unless ``snapshot(harvest=True)`` is asked to."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from . import store as _store

_METRICS_EXTRA_HINT = ("prometheus_client is not installed: install deepep-switch's 'metrics' extra "
                       "(pip install 'deepep-switch[metrics]'), or read deepep_switch.telemetry.snapshot()")

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
        "device_bytes": [...], "switches": [...], "switch_seconds": {mode: {...}}, "kept": [...]}``; see
        docs/operations.md#metrics.
    """
    store = _store.current()
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
            "switches": [{"mode": m, "from": f, "to": t, "count": e["count"], "seconds_total": e["seconds"],
                          "last_seconds": e["last_seconds"], "last_source": e["last_source"]}
                         for (m, f, t), e in sorted(store.switches.items())],
            "switch_seconds": {m: h.to_dict() for m, h in sorted(store.switch_seconds.items())},
            "kept": [{"backend": b, "mode": m, "bytes": n} for (b, m), n in sorted(store.kept.items())],
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
        switches = CounterMetricFamily("deepep_switch_switches", "Live switches (DeepEPWrapper.switch) by mode, "
                                       "the backend before and the backend after.", labels=["mode", "from", "to"])
        for s in snap["switches"]:
            switches.add_metric([s["mode"], s["from"], s["to"]], s["count"])
        yield switches
        seconds = HistogramMetricFamily("deepep_switch_switch_seconds", "How long each live switch took on this "
                                        "rank (the whole collective call).", labels=["mode"])
        for mode, h in snap["switch_seconds"].items():
            seconds.add_metric([mode], h["buckets"], h["sum"])
        yield seconds
        kept = GaugeMetricFamily("deepep_switch_kept_buffer_bytes", "Buffers kept alive by "
                                 "switch(keep_previous=True) until release_previous(): plan bytes, all pools.",
                                 labels=["backend", "mode"])
        for k in snap["kept"]:
            kept.add_metric([k["backend"], k["mode"]], k["bytes"])
        yield kept


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
