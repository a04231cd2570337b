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

**Live switches** (:meth:`~deepep_switch.DeepEPWrapper.switch`) record the new decision like a construction, one
``switches_total{mode, from, to}`` count and the duration, and the bytes of buffers kept alive for CUDA graphs
(``kept_buffer_bytes``) until ``release_previous()``.

``prometheus_client`` is optional (the ``metrics`` extra) and imported only by :func:`collectors` /
:func:`register`.

Modules: :mod:`.store` (labels, aggregates, the store), :mod:`.recorder` (the routers' hook), :mod:`.events`
(the wrapper's reports), :mod:`.export` (snapshot and Prometheus).
"""

from .events import (BufferOwner, device_free_bytes, record_buffer, record_kept, record_switch,  # noqa: F401
                     record_wrapper)
from .export import collectors, register, snapshot  # noqa: F401
from .recorder import RouterMetrics, router_metrics  # noqa: F401
from .store import (FALLBACK_REASONS, IMBALANCE_BUCKETS, LATENCY_BUCKETS_S, MAX_PENDING,  # noqa: F401
                    SWITCH_BUCKETS_S, SWITCH_SOURCES, _Histogram, _Series, _Store, fallback_reason, layer_label,
                    mode_label, reset)

__all__ = [
    "FALLBACK_REASONS", "IMBALANCE_BUCKETS", "LATENCY_BUCKETS_S", "MAX_PENDING", "SWITCH_BUCKETS_S",
    "SWITCH_SOURCES", "BufferOwner", "RouterMetrics", "collectors", "device_free_bytes", "fallback_reason",
    "layer_label", "mode_label", "record_buffer", "record_kept", "record_switch", "record_wrapper", "register",
    "reset", "router_metrics", "snapshot",
]
