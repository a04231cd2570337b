"""``DeepEPWrapper``: the process-wide owner of the DeepEP buffers, with rtp-llm's singleton semantics.

``create(config)`` runs the whole chain once per process for the config's mode: settings -> preflight -> rank
consensus -> sizing -> construction, asking the registry (:mod:`deepep_switch.backends`) for the resolved
generation's class and plan. ``create_both(config)`` does it for both modes, each with its own backend
(``RTP_LLM_DEEPEP_BACKEND_NORMAL`` / ``_LOW_LATENCY``), so one process runs prefill through ``NormalRouter`` and
decode through ``LowLatencyRouter``. Each mode's buffer lives in a :class:`~deepep_switch.slot.BufferSlot`.

If a constructor raises on any rank, every rank learns it through one more small all-gather and all of them build
the fallback (legacy) buffer instead (strict mode: all of them raise, and what the other mode built is destroyed).
Nothing is published as the instance until every buffer exists on this rank, so a failed ``create`` leaves
nothing half-built. :meth:`DeepEPWrapper.switch` moves a running wrapper to another generation under the same
rules (:mod:`deepep_switch.switching`).

Every wait for peers has the deadline ``RTP_LLM_DEEPEP_TIMEOUT_S``: the all-gathers raise ``CommunicationTimeout``;
construction and ``destroy()``, which wait for peers inside DeepEP's C++, run under the watchdog
(:mod:`deepep_switch.watchdog`), which ends the process if they are still blocked after the deadline plus its grace.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch.distributed as dist

from .backend import Backend
from .backends import FALLBACK, BackendSpec, registered
from .buffer_guard import GuardedBuffer
from .config import DeepEPMode, DeepepWrapperConfig
from .deadline import Deadline
from .decision import BackendDecision
from .settings import BackendChoice, LoadedSettings, ProviderChoice, get_settings
from .slot import BufferSlot, BufferUser, mode_config
from .switching import agree_idle, build_all, release_kept, switch_slots

logger = logging.getLogger("deepep_switch.wrapper")

__all__ = ["BufferUser", "DeepEPWrapper"]
_MODES = (DeepEPMode.NORMAL, DeepEPMode.LOW_LATENCY)


class DeepEPWrapper:
    """Owns the EP buffers of this process. Build it with :meth:`create` (one mode) or :meth:`create_both`, find it
    with :meth:`get_instance`, move it to another generation with :meth:`switch`."""

    _instance: ClassVar[Optional["DeepEPWrapper"]] = None
    _lock: ClassVar[threading.RLock] = threading.RLock()
    _initialized: ClassVar[bool] = False

    def __init__(self, group: dist.ProcessGroup, config: DeepepWrapperConfig,
                 settings: Optional[LoadedSettings] = None, modes: Optional[Sequence[DeepEPMode]] = None) -> None:
        self._group = group
        self._config = config
        self._mode = config.mode
        self._loaded = settings or get_settings()
        wanted = tuple(modes) if modes else (config.mode,)
        s = self._loaded.settings
        self._deadline = Deadline(s.timeout_s, dist.get_rank(group), dist.get_world_size(group))
        self._slots = {mode: BufferSlot(mode, mode_config(config, mode), group, self._deadline, s.provider, s.metrics)
                       for mode in _MODES if mode in wanted}
        slots = list(self._slots.values())
        # Every decision (one bounded all-gather each) before any buffer: what this rank is about to build, with
        # the environment DeepEP will read while building it, is compared there (the same ValueError everywhere).
        decisions = [slot.decide(self._loaded) for slot in slots]
        for decision in decisions:
            if not decision.runnable:
                raise RuntimeError(f"DeepEP cannot run here: {decision.describe()}")
        self._provider: ProviderChoice = decisions[0].settings.provider
        for slot, built in zip(slots, build_all(slots, decisions, [frozenset()] * len(slots))):
            slot.install(built)
            logger.info("deepep-switch rank %d/%d: built %s buffer (%s mode) %s", config.ep_rank, config.ep_size,
                        slot.backend.value, slot.mode.name, slot.plan.bytes)

    # ------------------------------------------------------------------ rtp-llm singleton API
    @classmethod
    def supported(cls) -> bool:
        """Whether the configured provider offers any registered generation's buffer class."""
        provider = get_settings().settings.provider
        for spec in registered():
            try:
                spec.buffer_class(provider)
            except ImportError:
                continue
            return True
        return False

    @classmethod
    def is_initialized(cls) -> bool:
        return cls._initialized

    @staticmethod
    def create(config: DeepepWrapperConfig, group: Optional[dist.ProcessGroup] = None, *,
               settings: Optional[LoadedSettings] = None) -> "DeepEPWrapper":
        """Build the process's buffer for ``config.mode`` (collective over ``group``, WORLD by default).

        Raises RuntimeError if torch.distributed is not initialized or a wrapper with a different config exists,
        ValueError for an invalid config (before any communication) and, on every rank together before any
        buffer exists, when the ranks' configs (but ``ep_rank``/``local_rank``) or the environment DeepEP reads
        while building differ, BackendUnavailableError in strict mode, and
        ``CommunicationTimeout`` (``ConsensusTimeout``) when a rank does not join within the deadline.
        """
        return DeepEPWrapper._create(config, group, settings, (config.mode,))

    @staticmethod
    def create_both(config: DeepepWrapperConfig, group: Optional[dist.ProcessGroup] = None, *,
                    settings: Optional[LoadedSettings] = None) -> "DeepEPWrapper":
        """Build a normal and a low-latency buffer in one wrapper (collective), each with its own agreed backend
        (``RTP_LLM_DEEPEP_BACKEND_NORMAL`` / ``RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY``, else
        ``RTP_LLM_DEEPEP_BACKEND``), for :class:`routers.NormalRouter`, :class:`routers.LowLatencyRouter` and
        :class:`routers.AutoRouter` in one process.

        ``config`` must carry both capacities (``max_tokens_per_rank`` and ``ll_num_max_token_per_rank``); its
        ``use_deepep_low_latency`` picks the primary mode, the one ``.buffer``/``.backend``/``.mode`` describe.
        The same errors as :meth:`create`; if the second buffer fails on any rank, the fallback applies to it
        alone, and in strict mode every rank raises after destroying the first. Nothing is published until both
        buffers exist.
        """
        return DeepEPWrapper._create(config, group, settings, _MODES)

    @staticmethod
    def _create(config: DeepepWrapperConfig, group: Optional[dist.ProcessGroup], settings: Optional[LoadedSettings],
                modes: tuple[DeepEPMode, ...]) -> "DeepEPWrapper":
        cls = DeepEPWrapper
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed must be initialized before DeepEPWrapper.create")
        with cls._lock:
            if cls._instance is not None:
                if cls._instance.owns(config) and set(modes) <= set(cls._instance.modes):
                    logger.warning("DeepEPWrapper already created with this config; reusing it")
                    return cls._instance
                raise RuntimeError(f"DeepEPWrapper already created with a different config: "
                                   f"{cls._instance.config} ({'+'.join(m.name for m in cls._instance.modes)}) != "
                                   f"{config} ({'+'.join(m.name for m in modes)})")
            for mode in modes:
                mode_config(config, mode).validate()
            group = group if group is not None else dist.group.WORLD
            if dist.get_world_size(group) != config.ep_size or dist.get_rank(group) != config.ep_rank:
                raise ValueError(f"config says ep_rank={config.ep_rank}/ep_size={config.ep_size} but the group "
                                 f"has rank {dist.get_rank(group)} of {dist.get_world_size(group)}")
            instance = cls(group, config, settings, modes)
            cls._instance, cls._initialized = instance, True
            return instance

    @classmethod
    def get_instance(cls, config: DeepepWrapperConfig) -> "DeepEPWrapper":
        """The existing wrapper; raises if none exists or it does not serve ``config`` (it never creates one).
        A two-mode wrapper serves its config in either mode (a normal-mode lookup may leave
        ``ll_num_max_token_per_rank`` at 0, as rtp-llm's normal routers do)."""
        with cls._lock:
            if cls._instance is None:
                raise RuntimeError("DeepEPWrapper is not initialized; call DeepEPWrapper.create(config) first")
            if not cls._instance.owns(config):
                raise RuntimeError(f"DeepEPWrapper config mismatch: {cls._instance.config} != {config}")
            return cls._instance

    def owns(self, config: Any) -> bool:
        """Whether ``config`` (ours or rtp-llm's) describes this wrapper: equal to its config, or, for a two-mode
        wrapper, to one of its modes' configs."""
        if self._config.equal(config):
            return True
        if len(self._slots) < 2:
            return False
        return any(slot.config.equal(config, ignore=("ll_num_max_token_per_rank",) if mode is DeepEPMode.NORMAL
                                     else ()) for mode, slot in self._slots.items())

    @classmethod
    def reset(cls) -> None:
        """Destroy every buffer collectively (all ranks must call it), kept ones included, and free their memory.

        A rank that never calls it makes the others raise ``CommunicationTimeout`` (reference providers) or, on
        real DeepEP, be ended by the watchdog after the deadline plus its grace.
        """
        with cls._lock:
            instance, cls._instance, cls._initialized = cls._instance, None, False
            if instance is not None:
                for slot in instance._slots.values():
                    slot.destroy_all()

    @classmethod
    def destroy_buffer(cls) -> None:
        """Free the buffers (kept ones too) but keep the wrapper, its config and decisions (collective; rtp-llm's
        sleep/suspend API).

        Routers built on it stay valid: until :meth:`rebuild_buffer`, their ``prepare`` raises RuntimeError.
        Refused on every rank (RuntimeError, before any memory is freed) while any rank has a dispatch open.
        Without a wrapper, or when already suspended, it does nothing.
        """
        with cls._lock:
            instance = cls._instance
            if instance is None or instance._primary.suspended:
                return
            slots = list(instance._slots.values())
            agree_idle(slots, instance._group, instance._deadline.timeout_s, "destroy_buffer")
            cls._initialized = False
            for slot in slots:
                slot.destroy_all()
                slot.notify_users()
            logger.info("deepep-switch rank %d/%d: %s buffer destroyed; the wrapper is suspended", instance.ep_rank,
                        instance.ep_size, "+".join(f"{s.backend.value} {s.mode.name}" for s in slots))

    @classmethod
    def rebuild_buffer(cls) -> None:
        """Build the buffers again after :meth:`destroy_buffer` (collective), with the same config and backends
        (and the same agreed fallback if a construction fails on any rank). Routers follow it."""
        with cls._lock:
            instance = cls._instance
            if instance is None:
                logger.info("deepep-switch: rebuild_buffer skipped: no wrapper was created")
                return
            if not instance._primary.suspended:
                return
            slots = list(instance._slots.values())
            built = build_all(slots, [slot.decision for slot in slots], [frozenset()] * len(slots))
            for slot, new in zip(slots, built):
                slot.install(new, record=False)
                slot.notify_users()
                logger.info("deepep-switch rank %d/%d: %s buffer (%s mode) rebuilt %s", instance.ep_rank,
                            instance.ep_size, slot.backend.value, slot.mode.name, slot.plan.bytes)
            cls._initialized = True

    # ------------------------------------------------------------------ live switch
    def switch(self, backend: Union[str, Backend, BackendChoice], *, mode: Optional[DeepEPMode] = None,
               keep_previous: bool = False) -> BackendDecision:
        """Move one mode's buffer to ``backend`` (a generation's name or ``auto``) while the process runs; collective.

        Agreed like :meth:`create`: the same fallback and strict rules, the same deadline. Refused on every rank
        with RuntimeError, before anything is built or freed, while any rank has a dispatch open on that mode.
        Routers on that mode rebind to the new buffer. ``keep_previous=True`` keeps the replaced buffer alive
        (CUDA graphs captured on it stay valid; its memory stays taken) until :meth:`release_previous`, and a
        later switch back to its generation reuses it instead of building. ``mode`` defaults to the wrapper's
        only mode; a two-mode wrapper needs it (or :meth:`switch_modes`). Returns the agreed decision.
        """
        if mode is None:
            if len(self._slots) > 1:
                raise ValueError("this wrapper owns both modes: pass mode=DeepEPMode.NORMAL or LOW_LATENCY, or "
                                 "call switch_modes({mode: backend, ...})")
            mode = self._mode
        return self.switch_modes({mode: backend}, keep_previous=keep_previous)[mode]

    def switch_modes(self, backends: Mapping[DeepEPMode, Union[str, Backend, BackendChoice]], *,
                     keep_previous: bool = False) -> dict[DeepEPMode, BackendDecision]:
        """:meth:`switch` for several modes at once: every new buffer exists before any is installed."""
        missing = [m.name for m in backends if m not in self._slots]
        if missing or not backends:
            raise ValueError(f"this wrapper serves {[m.name for m in self._slots]}, not {missing or 'nothing'}")
        with self._lock:
            slots = [self._slots[m] for m in _MODES if m in backends]
            requests = [str(getattr(backends[s.mode], "value", backends[s.mode])) for s in slots]
            decisions = switch_slots(slots, requests, self._loaded, keep_previous, self._group,
                                     self._deadline.timeout_s)
            return {slot.mode: decision for slot, decision in zip(slots, decisions)}

    def release_previous(self) -> dict[str, list[str]]:
        """Destroy the buffers kept by ``switch(keep_previous=True)`` (collective; first drop or re-capture the
        CUDA graphs that use them). Returns mode name -> generations released."""
        with self._lock:
            return release_kept(list(self._slots.values()), self._group, self._deadline.timeout_s)

    # ------------------------------------------------------------------ slots and routers
    def slot(self, mode: DeepEPMode) -> BufferSlot:
        """This wrapper's buffer for ``mode``; ValueError when it does not serve that mode."""
        slot = self._slots.get(mode)
        if slot is None:
            raise ValueError(f"the wrapper serves {'+'.join(m.name for m in self._slots)} mode, not {mode.name} "
                             "(DeepEPWrapper.create_both builds both)")
        return slot

    @property
    def modes(self) -> tuple[DeepEPMode, ...]:
        """The modes this wrapper serves (one, or NORMAL and LOW_LATENCY)."""
        return tuple(self._slots)

    @property
    def _primary(self) -> BufferSlot:
        return self._slots[self._mode]

    def attach(self, user: BufferUser) -> None:
        """Register a router (its ``mode``'s slot) to be told when the buffer is destroyed, rebuilt or switched."""
        self.slot(getattr(user, "mode", self._mode)).attach(user)

    def _agree_no_open_dispatch(self, what: str) -> None:
        agree_idle(list(self._slots.values()), self._group, self._deadline.timeout_s, what)

    # ------------------------------------------------------------------ properties
    @property
    def buffer(self) -> Any:
        """The buffer, for engine code that calls it directly. On a generation other than legacy, a guard that
        names the backend when such code calls a method that generation lacks (see :mod:`.buffer_guard`)."""
        buffer = self.native_buffer
        if self.backend is FALLBACK:
            return buffer
        return GuardedBuffer(buffer, self.backend.value, f"{type(buffer).__module__}.{type(buffer).__name__}")

    @property
    def native_buffer(self) -> Any:
        """The buffer object itself (routers' paths and bench use it). RuntimeError while suspended."""
        return self._primary.native_buffer

    @property
    def backend(self) -> Backend:
        return self._primary.backend

    @property
    def decision(self) -> BackendDecision:
        return self._primary.decision

    @property
    def deadline(self) -> Deadline:
        """This rank's deadline on waits for peers (``RTP_LLM_DEEPEP_TIMEOUT_S``), for the paths' guards."""
        return self._deadline

    @property
    def provider(self) -> ProviderChoice:
        """Where the buffer class came from: real DeepEP or the reference providers."""
        return self._provider

    @property
    def spec(self) -> BackendSpec:
        """The running generation's declaration (its paths, plan, library)."""
        return self._primary.spec

    @property
    def group(self) -> dist.ProcessGroup:
        return self._group

    @property
    def mode(self) -> DeepEPMode:
        return self._mode

    @property
    def config(self) -> DeepepWrapperConfig:
        return self._config

    @property
    def capacity(self) -> Optional[int]:
        """Tokens per rank per dispatch the buffer accepts; None when unbounded (legacy normal)."""
        return self._primary.capacity

    @property
    def buffer_bytes(self) -> dict[str, int]:
        return dict(self._primary.plan.bytes)

    @property
    def ep_rank(self) -> int:
        return self._config.ep_rank

    @property
    def ep_size(self) -> int:
        return self._config.ep_size

    @property
    def hidden_size(self) -> int:
        return self._config.hidden_size

    @property
    def num_experts(self) -> int:
        return self._config.expert_num

    @property
    def num_topk(self) -> int:
        return self._config.moe_k

    @property
    def ll_num_max_token_per_rank(self) -> int:
        return self._config.ll_num_max_token_per_rank

    @property
    def num_sms(self) -> int:
        return self._config.deep_ep_num_sm

    @property
    def use_accl_ep(self) -> bool:
        """Always False: deepep-switch speaks upstream DeepEP and never sends ACCL-only arguments."""
        return False
