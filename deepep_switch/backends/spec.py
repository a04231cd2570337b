"""What a DeepEP generation declares: :class:`BackendSpec`, with its :class:`Library` and :class:`BufferPlan`.

One instance per generation lives in that generation's module (``deepep_switch/backends/<name>.py``) and is
registered there; everything else in deepep-switch asks the registry (:mod:`deepep_switch.backends.registry`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..backend import Backend
from ..settings import ProviderChoice

if TYPE_CHECKING:  # annotations only: these modules import nothing from here
    import torch.distributed as dist

    from ..checks import Check, HostView
    from ..config import DeepepWrapperConfig
    from ..settings import SwitchSettings
    from .contracts import LowLatencyPath, NormalPath, RawRoundTrip

logger = logging.getLogger("deepep_switch.backends")


@dataclass(frozen=True)
class Library:
    """Where real DeepEP keeps a generation's buffer class, and how preflight names the facts about it.

    Attributes:
        modules: import names tried in order (the first that has ``attribute`` wins), e.g. ``("deep_ep",)``.
        attribute: the buffer class, e.g. ``"ElasticBuffer"``.
        import_check: the preflight check that the module imports (shared by generations of one module).
        api_check: the preflight check that the class exists.
        install_hint: what to install when it does not.
    """

    modules: tuple[str, ...]
    attribute: str
    import_check: str
    api_check: str
    install_hint: str

    def load(self) -> Any:
        """Import the buffer class lazily. Raises ImportError naming every module tried and why it failed:
        DeepEP's import-time checks raise AssertionError (NCCL files) or RuntimeError, not only ImportError."""
        problems = []
        for name in self.modules:
            try:
                module = importlib.import_module(name)
            except Exception as exc:
                problems.append(f"import {name}: {type(exc).__name__}: {exc}")
                continue
            if hasattr(module, self.attribute):
                return getattr(module, self.attribute)
            problems.append(f"{name} has no {self.attribute}")
        raise ImportError(f"{self.attribute} is unavailable ({'; '.join(problems)}). {self.install_hint}")


@dataclass(frozen=True)
class BufferPlan:
    """A buffer about to be built.

    Attributes:
        backend: which generation builds it.
        kwargs: constructor keyword arguments (the group is passed separately).
        bytes: what the hints asked for, by pool ("nvl", "rdma", "elastic", ...).
        capacity: tokens per rank per dispatch the buffer accepts (None = no fixed limit, legacy normal).
    """

    backend: Backend
    kwargs: dict[str, Any]
    bytes: dict[str, int]
    capacity: Optional[int]


def accepted_kwargs(buffer_cls: Any, candidates: dict[str, Any]) -> dict[str, Any]:
    """The part of ``candidates`` that ``buffer_cls``'s constructor accepts.

    How a plan hands its deadline to whatever it builds: real DeepEP only gets keywords its signature names
    (``ElasticBuffer(num_cpu_timeout_secs=, num_gpu_timeout_secs=)``; legacy ``Buffer`` names none), the
    reference providers also take ``timeout_s``. Dropped keywords are logged at DEBUG.
    """
    try:
        params = inspect.signature(buffer_cls).parameters
    except (TypeError, ValueError):  # no introspectable signature: pass nothing optional
        logger.warning("deepep-switch: cannot read %r's constructor signature; not passing %s",
                       buffer_cls, sorted(candidates))
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(candidates)
    kept = {name: value for name, value in candidates.items() if name in params}
    if len(kept) < len(candidates):
        logger.debug("deepep-switch: %s does not take %s", getattr(buffer_cls, "__name__", buffer_cls),
                     sorted(set(candidates) - set(kept)))
    return kept


PlanFn = Callable[[Any, "dist.ProcessGroup", "DeepepWrapperConfig", "SwitchSettings"], BufferPlan]
"""``plan(buffer_cls, group, config, settings)``: size from the class's own hints; ValueError if it cannot serve."""
ChecksFn = Callable[["HostView", "SwitchSettings"], list["Check"]]
"""Host checks beyond the library's own (NCCL, GIN, ...), each gating this generation."""


def _no_checks(host: "HostView", settings: "SwitchSettings") -> list["Check"]:
    return []


@dataclass(frozen=True)
class BackendSpec:
    """One DeepEP generation, complete.

    Attributes:
        name: the value operators write in ``RTP_LLM_DEEPEP_BACKEND`` (lower case).
        summary: one line for logs and ``doctor``.
        library: how real DeepEP provides its buffer class.
        reference: returns the pure-PyTorch provider's class with the same API (imported lazily).
        plan: how its buffer is sized and built.
        normal_path / low_latency_path: the router paths (see :mod:`deepep_switch.backends.contracts`).
        host_checks: preflight checks beyond the library's (default: none); ``check_names`` lists every name
            they can return, so each rank's vote has the same bit layout.
        raw_round_trip: ``raw(buffer, low_latency, capacity, num_experts, x, ids, weights, quant)`` -> a benchmark
            baseline made of raw library calls, or None (bench then shows no raw column).
        raw_weighted_round_trip: the same signature -> a baseline that also does what a correct integration must
            add to the raw calls (elastic low-latency: quantise and apply the top-k weights), or None (bench shows
            no raw+w column for that generation or mode).
        auto_priority: ``auto`` picks the runnable generation with the highest value; the fallback never needs one.
    """

    name: str
    summary: str
    library: Library
    reference: Callable[[], type]
    plan: PlanFn
    normal_path: "type[NormalPath]"
    low_latency_path: "type[LowLatencyPath]"
    host_checks: ChecksFn = _no_checks
    check_names: tuple[str, ...] = ()
    raw_round_trip: Optional[Callable[..., "RawRoundTrip"]] = None
    raw_weighted_round_trip: Optional[Callable[..., Optional["RawRoundTrip"]]] = None
    auto_priority: int = 0

    @property
    def backend(self) -> Backend:
        return Backend(self.name)

    @property
    def all_check_names(self) -> tuple[str, ...]:
        """Every preflight check that can gate this generation, library checks first."""
        return (self.library.import_check, self.library.api_check, *self.check_names)

    def buffer_class(self, provider: ProviderChoice) -> Any:
        """The class to build: the reference provider's, or real DeepEP's (ImportError when unusable)."""
        return self.reference() if provider is ProviderChoice.REFERENCE else self.library.load()
