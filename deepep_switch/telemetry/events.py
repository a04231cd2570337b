"""The wrapper's side of telemetry: what it built and why (:func:`record_buffer`), live switches
(:func:`record_switch`) and the buffers a switch kept alive (:func:`record_kept`). Called once per construction
or switch, never on the hot path."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Protocol

import torch

from ..settings import ProviderChoice
from . import store as _store
from .store import SWITCH_BUCKETS_S, _Histogram, fallback_reason, mode_label

if TYPE_CHECKING:  # annotations only
    from ..config import DeepEPMode
    from ..decision import BackendDecision

logger = logging.getLogger("deepep_switch.telemetry")


class BufferOwner(Protocol):
    """What :func:`record_buffer` reads: a wrapper (its primary mode) or one of its per-mode slots."""

    @property
    def decision(self) -> "BackendDecision": ...
    @property
    def mode(self) -> "DeepEPMode": ...
    @property
    def provider(self) -> ProviderChoice: ...
    @property
    def ep_rank(self) -> int: ...
    @property
    def ep_size(self) -> int: ...


def device_free_bytes(provider: ProviderChoice) -> Optional[int]:
    """Free bytes on the current CUDA device (real DeepEP only), to measure what a buffer takes; else None."""
    if provider is not ProviderChoice.DEEP_EP or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def record_buffer(owner: BufferOwner, device_bytes: Optional[int]) -> None:
    """A construction or live switch of ``owner``'s buffer: its decision (the ``backend_info`` of its mode, one
    ``fallbacks_total`` count), the plan's buffer bytes and the device bytes its construction took (None when not
    measured, or when an existing buffer was reused)."""
    decision = owner.decision
    mode, backend = mode_label(owner.mode), decision.resolved.value
    reason = fallback_reason(decision)
    store = _store.current()
    with store.lock:
        store.decisions[mode] = {
            "requested": decision.requested.value, "requested_mode": decision.requested_mode.value,
            "request_source": decision.request_env,
            "resolved": backend, "fallback_reason": reason, "fallback": decision.fallback,
            "reasons": list(decision.reasons), "provider": decision.settings.provider.value,
            "strict": decision.strict, "ep_rank": owner.ep_rank, "ep_size": owner.ep_size,
            "buffer_bytes": dict(decision.buffer_bytes), "device_bytes": device_bytes,
            "describe": decision.describe(),
        }
        key = (decision.requested_mode.value, backend, reason)
        store.fallbacks[key] = store.fallbacks.get(key, 0) + 1
        store.buffers[(backend, mode)] = dict(decision.buffer_bytes)
        if device_bytes is not None:
            store.device_bytes[(backend, mode)] = device_bytes
    logger.debug("telemetry: %s %s buffer, fallback reason %s, device bytes %s", backend, mode, reason, device_bytes)


def record_wrapper(wrapper: BufferOwner, free_before: Optional[int]) -> None:
    """The 0.1 form of :func:`record_buffer`: ``free_before`` from :func:`device_free_bytes` before the
    construction, the device bytes measured now."""
    after = device_free_bytes(wrapper.provider) if free_before is not None else None
    record_buffer(wrapper, free_before - after if free_before is not None and after is not None else None)


def record_switch(mode: "DeepEPMode", previous: str, resolved: str, seconds: float, source: str) -> None:
    """One live switch of ``mode``'s buffer from backend ``previous`` to ``resolved`` that took ``seconds`` on
    this rank (the whole collective call), its buffer ``source`` being one of :data:`store.SWITCH_SOURCES`."""
    label = mode_label(mode)
    store = _store.current()
    with store.lock:
        entry = store.switches.setdefault((label, previous, resolved), {"count": 0, "seconds": 0.0})
        entry.update(count=entry["count"] + 1, seconds=entry["seconds"] + seconds, last_seconds=seconds,
                     last_source=source)
        store.switch_seconds.setdefault(label, _Histogram(SWITCH_BUCKETS_S)).observe(seconds)


def record_kept(mode: "DeepEPMode", kept: dict[str, int]) -> None:
    """The buffers ``mode`` keeps alive after a switch or :meth:`~deepep_switch.DeepEPWrapper.release_previous`:
    backend -> plan bytes (all pools); an empty dict when none is kept."""
    label = mode_label(mode)
    store = _store.current()
    with store.lock:
        for key in [k for k in store.kept if k[1] == label]:
            del store.kept[key]
        for backend, nbytes in kept.items():
            store.kept[(backend, label)] = nbytes
