"""The shared shape of both routers: rtp-llm's ``prepare``/``finalize`` signatures around a bound backend path.

A router is built once per MoE layer from the wrapper's decision. The backend path (one class per generation per
router mode, declared in that generation's module and found through the registry) and the validator of the agreed
``RTP_LLM_DEEPEP_VALIDATE`` mode (:mod:`routers.validation`) are bound in ``__init__``; ``prepare`` and
``finalize`` only validate, slice by TP, call the bound path and build the payload.

The open dispatch (the backend's handle, the executor-output shape ``prepare`` delivered, the ids it dispatched)
lives on the router between the two calls. ``prepare`` refuses to start while one is open. ``finalize`` closes it
once the combine has been attempted, even if the combine raises; a ``finalize`` that raises *before* communicating
(a bad argument, or an executor output that does not match the dispatch) leaves it open, so ``finalize`` can be
called again with a correct output and complete the combine the other ranks are waiting in.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Optional, TypeVar

import torch
import torch.distributed as dist

from deepep_switch import telemetry
from deepep_switch.backend import Backend
from deepep_switch.backends import BackendSpec, PathContext
from deepep_switch.config import DeepEPMode
from deepep_switch.decision import BackendDecision
from deepep_switch.quant import Quant, quantizer_for
from deepep_switch.settings import ProviderChoice
from deepep_switch.slot import BufferSlot
from deepep_switch.wrapper import DeepEPWrapper

from .payloads import CombineForwardPayload, ExpertForwardPayload, FinalizeArgs
from .tp import TensorParallelSlicer
from .validation import check_output, validator_for

logger = logging.getLogger("routers")

# rtp-llm passes these ACCL-EP-only arguments on CUDA; upstream DeepEP has no use for them.
FORK_ONLY_KWARGS = frozenset({"opt_level", "pertoken_quant"})
_fork_kwargs_logged = False


def ignore_fork_kwargs(kwargs: dict[str, Any]) -> None:
    """Accept rtp-llm's fork-only kwargs (one debug line per process); reject anything else."""
    global _fork_kwargs_logged
    unknown = set(kwargs) - FORK_ONLY_KWARGS
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
    if kwargs and not _fork_kwargs_logged:
        _fork_kwargs_logged = True
        logger.debug("ignoring ACCL-EP-only arguments %s: upstream DeepEP has no such options", sorted(kwargs))


@dataclass(frozen=True, init=False)
class RouterOptions:
    """How a router dispatches, fixed at construction.

    Attributes:
        quant: the dispatch quantisation (:class:`deepep_switch.quant.Quant`): bf16, or FP8 e4m3 with float32
            scales per token per 128 channels (DeepEP's recipe), optionally rounded to powers of two.
        expert_alignment: normal router: pad each local expert's count to a multiple of this.
        global_expert_ids: normal router: give the executor global expert ids, with -1 mapped to a zero-weight
            dummy expert (rtp-llm's bf16/W4A8 executors want this); default: local ids with -1.
        tp_rank / tp_size / tp_group: attention tensor parallelism (slice before dispatch, gather after combine).
        layer_id: the MoE layer this router serves, a non-negative int: the ``layer`` label of its telemetry
            (``RTP_LLM_DEEPEP_METRICS=1``); None (default) records it under ``layer="all"``.

    ``use_fp8=`` / ``round_scale=`` (deepep-switch 0.1) are still accepted and mapped to ``quant`` with a
    DeprecationWarning; ``options.use_fp8`` / ``options.round_scale`` read ``quant``.
    """

    quant: Quant
    expert_alignment: int
    global_expert_ids: bool
    tp_rank: int
    tp_size: int
    tp_group: Optional[dist.ProcessGroup]
    layer_id: Optional[int]

    def __init__(self, quant: Quant = Quant.NONE, expert_alignment: int = 1, global_expert_ids: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Optional[dist.ProcessGroup] = None,
                 layer_id: Optional[int] = None, *,
                 use_fp8: Optional[bool] = None, round_scale: Optional[bool] = None) -> None:
        if use_fp8 is not None or round_scale is not None:
            warnings.warn("RouterOptions(use_fp8=, round_scale=) is deprecated: pass quant=Quant.FP8_BLOCK "
                          "(or Quant.FP8_BLOCK_POW2)", DeprecationWarning, stacklevel=2)
            if quant is not Quant.NONE:
                raise ValueError("pass either quant= or use_fp8=/round_scale=, not both")
            quant = Quant.from_flags(bool(use_fp8), bool(round_scale))
        if layer_id is not None and (isinstance(layer_id, bool) or not isinstance(layer_id, int) or layer_id < 0):
            raise ValueError(f"layer_id must be None or a non-negative int (a bounded metrics label), got {layer_id!r}")
        for name, value in (("quant", Quant(quant)), ("expert_alignment", expert_alignment),
                            ("global_expert_ids", global_expert_ids), ("tp_rank", tp_rank), ("tp_size", tp_size),
                            ("tp_group", tp_group), ("layer_id", layer_id)):
            object.__setattr__(self, name, value)

    @property
    def use_fp8(self) -> bool:
        return self.quant.is_fp8

    @property
    def round_scale(self) -> bool:
        return self.quant.round_scale


PathT = TypeVar("PathT")


class _SuspendedPath:
    """Bound while the wrapper's buffer is destroyed: every call says why and what to do."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def dispatch(self, *args: Any) -> Any:
        raise RuntimeError(self.reason)

    combine = dispatch


class OpenDispatch(NamedTuple):
    """What a router remembers between ``prepare`` and ``finalize`` (host-known, no host sync to build).

    Attributes:
        handle: the backend path's dispatch handle.
        output_shape: the shape the executor's bf16 output must have: ``expert_x.shape`` (normal ``[N_recv, H]``,
            low-latency ``[E_local, R*N, H]``).
        output_device: where ``expert_x`` (and so the output) lives.
        ids: int64 ``[T, K]``: the ids the dispatch used (TP-sliced, cleaned by the validation mode); the combine
            gets these, so ids the dispatch never saw cannot reach DeepEP.
        rejected: why the last ``finalize`` refused the executor's output, else None.
    """

    handle: Any
    output_shape: torch.Size
    output_device: torch.device
    ids: torch.Tensor
    rejected: Optional[str] = None


class RouterBase(ABC, Generic[PathT]):
    """prepare/finalize around one bound backend path. Subclasses: NormalRouter, LowLatencyRouter."""

    mode: DeepEPMode

    def __init__(self, wrapper: DeepEPWrapper, options: Optional[RouterOptions] = None, **fork_kwargs: Any) -> None:
        ignore_fork_kwargs(fork_kwargs)
        options = options or RouterOptions()
        if self.mode not in wrapper.modes:
            raise ValueError(f"{type(self).__name__} needs a wrapper built in {self.mode.name} mode, "
                             f"got {'+'.join(m.name for m in wrapper.modes)} (DeepEPWrapper.create_both builds both)")
        if options.expert_alignment < 1:
            raise ValueError("expert_alignment must be >= 1")
        cfg = wrapper.config
        self.wrapper = wrapper
        # This mode's buffer inside the wrapper, bound once: it follows destroy/rebuild and live switches.
        self._slot: BufferSlot = wrapper.slot(self.mode)
        self.options = options
        self.num_experts, self.num_topk, self.hidden_size = cfg.expert_num, cfg.moe_k, cfg.hidden_size
        self.ep_rank, self.ep_size = cfg.ep_rank, cfg.ep_size
        self.num_local_experts = cfg.expert_num // cfg.ep_size
        self.capacity = self._slot.capacity
        self._tp = TensorParallelSlicer(options.tp_rank, options.tp_size, options.tp_group)
        # Real DeepEP runs on the current CUDA device; the reference providers may run anywhere (torch kernels).
        self._real_deep_ep = wrapper.provider is ProviderChoice.DEEP_EP
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self._real_deep_ep
                       else torch.device("cpu"))
        # Which quantiser kernel runs ("triton"/"torch"), or None without quantisation (nothing is compiled then).
        self.quantizer, self._quantize = quantizer_for(options.quant, self.device)
        validator = validator_for(self._slot.decision.settings.validation, self.hidden_size, self.num_topk,
                                  self.num_experts, self.device if self._real_deep_ep else None)
        self.validation = validator.mode
        # Which id clean-up runs ("triton"/"torch"), or None when ids go to DeepEP as given (off).
        self.id_cleanup = validator.kernel
        self._check_inputs = validator.check_inputs
        self._check_values = validator.check_values
        self._clean_ids = validator.clean_ids
        self._handle: Optional[OpenDispatch] = None
        self._path: PathT = self._bind_path()
        self._metrics: Optional[telemetry.RouterMetrics] = telemetry.router_metrics(self)  # None: metrics off
        self._slot.attach(self)  # told when the buffer is destroyed, rebuilt or switched

    def _bind_path(self) -> Any:
        """Build this mode's path class of the slot's running generation over its current buffer."""
        slot, options = self._slot, self.options
        ctx = PathContext(
            buffer=slot.native_buffer, real_deep_ep=self._real_deep_ep, num_experts=self.num_experts,
            num_local_experts=self.num_local_experts, num_ranks=self.ep_size, num_topk=self.num_topk,
            hidden=self.hidden_size, capacity=self.capacity, expert_alignment=options.expert_alignment,
            quant=options.quant, quantize=self._quantize, num_sms=slot.decision.settings.num_sms,
            device=self.device, group=slot.group, deadline=slot.deadline, settings=slot.decision.settings)
        path = self._path_class(slot.spec).build(ctx)
        logger.debug("%s bound to %s path %s", type(self).__name__, slot.backend.value, type(path).__name__)
        return path

    def on_buffer_changed(self) -> None:
        """The wrapper destroyed, rebuilt or switched this mode's buffer: bind to the new one, or refuse to run
        until it exists."""
        self._handle = None
        self.capacity = self._slot.capacity
        self._metrics = telemetry.router_metrics(self, self._metrics)  # labels follow the running backend
        replaced = self._path
        try:
            self._path = self._bind_path()
        except RuntimeError as exc:  # suspended: no buffer to bind to
            self._path = _SuspendedPath(str(exc))  # type: ignore[assignment]
        self._slot.retire(replaced)  # kept alive with a kept buffer: graphs captured through it still replay

    @staticmethod
    @abstractmethod
    def _path_class(spec: BackendSpec) -> Any:
        """This router mode's path class in ``spec``."""

    @abstractmethod
    def _prepare(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[ExpertForwardPayload, Any]:
        """TP-sliced bf16 ``x [T,H]``, cleaned int64 ``ids [T,K]``, float32 ``weights [T,K]`` -> (payload, handle)."""

    @abstractmethod
    def _finalize(self, y: torch.Tensor, handle: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Expert output in the payload layout (checked) -> combined bf16 ``[T_tp, H]``; ``topk_ids`` are the
        int64 ids the dispatch used."""

    @property
    def backend(self) -> Backend:
        """The generation this router's mode runs now (it follows live switches)."""
        return self._slot.backend

    @property
    def decision(self) -> BackendDecision:
        """The agreed decision of this router's mode (settings, reasons, fallback)."""
        return self._slot.decision

    @property
    def path(self) -> PathT:
        """The bound backend path (its ``capabilities`` say whether it syncs the host, can be graph-captured and
        who applies the top-k weights)."""
        return self._path

    @property
    def handle(self) -> Any:
        """The dispatch handle between prepare and finalize (the backend's own type), else None."""
        return self._handle.handle if self._handle is not None else None

    def prepare(self, a1: torch.Tensor, a1_scale: Optional[torch.Tensor], a2_scale: Optional[torch.Tensor],
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, **fork_kwargs: Any) -> ExpertForwardPayload:
        """Dispatch this rank's tokens to their experts.

        Args:
            a1: bf16 ``[T, H]`` hidden states (the whole attention-TP batch; sliced here).
            a1_scale / a2_scale: must be None (the router quantises itself when ``use_fp8``).
            topk_weights: float32 ``[T, K]`` routing weights.
            topk_ids: int32/int64 ``[T, K]`` global expert ids, -1 for none.

        Checks run in the order: protocol (scales, open dispatch), the validation mode's host checks, capacity,
        ``full``'s value checks (one host sync), then ``basic``'s device-side id clean-up; every error is raised
        before any communication. The payload's ids (``expert_topk_ids``) are the ids actually dispatched.
        """
        if fork_kwargs:
            ignore_fork_kwargs(fork_kwargs)
        if a1_scale is not None or a2_scale is not None:
            raise ValueError("a1_scale and a2_scale must be None: the router quantises a1 itself")
        if self._handle is not None:
            raise RuntimeError(self._still_open(self._handle))
        tokens = self._check_inputs(a1, topk_weights, topk_ids)
        local = self._tp.tokens_per_rank(tokens)
        if self.capacity is not None and local > self.capacity:
            raise ValueError(f"{local} tokens per rank exceed the buffer capacity of {self.capacity} "
                             "(raise the wrapper config's max tokens per rank or RTP_LLM_DEEPEP_MAX_TOKENS_PER_RANK)")
        self._check_values(a1, topk_weights, topk_ids)
        x, weights = self._tp.slice(a1), self._tp.slice(topk_weights)
        ids = self._tp.slice(topk_ids)
        ids = self._clean_ids(ids if ids.dtype is torch.int64 else ids.to(torch.int64))
        if self._metrics is None:  # the only telemetry cost when RTP_LLM_DEEPEP_METRICS is off
            payload, handle = self._prepare(x, ids, weights)
        else:
            payload, handle = self._metrics.prepare(self._prepare, x, ids, weights)
        self._handle = OpenDispatch(handle, payload.expert_x.shape, payload.expert_x.device, ids)
        return payload

    def finalize(self, payload: CombineForwardPayload, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 apply_router_weight_on_input: bool, extra_finalize_args: Optional[FinalizeArgs] = None,
                 skip_allreduce: bool = False, **fork_kwargs: Any) -> torch.Tensor:
        """Return the expert outputs to their tokens: bf16 ``[original_num_tokens, H]``.

        ``payload.fused_expert_output`` must be bf16 with ``expert_x``'s shape (checked on the host before the
        combine, in every validation mode; a mismatch raises ValueError and leaves the dispatch open).
        ``topk_weights`` are the payload's (as rtp-llm's FusedMoe passes them); the combine uses the ids the
        dispatch used, so ``topk_ids`` is accepted for rtp-llm's signature only. ``apply_router_weight_on_input``
        is ignored, as in rtp-llm's DeepEP routers.
        """
        if fork_kwargs:
            ignore_fork_kwargs(fork_kwargs)
        if skip_allreduce:
            raise ValueError("skip_allreduce is not supported by the DeepEP routers")
        state = self._handle
        if state is None:
            raise RuntimeError("finalize() without a matching prepare()")
        y = payload.fused_expert_output
        try:
            check_output(y, state.output_shape, state.output_device)
        except ValueError as exc:
            self._handle = state._replace(rejected=str(exc))
            logger.error("EP rank %d: %s. Ranks that already entered this combine wait for this one until it calls "
                         "finalize() again or their communication deadline passes", self.ep_rank, exc)
            raise
        self._handle = None
        if self._metrics is None:  # the only telemetry cost when RTP_LLM_DEEPEP_METRICS is off
            out = self._finalize(y, state.handle, topk_weights, state.ids)
        else:
            out = self._metrics.finalize(self._finalize, y, state.handle, topk_weights, state.ids)
        original = extra_finalize_args.get("original_num_tokens") if extra_finalize_args else None
        return self._tp.gather(out, original)

    @staticmethod
    def _still_open(state: OpenDispatch) -> str:
        if state.rejected is None:
            return "prepare() called twice without finalize(): the previous dispatch is still open"
        return ("prepare() while the previous dispatch is still open: its finalize() rejected the executor's output "
                f"({state.rejected}); the other EP ranks may be waiting in that combine: call finalize() with a "
                "correct output first")
