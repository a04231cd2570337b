"""The low-latency (decode, CUDA-graph) router and its two backend paths.

Both paths hand the executor DeepEP's legacy low-latency payload: ``expert_x [E_local, R*N, H]`` (bf16, or fp8
with float32 scales ``[E_local, R*N, H/128]`` whose token dimension is contiguous), ``expert_num_tokens`` int32
``[E_local]`` on the device, ``expected_m``; and both take the executor's output in that layout and return the
top-k weighted sum ``[T, H]`` bf16. Neither synchronises the host, so prepare -> executor -> finalize can be
captured in one CUDA graph.

* :class:`LegacyLowLatencyPath`: ``low_latency_dispatch`` / ``low_latency_combine`` (the kernel quantises FP8
  and the combine applies the weights).
* :class:`ElasticLowLatencyPath`: quantise (same recipe) -> ``ElasticBuffer.dispatch(do_expand=True,
  do_cpu_sync=False)`` -> Triton pack into the 3-D layout; finalize: Triton unpack multiplying each row by the
  weight that travelled with it -> ``combine`` (which sums but never weights).

Inside expert ``e``, the order of its valid rows is unspecified on both backends.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from deepep_switch.backend import Backend
from deepep_switch.config import DeepEPMode

from .base import RouterBase, check_elastic_hidden
from .kernels.masked_layout import LayoutOps, layout_ops_for
from .payloads import ExpertForwardPayload, ExpertTokensMetadata

# DeepEP 2.1.0 legacy low-latency kernels are compiled for these hidden sizes (the sgl-deep-ep wheel adds 3584).
LEGACY_LL_HIDDEN = frozenset({2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192})
LEGACY_LL_MAX_TOPK = 11
LEGACY_LL_MAX_TOKENS = 511  # NVSHMEM_QP_DEPTH (1024) >= 2 * (N + 1)


class Dispatched(NamedTuple):
    expert_x: torch.Tensor
    scales: Optional[torch.Tensor]
    counts: torch.Tensor
    handle: Any


class LegacyLowLatencyPath:
    """``deep_ep.Buffer`` low-latency kernels (IBGDA/NVLink, all SMs, graph-safe)."""

    def __init__(self, buffer: Any, num_experts: int, capacity: int, use_fp8: bool, round_scale: bool) -> None:
        self.buffer, self.num_experts, self.capacity = buffer, num_experts, capacity
        self.use_fp8, self.round_scale = use_fp8, round_scale

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        recv, counts, handle, _, _ = self.buffer.low_latency_dispatch(
            x, ids, self.capacity, self.num_experts, use_fp8=self.use_fp8, round_scale=self.round_scale,
            async_finish=False, return_recv_hook=False)
        expert_x, scales = recv if self.use_fp8 else (recv, None)
        return Dispatched(expert_x, scales, counts, handle)

    def combine(self, y: torch.Tensor, handle: Any, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out, _, _ = self.buffer.low_latency_combine(y, ids, weights, handle, zero_copy=False, async_finish=False,
                                                    return_recv_hook=False)
        return out

    @staticmethod
    def check_limits(hidden: int, topk: int, capacity: int, ranks: int, use_fp8: bool) -> None:
        problems = []
        if hidden not in LEGACY_LL_HIDDEN:
            problems.append(f"hidden {hidden} not in {sorted(LEGACY_LL_HIDDEN)}")
        if use_fp8 and hidden % 512:
            problems.append("FP8 needs hidden % 512 == 0")
        if topk > LEGACY_LL_MAX_TOPK:
            problems.append(f"topk {topk} > {LEGACY_LL_MAX_TOPK}")
        if capacity > LEGACY_LL_MAX_TOKENS or (ranks * capacity) % 4:
            problems.append(f"tokens per rank {capacity} must be <= {LEGACY_LL_MAX_TOKENS} with R*N % 4 == 0")
        if problems:
            raise ValueError("legacy low-latency DeepEP cannot serve this layer: " + "; ".join(problems))


class _ElasticState(NamedTuple):
    handle: Any
    weights: torch.Tensor   # [rows] float32: the weight of each expanded row
    end: torch.Tensor       # [E_local] int32: one past the last row of each expert
    counts: torch.Tensor    # [E_local] int32
    num_rows: int


class ElasticLowLatencyPath:
    """``deep_ep.ElasticBuffer`` without host sync, converted to and from the legacy low-latency layout."""

    def __init__(self, buffer: Any, num_experts: int, capacity: int, ranks: int, use_fp8: bool,
                 quantize: Callable[[torch.Tensor], Any], num_sms: int, ops: LayoutOps) -> None:
        self.buffer, self.num_experts, self.capacity, self.ranks = buffer, num_experts, capacity, ranks
        self.use_fp8, self.quantize, self.num_sms, self.ops = use_fp8, quantize, num_sms, ops
        self.num_local_experts = num_experts // ranks

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        payload = self.quantize(x)  # DeepEP V2 moves FP8 bytes but never quantises: same recipe as legacy LL
        recv, _, recv_w, handle, _ = self.buffer.dispatch(
            payload, topk_idx=ids, topk_weights=weights, num_experts=self.num_experts,
            num_max_tokens_per_rank=self.capacity, expert_alignment=1, num_sms=self.num_sms,
            do_cpu_sync=False, do_expand=True)
        rows_x, rows_sf = recv if self.use_fp8 else (recv, None)
        counts = handle.num_unaligned_recv_tokens_per_expert
        end = handle.psum_num_recv_tokens_per_expert  # expand mode: psum[e] = start[e] + count[e]
        slots = self.ranks * self.capacity
        expert_x = self.ops.pack(rows_x, end, counts, slots)
        scales = None
        if rows_sf is not None:
            # DeepEP's legacy layout: [E_local, R*N, H/128] with the token dimension contiguous.
            scales = torch.empty((self.num_local_experts, rows_sf.shape[1], slots), dtype=rows_sf.dtype,
                                 device=rows_sf.device).transpose(1, 2)
            self.ops.pack(rows_sf, end, counts, slots, out=scales)
        return Dispatched(expert_x, scales, counts, _ElasticState(handle, recv_w, end, counts, rows_x.shape[0]))

    def combine(self, y: torch.Tensor, state: _ElasticState, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = self.ops.unpack(y, state.weights, state.end, state.counts, state.num_rows)
        out, _, _ = self.buffer.combine(rows, state.handle, num_sms=state.handle.num_sms)
        return out


class LowLatencyRouter(RouterBase):
    """prepare/finalize for decode batches; the same 3-D payload on both backends.

    Args:
        wrapper: a :class:`DeepEPWrapper` built in LOW_LATENCY mode (its ``ll_num_max_token_per_rank`` is N).
        options: see :class:`RouterOptions` (``use_fp8``, ``round_scale``, TP).
        **fork_kwargs: rtp-llm's ACCL-only ``opt_level`` / ``pertoken_quant``, accepted and ignored.

    The elastic path weights each row with the routing weight sent at ``prepare``; rtp-llm passes the same
    weights to ``finalize``, which the legacy path uses.
    """

    mode = DeepEPMode.LOW_LATENCY

    def _bind(self, backend: Backend, real_deep_ep: bool) -> Any:
        capacity = self.wrapper.ll_num_max_token_per_rank
        opts = self.options
        if backend is Backend.ELASTIC:
            if real_deep_ep:
                check_elastic_hidden(self.hidden_size)
            return ElasticLowLatencyPath(self.wrapper.buffer, self.num_experts, capacity, self.ep_size, opts.use_fp8,
                                         self._quantize, self.wrapper.decision.settings.num_sms,
                                         layout_ops_for(self.device))
        if real_deep_ep:
            LegacyLowLatencyPath.check_limits(self.hidden_size, self.num_topk, capacity, self.ep_size, opts.use_fp8)
        return LegacyLowLatencyPath(self.wrapper.buffer, self.num_experts, capacity, opts.use_fp8, opts.round_scale)

    @property
    def layout_ops(self) -> Optional[str]:
        """Which conversion the elastic path uses ("triton"/"torch"); None on legacy."""
        return getattr(getattr(self._path, "ops", None), "name", None)

    def _prepare(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[ExpertForwardPayload, Any]:
        out = self._path.dispatch(x, ids, weights)
        expected_m = max(1, x.shape[0] * self.ep_size * self.num_topk // self.num_experts)
        payload = ExpertForwardPayload(
            expert_x=out.expert_x, expert_x_origin_dtype=x.dtype, expert_x_scale=out.scales,
            expert_tokens_meta=ExpertTokensMetadata(expected_m=expected_m, expert_num_tokens=out.counts),
            expert_topk_ids=ids, expert_topk_weights=weights, expert_ids_are_local=False)
        return payload, out.handle

    def _finalize(self, y: torch.Tensor, handle: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self._path.combine(y, handle, topk_weights, topk_ids.to(torch.int64))
