"""The normal (prefill / high-throughput) router and its two backend paths.

* :class:`LegacyNormalPath`: ``Buffer.get_dispatch_layout`` + ``dispatch(expert_alignment=A)`` + ``combine``.
* :class:`ElasticNormalPath`: ``ElasticBuffer.dispatch(num_experts, expert_alignment=A, do_cpu_sync=True)`` +
  ``combine``, with the received weights zeroed where the id is -1 (DeepEP V2 leaves them set).

Both return the same rows (one per source token per rank), local ids with -1, masked weights and aligned
per-expert counts; combine is unweighted on both (the executor applies the weights). **Row order is not part of
the contract**: legacy delivers (source rank, token) order, elastic an arbitrary order inside each source rank
unless ``RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC=1``. Rows stay self-consistent (x, scales, ids, weights), and
combine puts every row back where it came from, so no executor may depend on the order.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from deepep_switch.backend import Backend
from deepep_switch.config import DeepEPMode

from .base import RouterBase, check_elastic_hidden
from .payloads import ExpertForwardPayload, ExpertTokensMetadata

XType = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
# (recv_x, recv_ids local with -1, recv_weights masked, aligned counts list, handle)
Dispatched = tuple[XType, torch.Tensor, torch.Tensor, list[int], Any]


class LegacyNormalPath:
    """``deep_ep.Buffer`` normal-mode kernels (NVLink intranode, NVLink+RDMA internode)."""

    def __init__(self, buffer: Any, num_experts: int, expert_alignment: int) -> None:
        self.buffer, self.num_experts, self.expert_alignment = buffer, num_experts, expert_alignment

    def dispatch(self, x: XType, ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(ids, self.num_experts)
        recv_x, recv_ids, recv_w, counts, handle, _ = self.buffer.dispatch(
            x, None, per_rank, per_rdma_rank, in_rank, per_expert, ids, weights,
            expert_alignment=self.expert_alignment)
        return recv_x, recv_ids, recv_w, counts, handle

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        out, _, _ = self.buffer.combine(y, handle)
        return out


class ElasticNormalPath:
    """``deep_ep.ElasticBuffer`` with a host-synchronised layout (exact row counts, not graph-capturable)."""

    def __init__(self, buffer: Any, num_experts: int, expert_alignment: int, num_sms: int, num_local_experts: int) -> None:
        self.buffer, self.num_experts, self.expert_alignment = buffer, num_experts, expert_alignment
        self.num_sms, self.num_local_experts = num_sms, num_local_experts

    def dispatch(self, x: XType, ids: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        recv_x, recv_ids, recv_w, handle, _ = self.buffer.dispatch(
            x, topk_idx=ids, topk_weights=weights, num_experts=self.num_experts,
            expert_alignment=self.expert_alignment, num_sms=self.num_sms, do_cpu_sync=True)
        recv_w = recv_w.masked_fill(recv_ids < 0, 0.0)  # V2 keeps the sender's weight where the id is -1
        counts = list(handle.num_recv_tokens_per_expert_list) or [0] * self.num_local_experts
        return recv_x, recv_ids, recv_w, counts, handle

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        out, _, _ = self.buffer.combine(y, handle, num_sms=handle.num_sms)
        return out


def _counts_on_device_pinned(counts: list[int], device: torch.device) -> torch.Tensor:
    # Pinned memory + non_blocking: the host does not wait for the dispatch kernels to drain before it can queue
    # the executor and combine (a plain torch.tensor(..., device=cuda) would synchronise here).
    return torch.tensor(counts, dtype=torch.int32, pin_memory=True).to(device, non_blocking=True)


def _counts_on_device_plain(counts: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int32, device=device)


class NormalRouter(RouterBase):
    """prepare/finalize for prefill batches; the same payload on both backends.

    Args:
        wrapper: a :class:`DeepEPWrapper` built in NORMAL mode.
        options: see :class:`RouterOptions` (``expert_alignment``, ``use_fp8``, ``global_expert_ids``, TP).
    """

    mode = DeepEPMode.NORMAL

    def _bind(self, backend: Backend, real_deep_ep: bool) -> Any:
        self._counts_on_device = _counts_on_device_pinned if torch.cuda.is_available() else _counts_on_device_plain
        buffer, alignment = self.wrapper.buffer, self.options.expert_alignment
        if backend is Backend.ELASTIC:
            if real_deep_ep:
                check_elastic_hidden(self.hidden_size)
            return ElasticNormalPath(buffer, self.num_experts, alignment, self.wrapper.decision.settings.num_sms,
                                     self.num_local_experts)
        return LegacyNormalPath(buffer, self.num_experts, alignment)

    def _prepare(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[ExpertForwardPayload, Any]:
        recv_x, recv_ids, recv_w, counts, handle = self._path.dispatch(self._quantize(x), ids, weights)
        expert_x, scale = recv_x if self.options.use_fp8 else (recv_x, None)
        if self.options.global_expert_ids:
            offset = self.ep_rank * self.num_local_experts
            dummy = self.num_experts - 1 if offset == 0 else 0  # an expert elsewhere: its weight here is 0
            recv_ids = torch.where(recv_ids < 0, torch.full_like(recv_ids, dummy), recv_ids + offset)
        meta = ExpertTokensMetadata(expert_num_tokens=self._counts_on_device(counts, expert_x.device),
                                    expert_num_tokens_cpu=counts)
        payload = ExpertForwardPayload(
            expert_x=expert_x, expert_x_origin_dtype=x.dtype, expert_x_scale=scale, expert_tokens_meta=meta,
            expert_topk_ids=recv_ids, expert_topk_weights=recv_w,
            expert_ids_are_local=not self.options.global_expert_ids)
        return payload, handle

    def _finalize(self, y: torch.Tensor, handle: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self._path.combine(y, handle)
