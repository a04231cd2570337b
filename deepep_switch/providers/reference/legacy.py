"""``ReferenceBuffer``: DeepEP's legacy ``Buffer`` API in pure PyTorch over torch.distributed.

Same constructor, statics, return tuples and semantics as ``deep_ep.Buffer`` 2.1.0 for what deepep-switch uses:

* normal mode: ``get_dispatch_layout`` / ``dispatch`` / ``combine``. One received row per (source token,
  destination rank), grouped by source rank, ascending token inside a group. Received ids are local with -1 for
  experts on other ranks, weights are zeroed there, per-expert counts are aligned and returned as a list. Without
  ``topk_idx`` only rows move (ids and weights are None) and the counts come from the senders'
  ``num_tokens_per_expert``.
  ``combine`` is an unweighted fp32 sum, ascending rank, rounded once to bf16.
* low-latency mode: ``low_latency_dispatch`` / ``low_latency_combine``. One message per (token, expert); the
  layout is ``[E_local, R*N, H]`` with ``recv_count``; FP8 uses DeepEP's per-128-channel recipe with scales
  ``[E_local, R*N, H/128]`` (token dim contiguous), or with ``use_ue8m0`` the exponent bytes packed four to an
  int32 ``[E_local, R*N, H/512]`` (token dim contiguous); ``low_latency_combine`` is the weighted sum, and with
  ``zero_copy`` it reads the tensor ``get_next_low_latency_combine_buffer`` handed out instead of ``x``.
* intranode normal buffers given NVL bytes check, as DeepEP's ``EP_HOST_ASSERT`` does, that the ``Config`` a
  ``dispatch`` / ``combine`` runs with fits them (a zero-byte reference buffer is unbounded).

It synchronises the host (it asks peers for counts), so unlike DeepEP it is not CUDA-graph capturable. Every wait
for peers is bounded by ``timeout_s`` (raising :class:`~deepep_switch.deadline.CommunicationTimeout`), and
``destroy()`` is collective, as DeepEP's is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from ...quant.fp8 import quantize_fp8
from ...deadline import Peers, collective_device
from ...settings import DEFAULT_TIMEOUT_S
from .exchange import (NoEvent, RowPack, all_gather_counts, barrier, exchange_counts, exchange_rows, no_hook,
                       to_local_ids, token_in_rank)
from .hints import ReferenceConfig, low_latency_rdma_size_hint

XType = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

_DISPATCH_CONFIGS = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_CONFIGS = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


@dataclass
class _NormalRoute:
    """What the reference needs to run combine (and cached dispatch) for one normal dispatch."""

    send_token_idx: torch.Tensor   # [sum(send_counts)] source token of each sent row, grouped by dst rank
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    num_recv: int


class _LowLatencyHandle(tuple):
    """DeepEP's 5-tuple LL handle ``(src_info, layout_range, N, H, E)``, plus the reference's private route."""

    route: Any


def _garbage_like(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised-looking rows: NaN for floating types, so reading them poisons the result visibly."""
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(dtype)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -7, dtype=dtype, device=device)


class ReferenceBuffer:
    """Pure-PyTorch stand-in for ``deep_ep.Buffer``.

    Args:
        group: the EP process group (gloo on CPU, NCCL on GPU).
        num_nvl_bytes / num_rdma_bytes: recorded only (no memory is reserved); sizes follow DeepEP's hints.
        low_latency_mode: enable ``low_latency_dispatch``/``low_latency_combine``.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric, enable_shrink, comm:
            accepted for signature compatibility and ignored.
        explicitly_destroy: require an explicit ``destroy()``, as DeepEP does.
        timeout_s: the deadline, in seconds, on each wait for peers (not a ``deep_ep.Buffer`` argument: the
            wrapper's plan passes it to the reference providers only).
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: Optional[bool] = None, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if group is None:
            raise ValueError("ReferenceBuffer needs a torch.distributed process group")
        if num_nvl_bytes % 128 or num_rdma_bytes % 128:
            raise ValueError("buffer byte counts must be multiples of 128")
        self.group = group
        self.peers = Peers(group, timeout_s)
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.runtime: Optional[object] = object()
        # get_next_low_latency_combine_buffer's tensors, by (num_max_dispatch_tokens_per_rank, hidden, num_experts).
        self._ll_combine_buffers: dict[tuple[int, int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ lifecycle and statics
    def destroy(self) -> None:
        """Collective, as DeepEP's: waits (bounded) for every rank before releasing the buffer."""
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self._check_alive()
        barrier(self.peers, collective_device(self.group), "destroy")
        self.runtime = None

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        ReferenceBuffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> NoEvent:
        return NoEvent()

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> ReferenceConfig:
        assert num_ranks in _DISPATCH_CONFIGS, f"Unsupported number of EP ranks: {num_ranks}"
        return ReferenceConfig(ReferenceBuffer.num_sms, *_DISPATCH_CONFIGS[num_ranks])

    @staticmethod
    def get_combine_config(num_ranks: int) -> ReferenceConfig:
        assert num_ranks in _COMBINE_CONFIGS, f"Unsupported number of EP ranks: {num_ranks}"
        return ReferenceConfig(ReferenceBuffer.num_sms, *_COMBINE_CONFIGS[num_ranks])

    def _check_alive(self) -> None:
        if self.runtime is None:
            raise RuntimeError("this ReferenceBuffer was destroyed")

    def _check_nvl_bytes(self, what: str, config: Any, default: Callable[[int], Any], per_token_bytes: int) -> None:
        """DeepEP's intranode ``EP_HOST_ASSERT(... <= num_nvl_bytes)`` (``csrc/legacy/buffer.hpp``): every channel
        (``config.num_sms / 2``) keeps a ring of ``num_max_nvl_chunked_recv_tokens`` rows per peer in the NVL
        buffer. Checked only on intranode buffers given NVL bytes; ``config`` None means DeepEP's default."""
        if self.num_nvl_bytes <= 0 or self.num_rdma_bytes > 0:
            return
        config = default(self.group_size) if config is None else config
        channels, ranks = config.num_sms // 2, self.group_size
        need = channels * ranks * 4 * 2 + channels * ranks * config.num_max_nvl_chunked_recv_tokens * per_token_bytes
        if what == "dispatch":
            need += ranks * ranks * 4 + channels * ranks * 4 * 2  # prefix matrix, channel start/end offsets
        if need > self.num_nvl_bytes:
            raise AssertionError(
                f"{what} with Config(num_sms={config.num_sms}, nvl_recv={config.num_max_nvl_chunked_recv_tokens}) "
                f"needs {need} NVL bytes but the buffer has num_nvl_bytes={self.num_nvl_bytes} (DeepEP: "
                f"EP_HOST_ASSERT(... <= num_nvl_bytes) in csrc/legacy/buffer.hpp)")

    # ------------------------------------------------------------------ normal mode
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Any = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False,
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, NoEvent]:
        """Returns ``(num_tokens_per_rank [R] i32, None, num_tokens_per_expert [E] i32, is_token_in_rank [T,R] bool, event)``."""
        self._check_alive()
        is_token_in_rank = token_in_rank(topk_idx, num_experts, self.group_size)
        per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).to(torch.int32)
        return per_rank, None, per_expert, is_token_in_rank, NoEvent()

    def dispatch(self, x: XType, handle: Optional[tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Any = None,
                 previous_event: Any = None, async_finish: bool = False, allocate_on_comm_stream: bool = False,
                 ) -> tuple[XType, Optional[torch.Tensor], Optional[torch.Tensor], Optional[list[int]], Optional[tuple], NoEvent]:
        """DeepEP's 6-tuple ``(recv_x, recv_topk_idx, recv_topk_weights, counts_list, handle, event)``."""
        self._check_alive()
        x_data, x_scales = x if isinstance(x, tuple) else (x, None)
        num_topk = int(topk_idx.shape[1]) if topk_idx is not None else 0
        num_scales = 0 if x_scales is None else (1 if x_scales.dim() == 1 else int(x_scales.shape[1]))
        # Per ring row: data, source index, top-k ids (int64) and weights, FP8 scales.
        self._check_nvl_bytes("dispatch", config, self.get_dispatch_config,
                              x_data.shape[1] * x_data.element_size() + 4 + num_topk * (8 + 4) + num_scales * 4)
        if handle is not None:
            assert topk_idx is None and topk_weights is None, "cached dispatch reuses the handle's routing"
            route: _NormalRoute = handle[5]
            recv_x, recv_scales = self._move_rows(x_data, x_scales, route, "dispatch")
            recv = (recv_x, recv_scales) if x_scales is not None else recv_x
            return recv, None, None, None, None, NoEvent()

        assert is_token_in_rank is not None and num_tokens_per_expert is not None, \
            "non-cached dispatch needs is_token_in_rank and num_tokens_per_expert"
        assert (topk_idx is None) == (topk_weights is None), "topk_idx and topk_weights come together"
        ranks, rank = self.group_size, self.rank
        num_experts = int(num_tokens_per_expert.numel()) if num_tokens_per_expert is not None else None
        assert num_experts is not None and num_experts % ranks == 0
        local_experts = num_experts // ranks
        device = x_data.device

        # Rows for destination r: the tokens with an expert on r, ascending token index.
        dst_rows = [torch.nonzero(is_token_in_rank[:, r], as_tuple=True)[0] for r in range(ranks)]
        send_token_idx = torch.cat(dst_rows)
        send_counts = [int(t.numel()) for t in dst_rows]
        recv_counts = exchange_counts(send_counts, self.peers, device, "dispatch")
        num_recv = sum(recv_counts)
        route = _NormalRoute(send_token_idx, send_counts, recv_counts, x_data.shape[0], num_recv)

        recv_x, recv_scales = self._move_rows(x_data, x_scales, route, "dispatch")
        recv_idx: Optional[torch.Tensor] = None
        recv_w: Optional[torch.Tensor] = None
        if topk_idx is None:
            # Rows only; as DeepEP's notify step, the per-expert counts are the senders' num_tokens_per_expert.
            pack = RowPack([(torch.int64, ())])
            (recv_src,) = pack.unpack(exchange_rows(pack.pack([send_token_idx.to(torch.int64)]), send_counts,
                                                    recv_counts, self.peers, "dispatch"))
            per_expert = all_gather_counts([int(v) for v in num_tokens_per_expert.tolist()], self.peers, device,
                                           "dispatch")
            counts = per_expert.sum(dim=0)[rank * local_experts:(rank + 1) * local_experts]
        else:
            topk = topk_idx.shape[1]
            pack = RowPack([(torch.int64, (topk,)), (torch.float32, (topk,)), (torch.int64, ())])
            sent = pack.pack([topk_idx[send_token_idx].to(torch.int64), topk_weights[send_token_idx].float(),
                              send_token_idx.to(torch.int64)])
            recv_idx, recv_w, recv_src = pack.unpack(exchange_rows(sent, send_counts, recv_counts, self.peers,
                                                                   "dispatch"))
            recv_idx, owned = to_local_ids(recv_idx, rank, local_experts)
            recv_w = torch.where(owned, recv_w, torch.zeros_like(recv_w))
            counts = torch.bincount(recv_idx[owned], minlength=local_experts)
        align = max(1, expert_alignment)
        counts_list = [int(-(-c // align) * align) for c in counts.tolist()]

        gathered = all_gather_counts(recv_counts, self.peers, device, "dispatch")  # [r, s] = rows r receives from s
        rank_prefix_matrix = gathered.t().cumsum(dim=0).to(torch.int32)
        handle = (rank_prefix_matrix, None, None, recv_src.to(torch.int32), is_token_in_rank, route)

        if num_worst_tokens > 0:
            assert num_worst_tokens >= num_recv, "num_worst_tokens is smaller than the received token count"
            pad = num_worst_tokens - num_recv
            recv_x = torch.cat([recv_x, _garbage_like((pad, *recv_x.shape[1:]), recv_x.dtype, device)])
            if recv_scales is not None:
                recv_scales = torch.cat([recv_scales, _garbage_like((pad, *recv_scales.shape[1:]),
                                                                    recv_scales.dtype, device)])
            if recv_idx is not None and recv_w is not None:
                topk = recv_idx.shape[1]
                recv_idx = torch.cat([recv_idx, torch.full((pad, topk), -1, dtype=recv_idx.dtype, device=device)])
                recv_w = torch.cat([recv_w, _garbage_like((pad, topk), recv_w.dtype, device)])
            counts_list = []
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv, recv_idx, recv_w, counts_list, handle, NoEvent()

    def _move_rows(self, x: torch.Tensor, scales: Optional[torch.Tensor], route: _NormalRoute,
                   operation: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden = x.shape[1]
        parts = [(x.dtype, (hidden,))] + ([(scales.dtype, (scales.shape[1],))] if scales is not None else [])
        pack = RowPack(parts)
        rows = [x[route.send_token_idx]] + ([scales[route.send_token_idx]] if scales is not None else [])
        recv = pack.unpack(exchange_rows(pack.pack(rows), route.send_counts, route.recv_counts, self.peers,
                                         operation))
        return recv[0], (recv[1] if scales is not None else None)

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = None, config: Any = None,
                previous_event: Any = None, async_finish: bool = False, allocate_on_comm_stream: bool = False,
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], NoEvent]:
        """Unweighted sum of every rank's rows for each source token: ``(combined_x bf16 [T,H], combined_w, event)``."""
        self._check_alive()
        num_topk = int(topk_weights.shape[1]) if topk_weights is not None else 0
        self._check_nvl_bytes("combine", config, self.get_combine_config,
                              x.shape[1] * x.element_size() + 4 + num_topk * 4)
        route: _NormalRoute = handle[5]
        rows = x[:route.num_recv]
        hidden = x.shape[1]
        parts: list[tuple[torch.dtype, tuple[int, ...]]] = [(torch.bfloat16, (hidden,))]
        tensors = [rows.to(torch.bfloat16)]
        if topk_weights is not None:
            parts.append((torch.float32, (topk_weights.shape[1],)))
            tensors.append(topk_weights[:route.num_recv].float())
        pack = RowPack(parts)
        back = pack.unpack(exchange_rows(pack.pack(tensors), route.recv_counts, route.send_counts, self.peers,
                                         "combine"))
        out = self._reduce_by_rank(back[0].float(), route)
        combined_w = self._reduce_by_rank(back[1], route) if topk_weights is not None else None
        bias_0, bias_1 = bias if isinstance(bias, tuple) else (bias, None)
        for b in (bias_0, bias_1):
            if b is not None:
                out += b.float()
        return out.to(torch.bfloat16), combined_w, NoEvent()

    def _reduce_by_rank(self, values: torch.Tensor, route: _NormalRoute) -> torch.Tensor:
        out = torch.zeros((route.num_tokens, values.shape[1]), dtype=torch.float32, device=values.device)
        start = 0
        for count in route.send_counts:  # ascending rank, as DeepEP's reduction
            idx = route.send_token_idx[start:start + count]
            out.index_add_(0, idx, values[start:start + count].float())
            start += count
        return out

    # ------------------------------------------------------------------ low-latency mode
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        self._check_alive()

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             x_global_scale: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, use_nvfp4: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False,
                             ) -> tuple[XType, torch.Tensor, tuple, NoEvent, Optional[Callable[[], None]]]:
        """DeepEP's ``(recv_x [L, R*N, H] (or (fp8, scales)), recv_count [L] i32, handle, event, hook)``.

        FP8 scales are float32 ``[L, R*N, H/128]``, or with ``use_ue8m0`` (needs ``round_scale``) int32
        ``[L, R*N, H/512]`` holding four UE8M0 bytes (the float's exponent byte) per int, lowest byte first; in
        both the token dimension is contiguous.
        """
        self._check_alive()
        assert self.low_latency_mode, "low-latency kernels need a buffer built with low_latency_mode=True"
        if use_nvfp4:
            raise NotImplementedError("the reference provider implements bf16 and FP8 (float or UE8M0 scales) only")
        assert not use_ue8m0 or round_scale, "UE8M0 SF requires `round_scale=True`"
        ranks, rank = self.group_size, self.rank
        tokens, hidden = x.shape
        n_max = num_max_dispatch_tokens_per_rank
        assert tokens <= n_max, f"{tokens} tokens exceed num_max_dispatch_tokens_per_rank={n_max}"
        local_experts = num_experts // ranks
        device = x.device

        # One message per (token, k) with a valid expert, grouped by destination rank, then (token, k).
        t_idx, k_idx = torch.nonzero(topk_idx >= 0, as_tuple=True)
        expert = topk_idx[t_idx, k_idx]
        order = torch.argsort(expert // local_experts * (tokens * topk_idx.shape[1] + 1)
                              + t_idx * topk_idx.shape[1] + k_idx, stable=True)
        t_idx, k_idx, expert = t_idx[order], k_idx[order], expert[order]
        send_counts = torch.bincount(expert // local_experts, minlength=ranks).tolist()
        recv_counts = exchange_counts(send_counts, self.peers, device, "low_latency_dispatch")
        pack = RowPack([(torch.bfloat16, (hidden,)), (torch.int64, ()), (torch.int64, ()), (torch.int64, ())])
        sent = pack.pack([x[t_idx].to(torch.bfloat16), (expert % local_experts).to(torch.int64),
                          t_idx.to(torch.int64), k_idx.to(torch.int64)])
        rx, rl, rt, rk = pack.unpack(exchange_rows(sent, send_counts, recv_counts, self.peers, "low_latency_dispatch"))
        rs = torch.repeat_interleave(torch.arange(ranks, device=device), torch.tensor(recv_counts, device=device))

        # Place rows: expert-major, then source rank, then arrival order (token, k).
        order = torch.argsort(rl * (ranks + 1) + rs, stable=True)
        rx, rl, rt, rk, rs = rx[order], rl[order], rt[order], rk[order], rs[order]
        recv_count = torch.bincount(rl, minlength=local_experts).to(torch.int32)
        starts = torch.cumsum(recv_count, 0) - recv_count
        slot = torch.arange(rl.numel(), device=device) - starts[rl]
        capacity = ranks * n_max
        recv_x = _garbage_like((local_experts, capacity, hidden), torch.bfloat16, device)
        recv_x[rl, slot] = rx
        src_info = torch.full((local_experts, capacity), -1, dtype=torch.int32, device=device)
        src_info[rl, slot] = rt.to(torch.int32)
        per_block = torch.zeros((local_experts, ranks), dtype=torch.int64, device=device)
        per_block.index_put_((rl, rs), torch.ones_like(rl), accumulate=True)
        block_begin = torch.cumsum(per_block, dim=1) - per_block
        layout_range = (block_begin << 32) | per_block
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += recv_count

        handle = _LowLatencyHandle((src_info, layout_range, n_max, hidden, num_experts))
        handle.route = (rl, slot, rs, rt, rk)
        recv: XType = recv_x
        if use_fp8:
            q, s = quantize_fp8(recv_x, round_scale=round_scale)
            if use_ue8m0:
                if hidden % 512:
                    raise ValueError(f"UE8M0 scales pack four 128-channel groups per int: hidden % 512 == 0, "
                                     f"got {hidden}")
                exponent = ((s.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)  # [L, R*N, H/128]
                s = exponent.view(local_experts, capacity, hidden // 512, 4).view(torch.int32).squeeze(-1)
            scales = torch.empty((local_experts, s.shape[2], capacity), dtype=s.dtype, device=device)
            scales.copy_(s.transpose(1, 2))
            recv = (q, scales.transpose(1, 2))
        return recv, recv_count, handle, NoEvent(), (no_hook if return_recv_hook else None)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: tuple, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None, overlap: bool = False,
                            src_signals: Optional[torch.Tensor] = None, src_signal_expect_value: int = 0,
                            ) -> tuple[torch.Tensor, NoEvent, Optional[Callable[[], None]]]:
        """Weighted sum ``out[t] = Σ_k w[t,k] · y[expert(t,k), slot(t,k)]`` in fp32, rounded to bf16.

        ``y`` is ``x``, or with ``zero_copy`` the tensor :meth:`get_next_low_latency_combine_buffer` returned
        for this handle (the caller has filled it; ``x`` is then not read).
        """
        self._check_alive()
        rl, slot, rs, rt, rk = handle.route  # type: ignore[attr-defined]
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        ranks = self.group_size
        hidden = x.shape[2]
        order = torch.argsort(rs, stable=True)
        send_counts = torch.bincount(rs, minlength=ranks).tolist()
        recv_counts = exchange_counts(send_counts, self.peers, x.device, "low_latency_combine")
        pack = RowPack([(torch.bfloat16, (hidden,)), (torch.int64, ()), (torch.int64, ())])
        sent = pack.pack([x[rl[order], slot[order]].to(torch.bfloat16), rt[order], rk[order]])
        y, t, k = pack.unpack(exchange_rows(sent, send_counts, recv_counts, self.peers, "low_latency_combine"))
        weights = torch.where(topk_idx >= 0, topk_weights.float(), torch.zeros_like(topk_weights, dtype=torch.float32))
        combined = torch.zeros((topk_idx.shape[0], hidden), dtype=torch.float32, device=x.device)
        combined.index_add_(0, t, y.float() * weights[t, k].unsqueeze(1))
        result = combined.to(torch.bfloat16)
        if out is not None:
            out.copy_(result)
            result = out
        return result, NoEvent(), (no_hook if return_recv_hook else None)

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The bf16 ``[L, R*N, H]`` tensor the next ``low_latency_combine(..., zero_copy=True)`` reads (DeepEP:
        its registered RDMA buffer). Uninitialised (NaN) until the caller fills it; the same tensor for the same
        ``(N, H, E)``."""
        self._check_alive()
        src_info, _, n_max, hidden, num_experts = handle[:5]
        key = (int(n_max), int(hidden), int(num_experts))
        buffer = self._ll_combine_buffers.get(key)
        if buffer is None:
            shape = (key[2] // self.group_size, self.group_size * key[0], key[1])
            buffer = self._ll_combine_buffers[key] = _garbage_like(shape, torch.bfloat16, src_info.device)
        return buffer
