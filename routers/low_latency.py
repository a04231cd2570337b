"""The low-latency (decode, CUDA-graph) router.

Every generation's low-latency path (``LegacyLowLatencyPath``: ``low_latency_dispatch`` / ``low_latency_combine``;
``ElasticLowLatencyPath``: quantise -> ``dispatch(do_expand=True, do_cpu_sync=False)`` -> pack, and unpack with
the top-k weighting -> ``combine``) hands the executor DeepEP's legacy low-latency payload: ``expert_x
[E_local, R*N, H]`` (bf16, or fp8 with float32 scales ``[E_local, R*N, H/128]`` whose token dimension is
contiguous), ``expert_num_tokens`` int32 ``[E_local]`` on the device, ``expected_m``; and takes the executor's
output in that layout, returning the top-k weighted sum ``[T, H]`` bf16. No path synchronises the host, so
prepare -> executor -> finalize can be captured in one CUDA graph.

Inside expert ``e``, the order of its valid rows is unspecified on every generation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from deepep_switch.backends import BackendSpec, LowLatencyPath
from deepep_switch.config import DeepEPMode

from .base import RouterBase
from .payloads import ExpertForwardPayload, ExpertTokensMetadata


class LowLatencyRouter(RouterBase[LowLatencyPath]):
    """prepare/finalize for decode batches; the same 3-D payload on every generation.

    Args:
        wrapper: a :class:`DeepEPWrapper` built in LOW_LATENCY mode (its ``ll_num_max_token_per_rank`` is N).
        options: see :class:`RouterOptions` (``quant``, TP).
        **fork_kwargs: rtp-llm's ACCL-only ``opt_level`` / ``pertoken_quant``, accepted and ignored.

    The elastic path weights each row with the routing weight sent at ``prepare``; rtp-llm passes the same
    weights to ``finalize``, which the legacy path uses.
    """

    mode = DeepEPMode.LOW_LATENCY

    @staticmethod
    def _path_class(spec: BackendSpec) -> type[LowLatencyPath]:
        return spec.low_latency_path

    @property
    def layout_ops(self) -> Optional[str]:
        """Which layout conversion the path uses ("triton"/"torch"), or None when it needs none (legacy)."""
        return getattr(self._path, "layout_ops", None)

    def _prepare(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[ExpertForwardPayload, Any]:
        out = self._path.dispatch(x, ids, weights)
        expected_m = max(1, x.shape[0] * self.ep_size * self.num_topk // self.num_experts)
        payload = ExpertForwardPayload(
            expert_x=out.x, expert_x_origin_dtype=x.dtype, expert_x_scale=out.scales,
            expert_tokens_meta=ExpertTokensMetadata(expected_m=expected_m, expert_num_tokens=out.counts),
            expert_topk_ids=ids, expert_topk_weights=weights, expert_ids_are_local=False)
        return payload, out.handle

    def _finalize(self, y: torch.Tensor, handle: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self._path.combine(y, handle, topk_weights, topk_ids)
