"""Typed contracts between a router and a generation's backend path.

A *path* is the one class per generation per router mode that talks to that generation's buffer. The router
binds one at construction (``spec.normal_path.build(ctx)``) and afterwards only calls ``dispatch`` and
``combine``; everything a path returns has the same meaning on every generation, which is what lets the router
hand the executor one payload whatever ran. In the spirit of vLLM's ``FusedMoEPrepareAndFinalize`` (communication
apart from expert compute) and SGLang's dispatch-output types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Protocol, Union

import torch

from ..deadline import Deadline
from ..quant import Quant
from ..settings import SwitchSettings

XType = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
"""A dispatch payload: bf16 ``[T, H]``, or FP8 ``(x_fp8 [T, H], scales float32 [T, H/128])``."""


class WeightsAppliedBy(str, Enum):
    """Who multiplies expert outputs by the top-k routing weights."""

    EXECUTOR = "executor"   # normal mode: the payload carries the weights, combine only sums
    PATH = "path"           # low-latency: the path's combine weights the rows (in the library or in a kernel)


@dataclass(frozen=True)
class Capabilities:
    """What a path promises, declared on the class.

    Attributes:
        host_sync: ``dispatch`` waits for the device to learn row counts (not CUDA-graph capturable).
        graph_capturable: prepare -> executor -> finalize can be captured in one CUDA graph.
        weights: who applies the top-k weights.
    """

    host_sync: bool
    graph_capturable: bool
    weights: WeightsAppliedBy


@dataclass(frozen=True)
class PathContext:
    """Everything a path needs, fixed when a router is built.

    Attributes:
        buffer: the wrapper's buffer (this generation's class, real or reference).
        real_deep_ep: the buffer is real DeepEP (check the library's compiled limits at construction).
        num_experts / num_local_experts / num_ranks / num_topk / hidden: the layer (E, E/R, R, K, H).
        capacity: tokens per rank per dispatch the buffer accepts (None: unbounded, legacy normal).
        expert_alignment: normal mode: pad each local expert's row count to a multiple of this.
        quant: the dispatch quantisation; ``quantize`` applies it to a bf16 ``[T, H]`` (identity for NONE).
        num_sms: SMs for the communication kernels (0 = the library's default).
        device: where the router's tensors live.
        group: the EP process group (for the rare collective a compatibility view needs).
        deadline: this rank's deadline on waits for peers; a path builds a watchdog guard from it
            (``deadline.guard("dispatch")``) for each host-blocking library call, and only for those.
        settings: the agreed settings, for a generation's own knobs (e.g. ``elastic_ll_layout``); None: defaults.
    """

    buffer: Any
    real_deep_ep: bool
    num_experts: int
    num_local_experts: int
    num_ranks: int
    num_topk: int
    hidden: int
    capacity: Optional[int]
    expert_alignment: int
    quant: Quant
    quantize: Callable[[torch.Tensor], XType]
    num_sms: int
    device: torch.device
    group: Any
    deadline: Deadline
    settings: Optional[SwitchSettings] = None


class NormalDispatch(NamedTuple):
    """What a normal path's ``dispatch`` returns: one row per (source token, this rank), order unspecified.

    Attributes:
        x: ``[N_recv, H]`` bf16, or float8_e4m3fn when FP8.
        scales: float32 ``[N_recv, H/128]`` with FP8, else None.
        topk_ids: int64 ``[N_recv, K]``: local expert ids, -1 for experts on other ranks.
        topk_weights: float32 ``[N_recv, K]``: 0.0 wherever the id is -1.
        counts: rows per local expert, aligned to the expert alignment (a host list, ``E_local`` long).
        handle: whatever ``combine`` needs.
    """

    x: torch.Tensor
    scales: Optional[torch.Tensor]
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    counts: list[int]
    handle: Any


class LowLatencyDispatch(NamedTuple):
    """What a low-latency path's ``dispatch`` returns, with no host synchronisation.

    Attributes:
        x: ``[E_local, R*N, H]`` bf16 or float8_e4m3fn; only ``x[e, :counts[e]]`` is valid.
        scales: float32 ``[E_local, R*N, H/128]`` (token dimension contiguous) with FP8, else None.
        counts: int32 ``[E_local]`` on the device.
        handle: whatever ``combine`` needs.
    """

    x: torch.Tensor
    scales: Optional[torch.Tensor]
    counts: torch.Tensor
    handle: Any


class NormalPath(Protocol):
    """A generation's normal-mode (prefill) path."""

    capabilities: ClassVar[Capabilities]
    buffer: Any

    @classmethod
    def build(cls, ctx: PathContext) -> "NormalPath":
        """Bind to ``ctx``; raise ValueError for a layer this library cannot serve (before any communication)."""

    def dispatch(self, x: XType, ids: torch.Tensor, weights: torch.Tensor) -> NormalDispatch:
        """``x`` as quantised by the router, int64 ``ids [T, K]`` (global, -1 = none), float32 ``weights [T, K]``."""

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """bf16 ``y [N_recv, H]`` (already weighted by the executor) -> the unweighted sum per token, bf16 ``[T, H]``."""


class LowLatencyPath(Protocol):
    """A generation's low-latency (decode) path."""

    capabilities: ClassVar[Capabilities]
    buffer: Any

    @classmethod
    def build(cls, ctx: PathContext) -> "LowLatencyPath":
        """Bind to ``ctx``; raise ValueError for a layer this library cannot serve (before any communication)."""

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> LowLatencyDispatch:
        """bf16 ``x [T, H]``, int64 ``ids [T, K]``, float32 ``weights [T, K]``; the path quantises if needed."""

    def combine(self, y: torch.Tensor, handle: Any, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """bf16 ``y [E_local, R*N, H]`` (unweighted) -> the top-k weighted sum per token, bf16 ``[T, H]``."""


RawRoundTrip = Callable[[], Any]
"""A benchmark baseline: one dispatch + combine made with raw library calls, as a hand-written integration would."""
