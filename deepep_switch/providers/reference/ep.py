"""``ReferenceEPBuffer``: DeepEP 2.5's ``EPBuffer`` in pure PyTorch.

DeepEP 2.5's ``EPBuffer`` moves tokens exactly as 2.1's ``ElasticBuffer`` does (the same rows, order, weights left
unmasked, worst-case tails, expand layout and unweighted combine), so this class reuses
:class:`~deepep_switch.providers.reference.ReferenceElasticBuffer`'s exchange and changes only what 2.5 changed
in the API (``deep_ep_v25/buffers/ep.py``):

* constructor: no ``num_cpu_bytes`` (the positional order shifts), ``lb_allocation_plan_or_num_bytes`` (byte
  counts only here), ``sl_idx=None``; ``num_bytes=None`` sizes the buffer with 2.5's own formula
  (:func:`~deepep_switch.providers.reference.hints.ep_buffer_size_hint`);
* ``dispatch``: ``do_handle_copy`` defaults to False and True is refused with 2.5's AssertionError; the handle
  keeps ``topk_idx`` **by reference** and reading it after the tensor changed in place asserts, as 2.5's
  ``EPHandle`` does; ``previous_event_before_epilogue`` is gone; ``defer_epilogue=True`` (with
  ``async_with_compute_stream=True``) returns only an event whose ``current_stream_wait()`` returns
  ``(recv_x, recv_topk_idx, recv_topk_weights, handle)``;
* ``combine``: ``previous_event_before_epilogue`` is gone; ``defer_epilogue`` as above, the wait returning
  ``(combined_x, combined_topk_weights)``.

Like the other reference providers it synchronises the host and is not CUDA-graph capturable.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ...settings import DEFAULT_TIMEOUT_S
from .elastic import _ALIGNMENT, ReferenceElasticBuffer, ReferenceEPHandle, XType
from .exchange import NoEvent
from .hints import ep_buffer_size_hint

_TOPK_IDX_CHANGED = "`topk_idx` must not be modified while the EP handle is in use"


class ReferenceEPBufferHandle(ReferenceEPHandle):
    """DeepEP 2.5's ``EPHandle``: the same fields, with ``topk_idx`` held by reference and guarded by the tensor's
    version counter (tensors made in inference mode have none and cannot be checked, as in 2.5)."""

    def __init__(self, topk_idx: torch.Tensor, **fields: Any) -> None:
        super().__init__(**fields)
        self._topk_idx = topk_idx
        self._topk_idx_version = None if topk_idx.is_inference() else topk_idx._version

    @property
    def topk_idx(self) -> torch.Tensor:
        assert self._topk_idx_version is None or self._topk_idx._version == self._topk_idx_version, _TOPK_IDX_CHANGED
        return self._topk_idx


class DeferredEpilogue(NoEvent):
    """What ``defer_epilogue=True`` returns: waiting runs the epilogue and returns its results (once)."""

    def __init__(self, result: tuple) -> None:
        super().__init__()
        self._result: Optional[tuple] = result

    def current_stream_wait(self, release_handle: bool = False) -> Any:  # type: ignore[override]
        result, self._result = self._result, None
        return result

    def wait(self) -> Any:
        return self.current_stream_wait()


class ReferenceEPBuffer(ReferenceElasticBuffer):
    """Pure-PyTorch stand-in for DeepEP 2.5's ``EPBuffer`` (direct mode: one scale-up domain of R ranks).

    Args mirror ``deep_ep_v25.EPBuffer``. ``lb_allocation_plan_or_num_bytes`` accepts a byte count (2 MiB aligned)
    and reserves nothing; load-balancing plans, hybrid mode and the Engram/PP/bucket buffers are not provided.
    """

    handle_class = ReferenceEPBufferHandle

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None, num_max_tokens_per_rank: int = 0,
                 hidden: int = 0, num_topk: int = 0, use_fp8_dispatch: bool = False,
                 lb_allocation_plan_or_num_bytes: int = 0, deterministic: bool = False,
                 allow_hybrid_mode: bool = True, allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True, sl_idx: Optional[int] = None, num_allocated_qps: int = 0,
                 num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        lb_bytes = lb_allocation_plan_or_num_bytes
        if not isinstance(lb_bytes, int) or lb_bytes < 0 or lb_bytes % _ALIGNMENT:
            raise ValueError("lb_allocation_plan_or_num_bytes: the reference EPBuffer takes a byte count >= 0, "
                             "2 MiB aligned (load-balancing plans are not provided)")
        if num_bytes is None:
            num_bytes = ep_buffer_size_hint(dist.get_world_size(group), num_max_tokens_per_rank, hidden, num_topk,
                                            use_fp8_dispatch, allow_multiple_reduction)
        super().__init__(group, num_bytes=num_bytes, num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden,
                         num_topk=num_topk, use_fp8_dispatch=use_fp8_dispatch, deterministic=deterministic,
                         allow_hybrid_mode=allow_hybrid_mode, allow_multiple_reduction=allow_multiple_reduction,
                         prefer_overlap_with_compute=prefer_overlap_with_compute,
                         num_allocated_qps=num_allocated_qps, num_cpu_timeout_secs=num_cpu_timeout_secs,
                         num_gpu_timeout_secs=num_gpu_timeout_secs, explicitly_destroy=explicitly_destroy,
                         timeout_s=timeout_s)
        self.num_lb_bytes = lb_bytes
        self.sl_idx = sl_idx
        self.num_cpu_timeout_secs, self.num_gpu_timeout_secs = num_cpu_timeout_secs, num_gpu_timeout_secs

    @staticmethod
    def get_buffer_size_hint(group: dist.ProcessGroup, num_max_tokens_per_rank: int, hidden: int,
                             num_topk: int = 0, use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        return ep_buffer_size_hint(dist.get_world_size(group), num_max_tokens_per_rank, hidden, num_topk,
                                   use_fp8_dispatch, allow_multiple_reduction)

    def dispatch(self, x: XType, topk_idx: Optional[torch.Tensor] = None,  # type: ignore[override]
                 topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0,
                 previous_event: Any = None, async_with_compute_stream: bool = False,
                 allocate_on_comm_stream: bool = False, handle: Optional[ReferenceEPBufferHandle] = None,
                 do_handle_copy: bool = False, do_cpu_sync: Optional[bool] = None, do_expand: bool = False,
                 do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False,
                 defer_epilogue: bool = False) -> Union[tuple, DeferredEpilogue]:
        """2.5's ``(recv_x, recv_topk_idx, recv_topk_weights, handle, event)``, or only the event when deferred."""
        assert not do_handle_copy, "`do_handle_copy` must be False; handle copying is no longer supported"
        assert not defer_epilogue or async_with_compute_stream, "defer_epilogue requires async_with_compute_stream"
        result = super().dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats, num_experts=num_experts,
            num_max_tokens_per_rank=num_max_tokens_per_rank, expert_alignment=expert_alignment, num_sms=num_sms,
            num_qps=num_qps, previous_event=previous_event, async_with_compute_stream=async_with_compute_stream,
            allocate_on_comm_stream=allocate_on_comm_stream, handle=handle, do_handle_copy=False,
            do_cpu_sync=do_cpu_sync, do_expand=do_expand, do_zero_padding=do_zero_padding,
            use_tma_aligned_col_major_sf=use_tma_aligned_col_major_sf)
        return DeferredEpilogue(result[:4]) if defer_epilogue else result

    def combine(self, x: torch.Tensor, handle: ReferenceEPBufferHandle,  # type: ignore[override]
                topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = None, num_sms: int = 0,
                num_qps: int = 0, previous_event: Any = None, async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False, defer_epilogue: bool = False) -> Union[tuple, DeferredEpilogue]:
        """2.5's ``(combined_x, combined_topk_weights, event)``, or only the event when deferred."""
        assert not defer_epilogue or async_with_compute_stream, "defer_epilogue requires async_with_compute_stream"
        result = super().combine(x, handle, topk_weights=topk_weights, bias=bias, num_sms=num_sms, num_qps=num_qps,
                                 previous_event=previous_event, async_with_compute_stream=async_with_compute_stream,
                                 allocate_on_comm_stream=allocate_on_comm_stream)
        return DeferredEpilogue(result[:2]) if defer_epilogue else result

    def _check_alive(self) -> None:
        if self.runtime is None:
            raise RuntimeError("this ReferenceEPBuffer was destroyed")
