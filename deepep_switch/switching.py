"""Live switching: a wrapper's slots (:mod:`deepep_switch.slot`) move to another DeepEP generation while the process
runs, agreed by every rank like ``create``.

:func:`switch_slots` runs, on every rank, in this order:

1. one bounded all-gather of the open dispatches and kept buffers of the slots being switched: if any rank has a
   dispatch open on one of them, every rank raises the same RuntimeError before anything is built or freed;
2. the decision per slot (one bounded all-gather each, the request replacing the environment's): the same
   fallback, strict and agreement rules as ``create``;
3. the new buffers, all of them, before any is installed (reusing the current buffer when the decision resolves to
   what the slot already runs, or a buffer every rank kept); a construction failure on any rank falls back on every
   rank (strict mode: every rank raises, and what was built for the other slots is destroyed collectively);
4. per slot: install, destroy the replaced buffer or, with ``keep_previous``, keep it alive (CUDA graphs captured
   on it stay valid, and so do the routers' replaced paths) until :func:`release_kept`; then tell its routers,
   which rebind their path to the new buffer.

Every wait has the deadline ``RTP_LLM_DEEPEP_TIMEOUT_S``; construction and ``destroy()`` run under the watchdog.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch.distributed as dist

from . import telemetry
from .backend import Backend
from .consensus import all_gather_ints
from .decision import BackendDecision, BackendUnavailableError
from .settings import LoadedSettings
from .slot import BufferSlot, Built

logger = logging.getLogger("deepep_switch.wrapper")


def _modes(slots: Sequence[BufferSlot]) -> str:
    return "+".join(slot.mode.name for slot in slots)


def agree_idle(slots: Sequence[BufferSlot], group: dist.ProcessGroup, timeout_s: float,
               what: str) -> list[frozenset[Backend]]:
    """One bounded all-gather of ``[open dispatches per slot..., kept-generation mask per slot...]``.

    Raises RuntimeError on every rank when any rank has a dispatch open on one of ``slots``; returns, per slot,
    the kept generations every rank holds (only those may be reused or destroyed collectively).
    """
    count = len(slots)
    rows = all_gather_ints([slot.open_dispatches() for slot in slots] + [slot.kept_mask() for slot in slots],
                           group, timeout_s, what=what)
    busy = [rank for rank, row in enumerate(rows) if any(row[:count])]
    if busy:
        raise RuntimeError(f"{what} refused on every rank: ranks {busy} have a dispatch open on the "
                           f"{_modes(slots)} buffer (prepare() without finalize()); finish it first")
    common = []
    for i in range(count):
        mask = rows[0][count + i]
        for row in rows[1:]:
            mask &= row[count + i]
        common.append(BufferSlot.backends_in(mask))
    return common


def build_all(slots: Sequence[BufferSlot], decisions: Sequence[BackendDecision],
              reusable: Sequence[frozenset[Backend]]) -> list[Built]:
    """Every slot's buffer, agreed, none installed. If one raises, what was constructed here for the others is
    destroyed collectively when every rank raises together (BackendUnavailableError, strict mode), and dropped
    without the collective ``destroy()`` otherwise (a peer may never get there), then the error propagates."""
    built: list[Built] = []
    try:
        for slot, decision, reuse in zip(slots, decisions, reusable):
            built.append(slot.build(decision, reuse))
    except BackendUnavailableError:
        for slot, done in zip(slots, built):
            if done.source == "built":
                slot.destroy(done.buffer)
        raise
    except BaseException:
        for slot, done in zip(slots, built):
            if done.source == "built":
                slot.abandon(done.buffer)
        raise
    return built


def switch_slots(slots: Sequence[BufferSlot], requests: Sequence[str], loaded: LoadedSettings, keep_previous: bool,
                 group: dist.ProcessGroup, timeout_s: float) -> list[BackendDecision]:
    """Switch ``slots[i]`` to ``requests[i]`` (a generation's name or ``auto``), collectively; see the module
    docstring. Returns the agreed decisions, in ``slots`` order."""
    started = time.perf_counter()
    what = f"switch of the {_modes(slots)} buffer"
    for slot in slots:
        if slot.suspended:  # suspension is collective, so every rank raises here
            raise RuntimeError(f"{what} refused: the buffer is suspended (destroy_buffer()); rebuild_buffer() first")
    reusable = agree_idle(slots, group, timeout_s, what)
    decisions = [slot.decide(loaded, slot.decision.preflight, request) for slot, request in zip(slots, requests)]
    for decision in decisions:
        if not decision.runnable:  # identical on every rank; nothing was built
            raise RuntimeError(f"DeepEP cannot run here: {decision.describe()}")
    built = build_all(slots, decisions, reusable)
    for slot, new in zip(slots, built):
        before = slot.backend
        previous = slot.install(new)
        fate = "none"
        if previous is not None:
            if keep_previous:
                slot.keep(previous)
                fate = "kept alive until release_previous()"
            else:
                slot.destroy(previous.buffer)
                fate = "destroyed"
        if new.source != "unchanged":
            slot.notify_users()  # routers rebind; the paths they replace live on with a kept buffer
        seconds = time.perf_counter() - started
        logger.info("deepep-switch rank %d/%d: switched the %s buffer %s -> %s in %.3fs (%s; previous buffer: %s) "
                    "| %s", slot.ep_rank, slot.ep_size, slot.mode.name, before.value, new.decision.resolved.value,
                    seconds, {"built": "built now", "kept": "reused the kept buffer",
                              "unchanged": "already running it"}[new.source], fate, new.decision.describe())
        if slot.metrics:
            telemetry.record_switch(slot.mode, before.value, new.decision.resolved.value, seconds, new.source)
    return [new.decision for new in built]


def release_kept(slots: Sequence[BufferSlot], group: dist.ProcessGroup, timeout_s: float) -> dict[str, list[str]]:
    """Destroy every buffer ``slots`` keep (collective: one bounded all-gather, then ``destroy()`` of each kept
    buffer every rank holds). Returns mode name -> generations released."""
    common = agree_idle(slots, group, timeout_s, "release_previous")
    released = {slot.mode.name: slot.release_kept(shared) for slot, shared in zip(slots, common)}
    if any(released.values()):
        logger.info("deepep-switch rank %d/%d: released kept buffers %s", slots[0].ep_rank, slots[0].ep_size,
                    released)
    return released
