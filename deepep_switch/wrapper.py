"""``DeepEPWrapper``: the process-wide owner of the one DeepEP buffer, with rtp-llm's singleton semantics.

``create(config)`` runs the whole chain once per process: settings -> preflight -> rank consensus -> sizing ->
construction, asking the registry (:mod:`deepep_switch.backends`) for the resolved generation's class and plan.
If that constructor raises on any rank, every rank learns it through one more small all-gather and all of them
build the fallback (legacy) buffer instead (strict mode: all of them raise). Nothing is published as the instance
until a buffer exists on this rank, so a failed ``create`` leaves nothing half-built.

Every wait for peers has the deadline ``RTP_LLM_DEEPEP_TIMEOUT_S``: the two all-gathers raise
``CommunicationTimeout``; construction and ``destroy()``, which wait for peers inside DeepEP's C++, run under the
watchdog (:mod:`deepep_switch.watchdog`), which ends the process if they are still blocked after the deadline
plus its grace.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from typing import Any, ClassVar, Optional, Protocol

import torch
import torch.distributed as dist

from . import telemetry
from .backend import Backend
from .backends import FALLBACK, BackendSpec, BufferPlan, get_spec, registered
from .blueprint import Blueprint
from .buffer_guard import GuardedBuffer
from .config import DeepEPMode, DeepepWrapperConfig
from .consensus import all_gather_ints
from .deadline import Deadline
from .decision import BackendDecision, BackendUnavailableError, resolve_backend
from .settings import LoadedSettings, ProviderChoice, get_settings, read_deep_ep_environment

logger = logging.getLogger("deepep_switch.wrapper")


class BufferUser(Protocol):
    """What the wrapper tells the routers built on it when its buffer goes away or comes back."""

    @property
    def handle(self) -> Any: ...
    def on_buffer_changed(self) -> None: ...


class DeepEPWrapper:
    """Owns the EP buffer of this process. Build it with :meth:`create`, find it with :meth:`get_instance`."""

    _instance: ClassVar[Optional["DeepEPWrapper"]] = None
    _lock: ClassVar[threading.RLock] = threading.RLock()
    _initialized: ClassVar[bool] = False

    def __init__(self, group: dist.ProcessGroup, config: DeepepWrapperConfig,
                 settings: Optional[LoadedSettings] = None) -> None:
        self._group = group
        self._config = config
        self._mode = config.mode
        # What this rank is about to build, with the environment DeepEP will read while building it (read now):
        # every rank compares it in the decision's all-gather and raises the same ValueError on any difference.
        blueprint = Blueprint.local(config, read_deep_ep_environment())
        decision = resolve_backend(group, settings=settings, internode=config.use_deepep_internode,
                                   low_latency=config.mode is DeepEPMode.LOW_LATENCY, blueprint=blueprint)
        if not decision.runnable:
            raise RuntimeError(f"DeepEP cannot run here: {decision.describe()}")
        self._provider: ProviderChoice = decision.settings.provider
        self._users: "weakref.WeakSet[BufferUser]" = weakref.WeakSet()
        self._deadline = Deadline(decision.settings.timeout_s, dist.get_rank(group), dist.get_world_size(group))
        metrics = decision.settings.metrics  # telemetry (docs/operations.md#metrics)
        free_before = telemetry.device_free_bytes(self._provider) if metrics else None
        self._buffer, self._plan, self._decision = self._build(decision)
        self._spec = get_spec(self._decision.resolved)
        logger.info("deepep-switch rank %d/%d: built %s buffer (%s mode) %s", config.ep_rank, config.ep_size,
                    self._decision.resolved.value, self._mode.name, self._plan.bytes)
        if metrics:
            telemetry.record_wrapper(self, free_before)

    # ------------------------------------------------------------------ construction
    def _build(self, decision: BackendDecision) -> tuple[Any, BufferPlan, BackendDecision]:
        if decision.resolved is not FALLBACK:
            buffer, plan, error = self._try_build(get_spec(decision.resolved), decision)
            rows = all_gather_ints([int(error is None)], self._group, decision.settings.timeout_s,
                                   what=f"{decision.resolved.value} buffer construction")
            failed = [rank for rank, row in enumerate(rows) if not row[0]]
            if not failed:
                assert plan is not None
                return buffer, plan, decision.model_copy(update={"buffer_bytes": plan.bytes})
            if buffer is not None:
                self._abandon(buffer)
            reason = f"{decision.resolved.value} buffer construction failed on ranks {failed}"
            if error is not None:
                reason += f" (here: {type(error).__name__}: {error})"
            logger.error("deepep-switch: %s; %s", reason,
                         "strict mode: raising" if decision.strict else f"every rank falls back to {FALLBACK.value}")
            if decision.strict:
                raise BackendUnavailableError(reason) from error
            decision = decision.model_copy(update={
                "resolved": FALLBACK, "fallback": reason, "reasons": [*decision.reasons, reason]})
        buffer, plan = self._construct(get_spec(FALLBACK), decision)
        return buffer, plan, decision.model_copy(update={"buffer_bytes": plan.bytes})

    def _try_build(self, spec: BackendSpec, decision: BackendDecision
                   ) -> tuple[Any, Optional[BufferPlan], Optional[BaseException]]:
        try:
            buffer, plan = self._construct(spec, decision)
            return buffer, plan, None
        except Exception as exc:  # any constructor failure is agreed on, then handled on every rank alike
            return None, None, exc

    def _construct(self, spec: BackendSpec, decision: BackendDecision) -> tuple[Any, BufferPlan]:
        """Size and build ``spec``'s buffer. Both wait for peers inside DeepEP (NCCL communicator and window
        registration, NVSHMEM initialisation), so both run under the watchdog."""
        cls = spec.buffer_class(self._provider)
        with self._deadline.guard("construction"):
            plan = spec.plan(cls, self._group, self._config, decision.settings)
            return cls(self._group, **plan.kwargs), plan

    @staticmethod
    def _abandon(buffer: Any) -> None:
        # Another rank has no buffer, so a collective destroy() would hang: drop it without one.
        logger.warning("deepep-switch: dropping this rank's buffer without a collective destroy "
                       "(its peers never built theirs); its memory is released with the process")
        del buffer

    def _destroy_buffer(self) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            return
        cuda = torch.cuda.is_available()
        with self._deadline.guard("destroy"):  # collective: it waits for every peer inside DeepEP's C++
            if cuda:
                torch.cuda.synchronize()
            buffer.destroy()  # every plan sets explicitly_destroy=True
        del buffer
        if cuda:  # return the freed blocks to the driver so memory_reserved() drops back
            gc.collect()
            torch.cuda.empty_cache()

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
        """Build the process's buffer (collective over ``group``, WORLD by default).

        Raises RuntimeError if torch.distributed is not initialized or a wrapper with a different config exists,
        ValueError for an invalid config (before any communication) and, on every rank together before any
        buffer exists, when the ranks' configs (but ``ep_rank``/``local_rank``) or the environment DeepEP reads
        while building differ, BackendUnavailableError in strict mode, and
        ``CommunicationTimeout`` (``ConsensusTimeout``) when a rank does not join within the deadline.
        """
        cls = DeepEPWrapper
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed must be initialized before DeepEPWrapper.create")
        with cls._lock:
            if cls._instance is not None:
                if cls._instance.config.equal(config):
                    logger.warning("DeepEPWrapper already created with this config; reusing it")
                    return cls._instance
                raise RuntimeError(f"DeepEPWrapper already created with a different config: "
                                   f"{cls._instance.config} != {config}")
            config.validate()
            group = group if group is not None else dist.group.WORLD
            if dist.get_world_size(group) != config.ep_size or dist.get_rank(group) != config.ep_rank:
                raise ValueError(f"config says ep_rank={config.ep_rank}/ep_size={config.ep_size} but the group "
                                 f"has rank {dist.get_rank(group)} of {dist.get_world_size(group)}")
            instance = cls(group, config, settings)
            cls._instance, cls._initialized = instance, True
            return instance

    @classmethod
    def get_instance(cls, config: DeepepWrapperConfig) -> "DeepEPWrapper":
        """The existing wrapper; raises if none exists or its config differs (it never creates one)."""
        with cls._lock:
            if cls._instance is None:
                raise RuntimeError("DeepEPWrapper is not initialized; call DeepEPWrapper.create(config) first")
            if not cls._instance.config.equal(config):
                raise RuntimeError(f"DeepEPWrapper config mismatch: {cls._instance.config} != {config}")
            return cls._instance

    @classmethod
    def reset(cls) -> None:
        """Destroy the buffer collectively (all ranks must call it) and free its memory.

        A rank that never calls it makes the others raise ``CommunicationTimeout`` (reference providers) or, on
        real DeepEP, be ended by the watchdog after the deadline plus its grace.
        """
        with cls._lock:
            instance, cls._instance, cls._initialized = cls._instance, None, False
            if instance is not None:
                instance._destroy_buffer()

    @classmethod
    def destroy_buffer(cls) -> None:
        """Free the buffer but keep the wrapper and its config (collective; rtp-llm's sleep/suspend API).

        Routers built on it stay valid: until :meth:`rebuild_buffer`, their ``prepare`` raises RuntimeError.
        Refused on every rank (RuntimeError, before any memory is freed) while any rank has a dispatch open.
        Without a wrapper, or when already suspended, it does nothing.
        """
        with cls._lock:
            instance = cls._instance
            if instance is None or instance._buffer is None:
                return
            instance._agree_no_open_dispatch("destroy_buffer")
            cls._initialized = False
            instance._destroy_buffer()
            instance._notify_users()
            logger.info("deepep-switch rank %d/%d: %s buffer destroyed; the wrapper is suspended", instance.ep_rank,
                        instance.ep_size, instance.backend.value)

    @classmethod
    def rebuild_buffer(cls) -> None:
        """Build the buffer again after :meth:`destroy_buffer` (collective), with the same config and backend
        (and the same agreed fallback if its construction fails on any rank). Routers follow it."""
        with cls._lock:
            instance = cls._instance
            if instance is None:
                logger.info("deepep-switch: rebuild_buffer skipped: no wrapper was created")
                return
            if instance._buffer is not None:
                return
            instance._buffer, instance._plan, instance._decision = instance._build(instance._decision)
            instance._spec = get_spec(instance._decision.resolved)
            cls._initialized = True
            instance._notify_users()
            logger.info("deepep-switch rank %d/%d: %s buffer rebuilt %s", instance.ep_rank, instance.ep_size,
                        instance.backend.value, instance._plan.bytes)

    def attach(self, user: BufferUser) -> None:
        """Register a router to be told when the buffer is destroyed or rebuilt (held weakly)."""
        self._users.add(user)

    def _notify_users(self) -> None:
        for user in list(self._users):
            user.on_buffer_changed()

    def _agree_no_open_dispatch(self, what: str) -> None:
        open_here = sum(user.handle is not None for user in list(self._users))
        rows = all_gather_ints([open_here], self._group, self._deadline.timeout_s, what=what)
        busy = [rank for rank, row in enumerate(rows) if row[0]]
        if busy:
            raise RuntimeError(f"{what} refused on every rank: ranks {busy} have a dispatch open (prepare() without "
                               "finalize()); finish it first")

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
        if self._buffer is None:
            raise RuntimeError("the DeepEP buffer is suspended (DeepEPWrapper.destroy_buffer()); call "
                               "DeepEPWrapper.rebuild_buffer() on every rank first")
        return self._buffer

    @property
    def backend(self) -> Backend:
        return self._decision.resolved

    @property
    def decision(self) -> BackendDecision:
        return self._decision

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
        return self._spec

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
        return self._plan.capacity

    @property
    def buffer_bytes(self) -> dict[str, int]:
        return dict(self._plan.bytes)

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
