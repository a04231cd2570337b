"""The elastic (and ep) low-latency path: ``ElasticBuffer`` without host sync, delivering and taking back the
legacy low-latency layout ``[E_local, R*N, H]``, in one of two layouts (``RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT``):

* ``token`` (default): quantise (DeepEP's FP8 recipe; V2 never quantises) -> ``dispatch(do_expand=False,
  do_cpu_sync=False)`` (one row per (token, rank)) -> one kernel expands the rows (and FP8 scales) into the 3-D
  layout (:mod:`~deepep_switch.kernels.token_layout`); finalize: one kernel folds each received token's expert
  outputs into one row, weighted by the top-k weights in fp32 -> ``combine`` (non-expand: it moves and sums one row
  per (token, rank)). The weighting rides on a pass the layout needs anyway.
* ``expand``: quantise -> ``dispatch(do_expand=True, do_cpu_sync=False)`` -> pack the expanded rows into the 3-D
  layout (:mod:`~deepep_switch.kernels.layout`); finalize: unpack multiplying each row by the weight that travelled
  with it -> ``combine`` (which sums every expert copy and never weights).

Both read the valid row counts on the device only, so prepare -> executor -> finalize is graph-capturable, and the
fp32 sums run in a fixed order (a replay reproduces an eager call bit for bit). ``num_gpu_timeout_secs`` bounds the
kernels, graph replays included; nothing blocks the host, so nothing is guarded.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from ..kernels.layout import LayoutOps, layout_ops_for
from ..kernels.token_layout import TokenLayoutOps, token_ops_for
from ..quant import Quantizer
from ..settings import ElasticLowLatencyLayout
from .contracts import Capabilities, LowLatencyDispatch, PathContext, WeightsAppliedBy


def check_hidden(ctx: PathContext, buffer_name: str = "ElasticBuffer") -> None:
    """Real ElasticBuffer's (and EPBuffer's) combine kernel static-asserts hidden % 256; say so when the router is
    built."""
    if ctx.real_deep_ep and ctx.hidden % 256:
        raise ValueError(f"{buffer_name} combine needs hidden % 256 == 0 (a JIT static assert), got {ctx.hidden}")


# ---------------------------------------------------------------------------------------------- handles
class _LegacyView:
    """rtp-llm's view of a legacy low-latency handle ``(src_info, layout_range, N, H, E)`` by index; ``[0]`` and
    ``[1]`` are computed on first read (a host sync; nobody pays otherwise) from :meth:`_slot_sources`."""

    __slots__ = ("native", "_shape", "_views")

    def __init__(self, native: Any, shape: tuple[int, int, int, int]) -> None:
        self.native = native
        self._shape = shape  # (ranks, N, hidden, num_experts)
        self._views: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def __getitem__(self, index: int) -> Any:
        ranks, capacity, hidden, experts = self._shape
        if index in (0, 1):
            if self._views is None:
                self._views = self._legacy_views()
            return self._views[index]
        return (capacity, hidden, experts)[index - 2]

    def _slot_sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src int64 [E_local, R*N], inside bool [E_local, R*N])``: each valid slot's ``s*M + t`` (its source
        rank and token), and which slots are valid."""
        raise NotImplementedError

    def _legacy_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``src_info`` int32 ``[E_local, R*N]`` (the token's index in its source rank, -1 past the count) and
        ``layout_range`` int64 ``[E_local, R]`` (``begin << 32 | count`` of each source rank's slots).

        ``layout_range`` needs each expert's rows grouped by source rank: always so in the token layout; in the
        expand layout V2 gives it only with ``deterministic=True``, and otherwise this raises rather than describe
        rows wrongly.
        """
        ranks = self._shape[0]
        src, inside = self._slot_sources()
        m = int(self.native.num_max_tokens_per_rank)
        src_info = torch.where(inside, src % m, torch.full_like(src, -1)).to(torch.int32)
        src_rank = torch.where(inside, src // m, torch.full_like(src, ranks))
        width = src.shape[1]
        grouped = bool(((src_rank[:, 1:] >= src_rank[:, :-1]) | ~inside[:, 1:]).all()) if width > 1 else True
        if not grouped:
            raise RuntimeError(
                "handle[1] (layout_range) has no meaning on this ElasticBuffer: inside an expert V2 interleaves source "
                "ranks unless built with deterministic=True (set RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC=1, or use "
                "RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT=token); handle[0] (src_info) is exact either way")
        count = torch.zeros((src.shape[0], ranks + 1), dtype=torch.int64, device=src.device)
        count.scatter_add_(1, src_rank, torch.ones_like(src_rank))
        count = count[:, :ranks]
        begin = torch.cumsum(count, dim=1) - count
        return src_info, (begin << 32) | count


class ElasticLowLatencyHandle(_LegacyView):
    """The expand layout's dispatch state (and the legacy handle view).

    Attributes:
        native: DeepEP's ``EPHandle``.
        weights: float32 ``[rows]``: the routing weight of each expanded row.
        end / counts: int32 ``[E_local]``: one past the last row of each expert, and its row count.
        num_rows: expanded rows allocated.
    """

    __slots__ = ("weights", "end", "counts", "num_rows")

    def __init__(self, native: Any, weights: torch.Tensor, end: torch.Tensor, counts: torch.Tensor, num_rows: int,
                 shape: tuple[int, int, int, int]) -> None:
        super().__init__(native, shape)
        self.weights, self.end, self.counts, self.num_rows = weights, end, counts, num_rows

    def _slot_sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        ranks, capacity, _, _ = self._shape
        meta = self.native.recv_src_metadata
        valid_rows = int(self.native.psum_num_recv_tokens_per_scaleup_rank[-1])
        meta = meta[:valid_rows].to(torch.int64)
        slots = meta[:, 2:]
        taken = slots >= 0
        slot_src = torch.full((self.num_rows,), -1, dtype=torch.int64, device=meta.device)
        slot_src[slots[taken]] = meta[:, :1].expand_as(slots)[taken]
        offsets = torch.arange(ranks * capacity, device=meta.device)
        start = (self.end.to(torch.int64) - self.counts.to(torch.int64)).unsqueeze(1)
        inside = offsets.unsqueeze(0) < self.counts.to(torch.int64).unsqueeze(1)
        src = torch.where(inside, slot_src[(start + offsets).clamp(0, max(self.num_rows - 1, 0))],
                          torch.full((), -1, dtype=torch.int64, device=meta.device))
        return src, inside


class ElasticTokenHandle(_LegacyView):
    """The token layout's dispatch state (and the legacy handle view).

    Attributes:
        native: DeepEP's ``EPHandle`` (non-expand).
        weights: float32 ``[R*M, K]``: the routing weights received with the rows.
        dest: int32 ``[R*M, K]``: the flat ``expert_x`` slot of each (row, k), -1 where none.
        valid: int32 ``[1]`` on the device: how many received rows are initialised.
    """

    __slots__ = ("weights", "dest", "valid")

    def __init__(self, native: Any, weights: torch.Tensor, dest: torch.Tensor, valid: torch.Tensor,
                 shape: tuple[int, int, int, int]) -> None:
        super().__init__(native, shape)
        self.weights, self.dest, self.valid = weights, dest, valid

    def _slot_sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        ranks, capacity, _, experts = self._shape
        local = experts // ranks
        width = ranks * capacity
        valid_rows = int(self.valid)
        dest = self.dest[:valid_rows].to(torch.int64)
        meta = self.native.recv_src_metadata[:valid_rows, :1].to(torch.int64).expand_as(dest)
        taken = dest >= 0
        src = torch.full((local * width,), -1, dtype=torch.int64, device=dest.device)
        src[dest[taken]] = meta[taken]
        src = src.view(local, width)
        return src, src >= 0


# ---------------------------------------------------------------------------------------------- the path
class ElasticLowLatencyPath:
    """``ElasticBuffer`` without host sync, converted to and from the legacy low-latency layout (token or expand,
    see the module docstring). ``dispatch``/``combine`` forward to the layout's pair, bound at construction."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        host_sync=False, graph_capturable=True, weights=WeightsAppliedBy.PATH)
    buffer_name: ClassVar[str] = "ElasticBuffer"

    def __init__(self, buffer: Any, num_experts: int, capacity: int, ranks: int, quantize: Quantizer,
                 num_sms: int, ops: Optional[LayoutOps] = None, hidden: int = 0,
                 layout: ElasticLowLatencyLayout = ElasticLowLatencyLayout.TOKEN,
                 token_ops: Optional[TokenLayoutOps] = None) -> None:
        self.buffer, self.num_experts, self.capacity, self.ranks = buffer, num_experts, capacity, ranks
        self.quantize, self.num_sms = quantize, num_sms
        self.num_local_experts = num_experts // ranks
        self.slots = ranks * capacity
        self.layout = ElasticLowLatencyLayout(layout)
        self._shape = (ranks, capacity, hidden, num_experts)
        if self.layout is ElasticLowLatencyLayout.TOKEN:
            self.ops = token_ops or token_ops_for(torch.device("cpu"))
            self._dispatch, self._combine = self._dispatch_token, self._combine_token
        else:
            self.ops = ops or layout_ops_for(torch.device("cpu"))
            self._dispatch, self._combine = self._dispatch_expand, self._combine_expand

    @classmethod
    def build(cls, ctx: PathContext) -> "ElasticLowLatencyPath":
        assert ctx.capacity is not None, "low-latency buffers always have a capacity"
        check_hidden(ctx, cls.buffer_name)
        layout = ctx.settings.elastic_ll_layout if ctx.settings is not None else ElasticLowLatencyLayout.TOKEN
        layout = ElasticLowLatencyLayout(layout)
        if layout is ElasticLowLatencyLayout.TOKEN:
            return cls(ctx.buffer, ctx.num_experts, ctx.capacity, ctx.num_ranks, ctx.quantize, ctx.num_sms,
                       hidden=ctx.hidden, layout=layout, token_ops=token_ops_for(ctx.device))
        return cls(ctx.buffer, ctx.num_experts, ctx.capacity, ctx.num_ranks, ctx.quantize, ctx.num_sms,
                   layout_ops_for(ctx.device), ctx.hidden, layout)

    @property
    def layout_ops(self) -> str:
        """Which conversion kernels run: "triton" or "torch"."""
        return self.ops.name

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> LowLatencyDispatch:
        """bf16 ``x [T, H]``, int64 ``ids [T, K]``, float32 ``weights [T, K]`` -> the legacy 3-D payload."""
        return self._dispatch(x, ids, weights)

    def combine(self, y: torch.Tensor, state: Any, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """bf16 ``y [E_local, R*N, H]`` -> the top-k weighted sum per token, bf16 ``[T, H]`` (the weights that
        travelled with the dispatch are applied; ``weights``/``ids`` are the router's, unused here)."""
        return self._combine(y, state)

    # ------------------------------------------------------------------ token layout
    def _send(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expand: bool) -> tuple[Any, ...]:
        """Quantise and dispatch without host sync: ``(rows_x, rows_sf or None, recv_ids, recv_w, handle)``."""
        recv, recv_ids, recv_w, handle, _ = self.buffer.dispatch(
            self.quantize(x), topk_idx=ids, topk_weights=weights, num_experts=self.num_experts,
            num_max_tokens_per_rank=self.capacity, expert_alignment=1, num_sms=self.num_sms,
            do_cpu_sync=False, do_expand=expand)
        rows_x, rows_sf = recv if isinstance(recv, tuple) else (recv, None)
        return rows_x, rows_sf, recv_ids, recv_w, handle

    def _dispatch_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> LowLatencyDispatch:
        rows_x, rows_sf, recv_ids, recv_w, handle = self._send(x, ids, weights, expand=False)
        valid = handle.psum_num_recv_tokens_per_scaleup_rank[-1:]  # on the device: no host sync
        expert_x, scales, dest, counts = self.ops.pack(rows_x, rows_sf, recv_ids, valid, self.num_local_experts,
                                                       self.slots)
        return LowLatencyDispatch(expert_x, scales, counts, ElasticTokenHandle(handle, recv_w, dest, valid,
                                                                               self._shape))

    def _combine_token(self, y: torch.Tensor, state: ElasticTokenHandle) -> torch.Tensor:
        rows = self.ops.fold(y, state.dest, state.weights, state.valid)
        out, _, _ = self.buffer.combine(rows, state.native, num_sms=state.native.num_sms)
        return out

    # ------------------------------------------------------------------ expand layout
    def _dispatch_expand(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> LowLatencyDispatch:
        rows_x, rows_sf, _, recv_w, handle = self._send(x, ids, weights, expand=True)
        counts = handle.num_unaligned_recv_tokens_per_expert
        end = handle.psum_num_recv_tokens_per_expert  # expand mode: psum[e] = start[e] + count[e]
        expert_x = self.ops.pack(rows_x, end, counts, self.slots)
        scales = None
        if rows_sf is not None:
            # DeepEP's legacy layout: [E_local, R*N, H/128] with the token dimension contiguous.
            scales = torch.empty((self.num_local_experts, rows_sf.shape[1], self.slots), dtype=rows_sf.dtype,
                                 device=rows_sf.device).transpose(1, 2)
            self.ops.pack(rows_sf, end, counts, self.slots, out=scales)
        state = ElasticLowLatencyHandle(handle, recv_w, end, counts, rows_x.shape[0], self._shape)
        return LowLatencyDispatch(expert_x, scales, counts, state)

    def _combine_expand(self, y: torch.Tensor, state: ElasticLowLatencyHandle) -> torch.Tensor:
        rows = self.ops.unpack(y, state.weights, state.end, state.counts, state.num_rows)
        out, _, _ = self.buffer.combine(rows, state.native, num_sms=state.native.num_sms)
        return out
