"""The normal (prefill / high-throughput) router.

Its path comes from the running generation's module (``LegacyNormalPath``: ``get_dispatch_layout`` + ``dispatch``
+ ``combine``; ``ElasticNormalPath``: ``ElasticBuffer.dispatch(do_cpu_sync=True)`` + ``combine``, weights zeroed
where the id is -1). Every path returns a :class:`~deepep_switch.backends.NormalDispatch`: the same rows (one per
source token per rank), local ids with -1, masked weights and aligned per-expert counts; combine is unweighted
on every generation (the executor applies the weights). **Row order is not part of the contract**: legacy
delivers (source rank, token) order, elastic an arbitrary order inside each source rank unless
``RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC=1``. Rows stay self-consistent (x, scales, ids, weights), and combine puts
every row back where it came from, so no executor may depend on the order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepep_switch.backends import BackendSpec, NormalPath
from deepep_switch.config import DeepEPMode

from .base import RouterBase
from .payloads import ExpertForwardPayload, ExpertTokensMetadata


class PinnedCountsUploader:
    """Aligned per-expert counts (a host list) to an int32 device tensor, without a host sync and without a pinned
    allocation per call: ``SLOTS`` rows of pinned staging memory are reused in turn. The copy out of a row is
    queued ``non_blocking``; before the row is written again (``SLOTS`` dispatches later) the host waits for the
    event recorded after that copy, which finished long before.

    Args:
        size: the counts' length (``E_local``). device: the CUDA device the counts go to.
    """

    SLOTS = 4

    def __init__(self, size: int, device: torch.device) -> None:
        self.device = device
        # device='cpu' explicitly: engines (rtp-llm's tests among them) run under torch.device('cuda') as the default
        self._staging = torch.empty((self.SLOTS, max(size, 1)), dtype=torch.int32, device="cpu", pin_memory=True)
        self._rows = [self._staging[i].numpy() for i in range(self.SLOTS)]
        self._size = size
        self._views = [self._staging[i, :size] for i in range(self.SLOTS)]
        self._events = [torch.cuda.Event() for _ in range(self.SLOTS)]
        self._recorded = [False] * self.SLOTS
        self._next = 0

    def __call__(self, counts: list[int], device: torch.device) -> torch.Tensor:
        """``E_local`` counts -> a new int32 ``[E_local]`` tensor on ``device`` (the copy is queued, not awaited)."""
        slot = self._next
        self._next = (slot + 1) % self.SLOTS
        if self._recorded[slot]:
            self._events[slot].synchronize()  # the copy queued SLOTS dispatches ago: long done
        n = len(counts)
        self._rows[slot][:n] = counts
        # The whole row is a view made once; only an unexpected length slices (a tensor op) per call.
        staged = self._views[slot] if n == self._size else self._staging[slot, :n]
        out = staged.to(device, non_blocking=True)
        self._events[slot].record()
        self._recorded[slot] = True
        return out


def _counts_on_device_plain(counts: list[int], device: torch.device) -> torch.Tensor:
    """``E_local`` counts -> a new int32 ``[E_local]`` tensor on ``device`` (off CUDA: no pinned staging).
    Through numpy: about a third of ``torch.tensor(list)``'s host time; ``.to`` is free on the CPU."""
    return torch.from_numpy(np.array(counts, dtype=np.int32)).to(device)


class NormalRouter(RouterBase[NormalPath]):
    """prepare/finalize for prefill batches; the same payload on every generation.

    Args:
        wrapper: a :class:`DeepEPWrapper` built in NORMAL mode.
        options: see :class:`RouterOptions` (``expert_alignment``, ``quant``, ``global_expert_ids``, TP).
    """

    mode = DeepEPMode.NORMAL

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counts_on_device = (PinnedCountsUploader(self.num_local_experts, self.device)
                                  if self.device.type == "cuda" else _counts_on_device_plain)
        # global_expert_ids: int64 [E_local + 1], local id i -> its global id, and at [-1] (where a local -1
        # indexes) the dummy expert: one gather per dispatch instead of compare, fill, add and select.
        self._global_ids = self._global_id_table(self.device) if self.options.global_expert_ids else None

    def _global_id_table(self, device: torch.device) -> torch.Tensor:
        offset = self.ep_rank * self.num_local_experts
        dummy = self.num_experts - 1 if offset == 0 else 0  # an expert elsewhere: its weight here is 0
        table = torch.arange(offset, offset + self.num_local_experts + 1, dtype=torch.int64, device=device)
        table[-1] = dummy
        return table

    def _to_global(self, recv_ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[N_recv, K]`` local ids with -1 -> a new int64 ``[N_recv, K]``: global ids, -1 -> the dummy."""
        table = self._global_ids
        assert table is not None
        if table.device != recv_ids.device:  # reference providers on another device than the router's
            table = self._global_ids = self._global_id_table(recv_ids.device)
        return table[recv_ids]

    @staticmethod
    def _path_class(spec: BackendSpec) -> type[NormalPath]:
        return spec.normal_path

    def _prepare(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[ExpertForwardPayload, Any]:
        out = self._path.dispatch(self._quantize(x), ids, weights)
        recv_ids = out.topk_ids
        if self._global_ids is not None:
            recv_ids = self._to_global(recv_ids)
        meta = ExpertTokensMetadata(expert_num_tokens=self._counts_on_device(out.counts, out.x.device),
                                    expert_num_tokens_cpu=out.counts)
        payload = ExpertForwardPayload(
            expert_x=out.x, expert_x_origin_dtype=x.dtype, expert_x_scale=out.scales, expert_tokens_meta=meta,
            expert_topk_ids=recv_ids, expert_topk_weights=out.topk_weights,
            expert_ids_are_local=not self.options.global_expert_ids)
        return payload, out.handle

    def _finalize(self, y: torch.Tensor, handle: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self._path.combine(y, handle)
