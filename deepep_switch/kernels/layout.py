"""Conversion between ElasticBuffer's expanded rows and the legacy low-latency ``[E_local, R*N, H]`` layout.

``ElasticBuffer.dispatch(do_expand=True, do_cpu_sync=False)`` returns one row per (token, local expert), expert
``e`` occupying rows ``[end[e] - count[e], end[e])`` where ``end = handle.psum_num_recv_tokens_per_expert`` and
``count = handle.num_unaligned_recv_tokens_per_expert`` are known only on the device. The low-latency executor
wants expert ``e``'s rows at ``expert_x[e, :count[e]]``. With ``start = end - count``:

* pack (prepare): ``expert_x[e, i] = rows[start[e] + i]`` for ``i < count[e]``.
* unpack (finalize): ``out[start[e] + i] = bf16(float(y[e, i]) * weight[start[e] + i])``, the top-k weighting
  that ``ElasticBuffer.combine`` never applies.

Neither reads the counts on the host, so both are CUDA-graph capturable. :class:`LayoutOps` picks the Triton
kernels (which touch only valid rows) on CUDA when Triton is importable, else the torch versions here (which
gather the whole worst case: fine on CPU and as a reference, too slow for decode).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional

import torch

from .select import triton_on_cuda

logger = logging.getLogger("deepep_switch.kernels")


def _row_index(end: torch.Tensor, count: torch.Tensor, capacity: int) -> torch.Tensor:
    i = torch.arange(capacity, device=end.device)
    return (end.to(torch.int64) - count.to(torch.int64)).unsqueeze(1) + i.unsqueeze(0)


def pack_rows_torch(rows: torch.Tensor, end: torch.Tensor, count: torch.Tensor, capacity: int,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch pack (gathers ``E_local * capacity`` rows; rows past ``count`` are junk).

    Args:
        rows: ``[R_rows, W]`` expanded rows (any dtype).
        end / count: int ``[E_local]`` on ``rows.device``: expert e's rows end at ``end[e]``, ``count[e]`` of them.
        capacity: rows per expert in the output (``R * N``).
        out: optional ``[E_local, capacity, W]`` destination (any strides).
    """
    experts = end.shape[0]
    src = _row_index(end, count, capacity).clamp_(0, max(rows.shape[0] - 1, 0))
    gathered = rows[src.reshape(-1)].reshape(experts, capacity, *rows.shape[1:])
    if out is None:
        return gathered
    out.copy_(gathered)
    return out


def unpack_rows_torch(y: torch.Tensor, weights: torch.Tensor, end: torch.Tensor, count: torch.Tensor,
                      num_rows: int) -> torch.Tensor:
    """Torch unpack: weighted expert outputs ``y [E_local, capacity, H]`` back into ``[num_rows, H]`` bf16 rows.

    ``weights`` is float32 ``[num_rows]`` (one per expanded row). Rows that belong to no expert are left
    uninitialised (combine never reads them).
    """
    experts, capacity, hidden = y.shape
    idx = _row_index(end, count, capacity)
    valid = torch.arange(capacity, device=y.device).unsqueeze(0) < count.to(torch.int64).unsqueeze(1)
    dst = torch.where(valid, idx, torch.full_like(idx, num_rows))  # invalid rows land in a spare last row
    w = weights.float()[idx.clamp(0, max(num_rows - 1, 0))]
    values = (y.float() * w.unsqueeze(-1)).to(torch.bfloat16)
    out = torch.empty((num_rows + 1, hidden), dtype=torch.bfloat16, device=y.device)
    out.index_copy_(0, dst.reshape(-1), values.reshape(-1, hidden))
    return out[:num_rows]


class LayoutOps(NamedTuple):
    """The pair of conversion functions bound by a low-latency router at construction."""

    name: str
    pack: Callable[..., torch.Tensor]
    unpack: Callable[..., torch.Tensor]


TORCH_OPS = LayoutOps("torch", pack_rows_torch, unpack_rows_torch)


def layout_ops_for(device: torch.device) -> LayoutOps:
    """Triton kernels on CUDA when Triton imports, else the torch versions."""
    def build() -> LayoutOps:
        from .triton_layout import pack_rows_triton, unpack_rows_triton

        return LayoutOps("triton", pack_rows_triton, unpack_rows_triton)
    return triton_on_cuda(device, build, TORCH_OPS, "layout kernels",
                          "the elastic low-latency path uses the slower torch conversion", logger)


def weight_rows_torch(rows: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """In place ``rows[i] = bf16(f32(rows[i]) * weights[i])`` over every allocated row (torch cannot stop at the
    device-side ``total`` without a host sync). ``rows`` bf16 ``[R_rows, H]``, ``weights`` float32 ``[R_rows]``."""
    del total
    rows.copy_((rows.float() * weights.float().unsqueeze(1)).to(rows.dtype))
    return rows


def row_weighter_for(device: torch.device) -> tuple[str, Callable[..., torch.Tensor]]:
    """``(name, weigh(rows, weights, total))``: the cheapest correct top-k weighting of expanded rows a hand-written
    elastic integration needs (V2's combine never weights): one Triton launch over the valid rows ``[0, total)``
    on CUDA, else :func:`weight_rows_torch` over every allocated row."""
    def build() -> tuple[str, Callable[..., torch.Tensor]]:
        from .triton_layout import weight_rows_triton

        return "triton (valid rows)", weight_rows_triton
    return triton_on_cuda(device, build, ("torch (all rows)", weight_rows_torch), "row weighting",
                          "using torch over every allocated row", logger)
