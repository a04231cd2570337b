"""``BufferSlot``: one mode's buffer inside a :class:`~deepep_switch.DeepEPWrapper`.

A wrapper owns one slot per mode it serves (NORMAL, LOW_LATENCY, or both). A slot holds that mode's config, its
agreed :class:`~deepep_switch.decision.BackendDecision`, the buffer and its plan, the routers built on it, and the
buffers a live switch kept alive (``switch(keep_previous=True)``) until ``release_previous()``.

Building is agreed on every rank: :meth:`BufferSlot.build` constructs the decided generation's buffer inside a
``try``, all-gathers one bit "built", and if any rank failed every rank takes the fallback (legacy) instead (strict
mode: every rank raises). It may hand back a buffer that already exists instead of constructing one: the slot's
current buffer when the decision resolves to what it already runs, or a kept buffer every rank holds. Nothing is
installed until :meth:`BufferSlot.install`, so a caller building several slots publishes none of them until all
exist. Construction and ``destroy()`` wait for peers inside DeepEP's C++ and run under the watchdog.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any, NamedTuple, Optional, Protocol

import torch
import torch.distributed as dist

from . import telemetry
from .backend import Backend
from .backends import FALLBACK, BackendSpec, BufferPlan, get_spec, names
from .blueprint import Blueprint
from .config import DeepEPMode, DeepepWrapperConfig
from .consensus import all_gather_ints
from .deadline import Deadline
from .decision import BackendDecision, BackendUnavailableError, resolve_backend
from .preflight import PreflightReport
from .settings import LoadedSettings, ProviderChoice, read_deep_ep_environment

logger = logging.getLogger("deepep_switch.wrapper")


class BufferUser(Protocol):
    """What a slot tells the routers built on it when its buffer goes away, comes back or changes backend."""

    @property
    def handle(self) -> Any: ...
    def on_buffer_changed(self) -> None: ...


class Built(NamedTuple):
    """A buffer a slot is about to install.

    Attributes:
        buffer: the generation's buffer object.
        plan: how it was sized.
        decision: the agreed decision it serves (``buffer_bytes`` filled in).
        source: ``built`` (constructed now), ``kept`` (kept by an earlier switch) or ``unchanged`` (the slot's
            current buffer).
        device_bytes: device memory the construction took (real DeepEP with metrics on), else None.
    """

    buffer: Any
    plan: BufferPlan
    decision: BackendDecision
    source: str
    device_bytes: Optional[int] = None


def mode_config(config: DeepepWrapperConfig, mode: DeepEPMode) -> DeepepWrapperConfig:
    """``config`` for a buffer of ``mode`` (only ``use_deepep_low_latency`` changes)."""
    import dataclasses

    return dataclasses.replace(config, use_deepep_low_latency=mode is DeepEPMode.LOW_LATENCY)


class BufferSlot:
    """One mode's buffer, its decision, its routers and its kept buffers (see the module docstring).

    Args:
        mode: NORMAL or LOW_LATENCY.
        config: the wrapper config for this mode (its ``mode`` is ``mode``).
        group: the EP process group.
        deadline: this rank's deadline on waits for peers.
        provider: real DeepEP or the reference providers.
        metrics: whether telemetry measures device bytes at construction.
    """

    def __init__(self, mode: DeepEPMode, config: DeepepWrapperConfig, group: dist.ProcessGroup, deadline: Deadline,
                 provider: ProviderChoice, metrics: bool) -> None:
        self.mode, self.config, self.group, self.deadline, self.provider = mode, config, group, deadline, provider
        self.metrics = metrics
        self._buffer: Any = None
        self._current: Optional[Built] = None
        self._kept: dict[Backend, Built] = {}
        self._retired: dict[int, list[Any]] = {}  # id(buffer) -> routers' replaced paths over that buffer
        self._users: "weakref.WeakSet[BufferUser]" = weakref.WeakSet()

    # ------------------------------------------------------------------ decision
    def decide(self, loaded: LoadedSettings, preflight: Optional[PreflightReport] = None,
               request: Optional[str] = None) -> BackendDecision:
        """This mode's agreed decision (one bounded all-gather): the per-mode settings, or ``request`` (a live
        switch). The blueprint carries this mode's config and DeepEP's environment, read now."""
        blueprint = Blueprint.local(self.config, read_deep_ep_environment())
        return resolve_backend(self.group, settings=loaded, preflight=preflight, request=request,
                               internode=self.config.use_deepep_internode,
                               low_latency=self.mode is DeepEPMode.LOW_LATENCY, blueprint=blueprint)

    # ------------------------------------------------------------------ construction (agreed)
    def build(self, decision: BackendDecision, reusable: frozenset[Backend] = frozenset()) -> Built:
        """The buffer ``decision`` asks for, agreed on every rank; nothing is installed.

        The slot's current buffer is reused when it already runs the resolved generation, a kept buffer when its
        generation is in ``reusable`` (kept on every rank). Otherwise the generation is constructed; if that fails
        on any rank, every rank takes the fallback (strict mode: every rank raises BackendUnavailableError).
        """
        found = self._existing(decision, reusable)
        if found is not None:
            return found
        if decision.resolved is not FALLBACK:
            built, error = self._try_construct(get_spec(decision.resolved), decision)
            rows = all_gather_ints([int(error is None)], self.group, self.deadline.timeout_s,
                                   what=f"{decision.resolved.value} buffer construction")
            failed = [rank for rank, row in enumerate(rows) if not row[0]]
            if not failed:
                assert built is not None
                return built
            if built is not None:
                self.abandon(built.buffer)
            reason = f"{decision.resolved.value} buffer construction failed on ranks {failed}"
            if error is not None:
                reason += f" (here: {type(error).__name__}: {error})"
            logger.error("deepep-switch: %s %s; %s", self.mode.name, reason,
                         "strict mode: raising" if decision.strict else f"every rank falls back to {FALLBACK.value}")
            if decision.strict:
                raise BackendUnavailableError(reason) from error
            decision = decision.model_copy(update={
                "resolved": FALLBACK, "fallback": reason, "reasons": [*decision.reasons, reason]})
            found = self._existing(decision, reusable)
            if found is not None:
                return found
        return self._construct(get_spec(FALLBACK), decision)

    def _existing(self, decision: BackendDecision, reusable: frozenset[Backend]) -> Optional[Built]:
        backend = decision.resolved
        current = self._current if self._buffer is not None else None
        held = current if current is not None and current.plan.backend is backend else None
        source = "unchanged"
        if held is None and backend in reusable and backend in self._kept:
            held, source = self._kept[backend], "kept"
        if held is None:
            return None
        return Built(held.buffer, held.plan, decision.model_copy(update={"buffer_bytes": held.plan.bytes}), source)

    def _try_construct(self, spec: BackendSpec, decision: BackendDecision
                       ) -> tuple[Optional[Built], Optional[BaseException]]:
        try:
            return self._construct(spec, decision), None
        except Exception as exc:  # any constructor failure is agreed on, then handled on every rank alike
            return None, exc

    def _construct(self, spec: BackendSpec, decision: BackendDecision) -> Built:
        """Size and build ``spec``'s buffer. Both wait for peers inside DeepEP (NCCL communicator and window
        registration, NVSHMEM initialisation), so both run under the watchdog."""
        cls = spec.buffer_class(self.provider)
        free_before = telemetry.device_free_bytes(self.provider) if self.metrics else None
        with self.deadline.guard("construction"):
            plan = spec.plan(cls, self.group, self.config, decision.settings)
            buffer = cls(self.group, **plan.kwargs)
        free_after = telemetry.device_free_bytes(self.provider) if free_before is not None else None
        used = free_before - free_after if free_before is not None and free_after is not None else None
        return Built(buffer, plan, decision.model_copy(update={"buffer_bytes": plan.bytes}), "built", used)

    def abandon(self, buffer: Any) -> None:
        """Drop a buffer without the collective ``destroy()`` (a peer lacks its counterpart, so it would hang)."""
        self._retired.pop(id(buffer), None)
        logger.warning("deepep-switch: dropping this rank's buffer without a collective destroy "
                       "(its peers do not hold theirs); its memory is released with the process")
        del buffer

    # ------------------------------------------------------------------ installing, keeping, destroying
    def install(self, built: Built, record: bool = True) -> Optional[Built]:
        """Make ``built`` the slot's buffer; returns the buffer it replaces (to destroy or keep), or None when it
        is the same buffer (only the decision changed) or the slot had none. ``record``: report the decision to
        telemetry (a construction or switch; a rebuild after a suspension reports nothing new)."""
        previous = self._current
        if built.source == "kept":
            del self._kept[built.plan.backend]
        elif built.plan.backend in self._kept:  # a kept twin not held by every rank: it can never be reused
            self.abandon(self._kept.pop(built.plan.backend).buffer)
        self._current, self._buffer = built, built.buffer
        if self.metrics and record:
            telemetry.record_buffer(self, built.device_bytes)
        if previous is None or previous.buffer is None or previous.buffer is built.buffer:
            return None
        return previous

    def keep(self, built: Built) -> None:
        """Keep ``built`` (a replaced buffer) alive until :meth:`release_kept`."""
        self._kept[built.plan.backend] = built
        self._record_kept()

    def kept_mask(self) -> int:
        """The kept generations as a bit mask over the registry's order (for the switch's all-gather)."""
        order = names()
        return sum(1 << order.index(backend.value) for backend in self._kept)

    @staticmethod
    def backends_in(mask: int) -> frozenset[Backend]:
        """Inverse of :meth:`kept_mask`."""
        return frozenset(Backend(name) for bit, name in enumerate(names()) if mask >> bit & 1)

    def release_kept(self, common: frozenset[Backend]) -> list[str]:
        """Destroy the kept buffers (collective for those in ``common``, every rank's; the others are dropped
        without one). Returns the generations released."""
        released = []
        for backend in [b for b in map(Backend, names()) if b in self._kept]:
            built = self._kept.pop(backend)
            if backend in common:
                self.destroy(built.buffer)
            else:
                self.abandon(built.buffer)
            released.append(backend.value)
        self._record_kept()
        return released

    def destroy_current(self) -> None:
        """Destroy the slot's buffer (collective); the slot keeps its decision, to build again."""
        buffer, self._buffer = self._buffer, None
        if self._current is not None:
            self._current = self._current._replace(buffer=None)  # keep the decision, drop the reference
        if buffer is not None:
            self.destroy(buffer)

    def destroy_all(self) -> None:
        """Destroy the current buffer and every kept one (collective): suspend or reset."""
        self.destroy_current()
        self.release_kept(frozenset(self._kept))

    def destroy(self, buffer: Any) -> None:
        """Destroy one buffer collectively (it waits for every peer inside DeepEP's C++) and free its memory."""
        self._retired.pop(id(buffer), None)
        cuda = torch.cuda.is_available()
        with self.deadline.guard("destroy"):
            if cuda:
                torch.cuda.synchronize()
            buffer.destroy()  # every plan sets explicitly_destroy=True
        del buffer
        if cuda:  # return the freed blocks to the driver so memory_reserved() drops back
            gc.collect()
            torch.cuda.empty_cache()

    def _record_kept(self) -> None:
        if self.metrics:
            telemetry.record_kept(self.mode, {b.value: sum(k.plan.bytes.values()) for b, k in self._kept.items()})

    # ------------------------------------------------------------------ routers
    def attach(self, user: BufferUser) -> None:
        """Register a router to be told when the buffer is destroyed, rebuilt or switched (held weakly)."""
        self._users.add(user)

    def retire(self, path: Any) -> None:
        """Hold a router's replaced path for as long as its buffer lives (kept): a CUDA graph captured through it
        may still replay on that buffer, and must find everything the path owns."""
        buffer = getattr(path, "buffer", None)
        live = [k.buffer for k in self._kept.values()] + [self._buffer]
        if buffer is not None and any(buffer is b for b in live):
            self._retired.setdefault(id(buffer), []).append(path)

    def notify_users(self) -> None:
        for user in list(self._users):
            user.on_buffer_changed()

    def open_dispatches(self) -> int:
        """How many routers on this slot have a dispatch open (``prepare`` without ``finalize``)."""
        return sum(user.handle is not None for user in list(self._users))

    # ------------------------------------------------------------------ state
    @property
    def native_buffer(self) -> Any:
        """The buffer object itself (routers' paths and bench use it). RuntimeError while suspended."""
        if self._buffer is None:
            raise RuntimeError("the DeepEP buffer is suspended (DeepEPWrapper.destroy_buffer()); call "
                               "DeepEPWrapper.rebuild_buffer() on every rank first")
        return self._buffer

    @property
    def suspended(self) -> bool:
        return self._buffer is None

    @property
    def built(self) -> Built:
        assert self._current is not None, "the slot was never built"
        return self._current

    @property
    def decision(self) -> BackendDecision:
        return self.built.decision

    @property
    def backend(self) -> Backend:
        return self.built.decision.resolved

    @property
    def spec(self) -> BackendSpec:
        return get_spec(self.backend)

    @property
    def plan(self) -> BufferPlan:
        return self.built.plan

    @property
    def capacity(self) -> Optional[int]:
        """Tokens per rank per dispatch the buffer accepts; None when unbounded (legacy normal)."""
        return self.built.plan.capacity

    @property
    def kept(self) -> dict[str, dict[str, int]]:
        """The kept buffers: generation -> their plan's bytes per pool."""
        return {b.value: dict(k.plan.bytes) for b, k in self._kept.items()}

    @property
    def ep_rank(self) -> int:
        return self.config.ep_rank

    @property
    def ep_size(self) -> int:
        return self.config.ep_size
