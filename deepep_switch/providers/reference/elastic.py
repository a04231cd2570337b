"""``ReferenceElasticBuffer``: DeepEP's ``ElasticBuffer`` dispatch/combine in pure PyTorch.

Semantics of DeepEP 2.1.0 that deepep-switch relies on, reproduced on purpose, including the inconvenient ones:

* non-expand rows: one per (source token, destination rank), grouped by source rank, and **shuffled inside each
  group** unless ``deterministic=True`` (then sorted by ``src_global = s*M + t``, the legacy order);
* ``recv_topk_weights`` is **not** zeroed where ``recv_topk_idx`` is -1;
* ``do_cpu_sync=False`` returns worst-case rows (``R*M``, or the expand formula) whose tail is garbage (NaN
  rows, ids that are not -1); the valid count lives only in ``handle.psum_num_recv_tokens_per_scaleup_rank[-1]``;
* ``do_expand=True``: one row per (token, local expert) slot grouped by expert with ``expert_alignment`` padding,
  ``recv_topk_idx`` None and 1-D weights;
* ``combine`` is an unweighted sum (``topk_weights`` only yields ``combined_topk_weights``, the owner's value).

Like :class:`ReferenceBuffer` it synchronises the host and is not CUDA-graph capturable; every wait for peers is
bounded by ``timeout_s`` (raising :class:`~deepep_switch.deadline.CommunicationTimeout`) and ``destroy()`` is
collective.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ...deadline import Peers, collective_device
from ...settings import DEFAULT_TIMEOUT_S
from .exchange import NoEvent, RowPack, barrier, exchange_counts, exchange_rows, to_local_ids, token_in_rank
from .hints import elastic_buffer_size_hint
from .legacy import _garbage_like

XType = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
_ALIGNMENT = 2 * 1024 * 1024


@dataclass
class _ElasticRoute:
    send_token_idx: torch.Tensor   # [sum(send_counts)] source token per sent row, grouped by destination
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    num_recv: int
    perm: torch.Tensor             # [num_recv] output row of the i-th received row (arrival order)
    slots: Optional[torch.Tensor]  # expand: [num_recv, K] output slot row per (received row, k), -1 if none
    num_rows: int                  # rows of every dispatch output (worst case without CPU sync)
    padding: Optional[torch.Tensor] = None  # expand: [num_rows] bool, alignment padding rows


class ReferenceEPHandle:
    """The ``EPHandle`` fields deepep-switch reads, with DeepEP's meanings (see ``deep_ep.EPHandle``)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class ReferenceElasticBuffer:
    """Pure-PyTorch stand-in for ``deep_ep.ElasticBuffer`` (direct mode: one scale-up domain of R ranks).

    Args mirror ``deep_ep.ElasticBuffer``; ``num_bytes`` defaults to the size hint. Hybrid/Engram/PP/AGRS
    features are not provided. ``deterministic`` selects the legacy row order. ``num_cpu_timeout_secs`` /
    ``num_gpu_timeout_secs`` are accepted and ignored; ``timeout_s`` (not an ``ElasticBuffer`` argument: the
    wrapper's plan passes it to the reference providers only) bounds every wait for peers, in seconds.
    """

    handle_class: type = ReferenceEPHandle
    """The class of the handles ``dispatch`` returns (DeepEP 2.5's keeps ``topk_idx`` by reference)."""

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True, sl_idx: int = 3,
                 num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.group = group
        self.peers = Peers(group, timeout_s)
        self.rank_idx = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        if num_bytes is None:
            num_bytes = elastic_buffer_size_hint(self.num_ranks, num_max_tokens_per_rank, hidden, num_topk,
                                                 use_fp8_dispatch, allow_multiple_reduction)
        if num_bytes % _ALIGNMENT:
            raise ValueError("num_bytes must be 2 MiB aligned")
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.deterministic = deterministic
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.explicitly_destroy = explicitly_destroy
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.runtime: Optional[object] = object()
        self._calls = itertools.count()

    def destroy(self) -> None:
        """Collective, as DeepEP's: waits (bounded) for every rank before releasing the buffer."""
        assert self.explicitly_destroy
        if self.runtime is not None:
            barrier(self.peers, collective_device(self.group), "destroy")
            self.runtime = None

    @staticmethod
    def get_buffer_size_hint(group: dist.ProcessGroup, num_max_tokens_per_rank: int, hidden: int,
                             num_topk: int = 0, use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        return elastic_buffer_size_hint(dist.get_world_size(group), num_max_tokens_per_rank, hidden, num_topk,
                                        use_fp8_dispatch, allow_multiple_reduction)

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int) -> int:
        return 4

    @staticmethod
    def capture() -> NoEvent:
        return NoEvent()

    def _check_alive(self) -> None:
        if self.runtime is None:
            raise RuntimeError("this ReferenceElasticBuffer was destroyed")

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: XType, topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0,
                 previous_event: Any = None, previous_event_before_epilogue: Any = None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                 handle: Optional[ReferenceEPHandle] = None, do_handle_copy: bool = True,
                 do_cpu_sync: Optional[bool] = None, do_expand: bool = False, do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False,
                 ) -> tuple[XType, Optional[torch.Tensor], Optional[torch.Tensor], ReferenceEPHandle, NoEvent]:
        """DeepEP's 5-tuple ``(recv_x, recv_topk_idx, recv_topk_weights, handle, event)``."""
        self._check_alive()
        x_data, sf = x if isinstance(x, tuple) else (x, None)
        if handle is not None:
            assert topk_idx is None, "cached dispatch reuses handle.topk_idx"
            assert do_cpu_sync is None or not do_cpu_sync, "Cannot do CPU sync with cached handle"
            recv, idx, w, h, ev = self._cached_dispatch(x_data, sf, topk_weights, handle, do_zero_padding)
            return self._sf_layout(recv, use_tma_aligned_col_major_sf), idx, w, h, ev
        assert topk_idx is not None and num_experts is not None, "non-cached dispatch needs topk_idx and num_experts"
        m = num_max_tokens_per_rank or self.num_max_tokens_per_rank
        assert x_data.shape[0] <= m, f"{x_data.shape[0]} tokens exceed num_max_tokens_per_rank={m}"
        assert topk_idx.shape[1] <= 32
        align = expert_alignment or 1
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync
        ranks, rank = self.num_ranks, self.rank_idx
        local_experts = num_experts // ranks
        device, topk = x_data.device, topk_idx.shape[1]

        in_rank = token_in_rank(topk_idx, num_experts, ranks)
        dst_rows = [torch.nonzero(in_rank[:, r], as_tuple=True)[0] for r in range(ranks)]
        send_token_idx = torch.cat(dst_rows)
        send_counts = [int(t.numel()) for t in dst_rows]
        recv_counts = exchange_counts(send_counts, self.peers, device, "dispatch")
        num_recv = sum(recv_counts)

        has_w = topk_weights is not None
        pack = RowPack([(torch.int64, (topk,)), (torch.int64, ())] + ([(torch.float32, (topk,))] if has_w else []))
        meta = [topk_idx[send_token_idx].to(torch.int64), send_token_idx.to(torch.int64) + rank * m]
        if has_w:
            meta.append(topk_weights[send_token_idx].float())
        got = pack.unpack(exchange_rows(pack.pack(meta), send_counts, recv_counts, self.peers, "dispatch"))
        recv_gidx, recv_src_global = got[0], got[1]
        recv_w = got[2] if has_w else None

        recv_idx, owned = to_local_ids(recv_gidx, rank, local_experts)
        perm = self._arrival_permutation(recv_counts, recv_src_global, device)
        counts = torch.bincount(recv_idx[owned], minlength=local_experts)
        aligned = [-(-c // align) * align for c in counts.tolist()]
        route = _ElasticRoute(send_token_idx, send_counts, recv_counts, x_data.shape[0], num_recv, perm, None, 0)
        rx, rsf = self._move(x_data, sf, route)
        src_meta = torch.full((num_recv, topk + 2), -1, dtype=torch.int32, device=device)
        src_meta[:, 0] = recv_src_global.to(torch.int32)
        src_meta[:, 1] = 0

        if do_expand:
            out = self._expand(route, rx, rsf, recv_idx, recv_w, counts, align, do_cpu_sync, do_zero_padding,
                               local_experts, m, topk, src_meta)
            recv_x_out, recv_sf_out, recv_idx_out, recv_w_out, psum_expert = out
        else:
            route.num_rows = num_recv if do_cpu_sync else ranks * m
            recv_x_out = self._place(rx, route)
            recv_sf_out = self._place(rsf, route) if rsf is not None else None
            recv_idx_out = self._place(recv_idx, route, garbage=True)
            recv_w_out = self._place(recv_w, route) if recv_w is not None else None
            psum_expert = torch.cumsum(torch.tensor(aligned, device=device), 0).to(torch.int32)
        meta_rows = torch.full((num_recv if do_cpu_sync else ranks * m, topk + 2), -1, dtype=torch.int32, device=device)
        meta_rows[perm] = src_meta

        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += counts.to(torch.int32)
        psum_rank = torch.cumsum(torch.tensor(recv_counts, device=device), 0).to(torch.int32)
        new_handle = self.handle_class(
            do_expand=do_expand, num_experts=num_experts, expert_alignment=align, num_max_tokens_per_rank=m,
            num_sms=num_sms or 4, topk_idx=topk_idx.clone() if do_handle_copy else topk_idx,
            num_recv_tokens=num_recv if do_cpu_sync else ranks * m,
            num_expanded_tokens=route.num_rows if do_expand else 0,
            num_recv_tokens_per_expert_list=aligned if do_cpu_sync else [],
            psum_num_recv_tokens_per_scaleup_rank=psum_rank, psum_num_recv_tokens_per_expert=psum_expert,
            num_unaligned_recv_tokens_per_expert=counts.to(torch.int32), recv_src_metadata=meta_rows,
            dst_buffer_slot_idx=None, token_metadata_at_forward=None, channel_linked_list=None, _route=route)
        recv = (recv_x_out, recv_sf_out) if sf is not None else recv_x_out
        return self._sf_layout(recv, use_tma_aligned_col_major_sf), recv_idx_out, recv_w_out, new_handle, NoEvent()

    @staticmethod
    def _sf_layout(recv: XType, tma_aligned: bool) -> XType:
        """DeepEP's ``use_tma_aligned_col_major_sf``: scales with strides ``(1, align(rows, 4))``."""
        if not tma_aligned or not isinstance(recv, tuple):
            return recv
        x, sf = recv
        rows = sf.shape[0]
        col_major = torch.empty((sf.shape[1], -(-rows // 4) * 4), dtype=sf.dtype, device=sf.device)
        col_major[:, :rows] = sf.t()
        return x, col_major.t()[:rows]

    def _arrival_permutation(self, recv_counts: list[int], src_global: torch.Tensor,
                             device: torch.device) -> torch.Tensor:
        """Output row of each received row: groups by source rank; shuffled inside unless deterministic."""
        if self.deterministic:
            return torch.argsort(torch.argsort(src_global, stable=True))
        gen = torch.Generator().manual_seed(1000003 * (self.rank_idx + 1) + next(self._calls))
        pieces, start = [], 0
        for count in recv_counts:
            pieces.append(start + torch.randperm(count, generator=gen))
            start += count
        # Received row i goes to output row perm[i]; shuffling the group members is enough.
        order = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
        perm = torch.empty_like(order)
        perm[order] = torch.arange(order.numel())
        return perm.to(device)

    def _place(self, rows: torch.Tensor, route: _ElasticRoute, garbage: bool = False) -> torch.Tensor:
        shape = (route.num_rows, *rows.shape[1:])
        if garbage:  # ids past the valid count are NOT -1 on real DeepEP
            out = torch.randint(0, 1 << 20, shape, dtype=rows.dtype, device=rows.device)
        else:
            out = _garbage_like(shape, rows.dtype, rows.device)
        out[route.perm] = rows
        return out

    def _move(self, x: torch.Tensor, sf: Optional[torch.Tensor], route: _ElasticRoute,
              weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        parts = [(x.dtype, (x.shape[1],))]
        rows = [x[route.send_token_idx]]
        for extra in (sf, weights):
            if extra is not None:
                parts.append((extra.dtype, tuple(extra.shape[1:])))
                rows.append(extra[route.send_token_idx])
        pack = RowPack(parts)
        got = pack.unpack(exchange_rows(pack.pack(rows), route.send_counts, route.recv_counts, self.peers,
                                        "dispatch"))
        rx = got.pop(0)
        rsf = got.pop(0) if sf is not None else None
        rw = got.pop(0) if weights is not None else None
        return (rx, rsf) if weights is None else (rx, rsf, rw)

    def _expand(self, route: _ElasticRoute, rx: torch.Tensor, rsf: Optional[torch.Tensor], recv_idx: torch.Tensor,
                recv_w: Optional[torch.Tensor], counts: torch.Tensor, align: int, do_cpu_sync: bool,
                zero_padding: bool, local_experts: int, m: int, topk: int, src_meta: torch.Tensor):
        device = rx.device
        aligned = (counts + align - 1) // align * align
        starts = torch.cumsum(aligned, 0) - aligned
        if do_cpu_sync:
            route.num_rows = int(aligned.sum())
        else:
            worst = self.num_ranks * m * min(topk, local_experts) + (align - 1) * local_experts
            route.num_rows = -(-worst // align) * align
        # Slots of expert l, in output-row order of their tokens (that order is already shuffled or sorted).
        out_order = torch.argsort(route.perm)
        row_of, k_of = torch.nonzero(recv_idx[out_order] >= 0, as_tuple=True)
        row_of = out_order[row_of]
        expert = recv_idx[row_of, k_of]
        by_expert = torch.argsort(expert, stable=True)
        row_of, k_of, expert = row_of[by_expert], k_of[by_expert], expert[by_expert]
        first = torch.cumsum(counts, 0) - counts
        slot = starts[expert] + torch.arange(expert.numel(), device=device) - first[expert]
        slots = torch.full((rx.shape[0], topk), -1, dtype=torch.int64, device=device)
        slots[row_of, k_of] = slot
        route.slots = slots
        src_meta[:, 2:] = slots.to(torch.int32)

        route.padding = self._padding_rows(route.num_rows, slot, int(aligned.sum()), device)
        x_out, sf_out, w_out = self._fill_slots(route, rx, rsf, recv_w, row_of, k_of, slot, zero_padding)
        psum = (starts + counts).to(torch.int32)
        return x_out, sf_out, None, w_out, psum

    @staticmethod
    def _fill_slots(route: _ElasticRoute, rx: torch.Tensor, rsf: Optional[torch.Tensor], rw: Optional[torch.Tensor],
                    row_of: torch.Tensor, k_of: torch.Tensor, slot: torch.Tensor, zero_padding: bool):
        """Expanded outputs: slot ``slot[i]`` gets received row ``row_of[i]`` (and its weight at ``k_of[i]``);
        every other row is garbage, or 0 inside an expert's alignment padding with ``zero_padding``."""
        def scatter(values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if values is None:
                return None
            out = _garbage_like((route.num_rows, *values.shape[1:]), values.dtype, values.device)
            out[slot] = values
            if zero_padding:
                out[route.padding] = 0
            return out

        return (scatter(rx[row_of]), scatter(rsf[row_of] if rsf is not None else None),
                scatter(rw[row_of, k_of] if rw is not None else None))

    @staticmethod
    def _padding_rows(num_rows: int, slot: torch.Tensor, aligned_total: int, device: torch.device) -> torch.Tensor:
        """Alignment padding inside the experts' ranges (not the worst-case tail past them)."""
        pad = torch.ones(num_rows, dtype=torch.bool, device=device)
        pad[slot] = False
        pad[aligned_total:] = False
        return pad

    def _cached_dispatch(self, x: torch.Tensor, sf: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
                         handle: ReferenceEPHandle, zero_padding: bool):
        route: _ElasticRoute = handle._route
        moved = self._move(x, sf, route, topk_weights)
        rx, rsf = moved[0], moved[1]
        rw = moved[2] if topk_weights is not None else None
        if handle.do_expand:
            if topk_weights is not None and not self.allow_multiple_reduction:
                raise RuntimeError("expand combine with topk_weights needs allow_multiple_reduction=True")
            row_of, k_of = torch.nonzero(route.slots >= 0, as_tuple=True)
            slot = route.slots[row_of, k_of]
            x_out, sf_out, w_out = self._fill_slots(route, rx, rsf, rw, row_of, k_of, slot, zero_padding)
            recv = (x_out, sf_out) if sf is not None else x_out
            return recv, None, w_out, handle, NoEvent()
        local = handle.num_experts // self.num_ranks
        gidx = handle.topk_idx[route.send_token_idx]
        pack = RowPack([(torch.int64, (gidx.shape[1],))])
        recv_gidx = pack.unpack(exchange_rows(pack.pack([gidx.to(torch.int64)]), route.send_counts,
                                              route.recv_counts, self.peers, "dispatch"))[0]
        recv_idx, _ = to_local_ids(recv_gidx, self.rank_idx, local)
        recv = (self._place(rx, route), self._place(rsf, route)) if sf is not None else self._place(rx, route)
        w_out = self._place(rw, route) if rw is not None else None
        return recv, self._place(recv_idx, route, garbage=True), w_out, handle, NoEvent()

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle: ReferenceEPHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = None, num_sms: int = 0,
                num_qps: int = 0, previous_event: Any = None, previous_event_before_epilogue: Any = None,
                async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], NoEvent]:
        """Unweighted sum of all copies of each source token: ``(combined_x bf16 [T,H], combined_w, event)``."""
        self._check_alive()
        route: _ElasticRoute = handle._route
        topk = handle.topk_idx.shape[1]
        hidden = x.shape[1]
        if handle.do_expand:
            if topk_weights is not None and not self.allow_multiple_reduction:
                raise RuntimeError("expand combine with topk_weights needs allow_multiple_reduction=True")
            slots = route.slots
            safe = slots.clamp(min=0)
            mask = (slots >= 0).unsqueeze(-1)
            per_token = torch.where(mask, x[safe].float(), torch.zeros((), device=x.device)).sum(dim=1)
            if topk_weights is not None:
                w_rows = torch.where(slots >= 0, topk_weights.float()[safe], torch.zeros((), device=x.device))
        else:
            per_token = x[route.perm].float()
            if topk_weights is not None:
                w_rows = topk_weights[route.perm].float()
        # With multiple reduction each rank's partial sum is rounded to bf16 before it travels; without it the
        # copies reach the source unrounded and are reduced (and rounded) once.
        partial = torch.bfloat16 if self.allow_multiple_reduction else torch.float32
        parts: list[tuple[torch.dtype, tuple[int, ...]]] = [(partial, (hidden,))]
        tensors = [per_token.to(partial)]
        if topk_weights is not None:
            parts.append((torch.float32, (topk,)))
            tensors.append(w_rows)
        pack = RowPack(parts)
        back = pack.unpack(exchange_rows(pack.pack(tensors), route.recv_counts, route.send_counts, self.peers,
                                         "combine"))
        out = torch.zeros((route.num_tokens, hidden), dtype=torch.float32, device=x.device)
        combined_w = (torch.zeros((route.num_tokens, topk), dtype=torch.float32, device=x.device)
                      if topk_weights is not None else None)
        local = handle.num_experts // self.num_ranks
        start = 0
        for src_rank, count in enumerate(route.send_counts):  # ascending rank
            idx = route.send_token_idx[start:start + count]
            out.index_add_(0, idx, back[0][start:start + count].float())
            if combined_w is not None:
                own = (handle.topk_idx[idx] >= 0) & (handle.topk_idx[idx] // local == src_rank)
                combined_w[idx] += torch.where(own, back[1][start:start + count], torch.zeros((), device=x.device))
            start += count
        bias_0, bias_1 = bias if isinstance(bias, tuple) else (bias, None)
        for b in (bias_0, bias_1):
            if b is not None:
                out += b.float()
        return out.to(torch.bfloat16), combined_w, NoEvent()
