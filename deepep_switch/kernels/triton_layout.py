"""Triton kernels for :mod:`deepep_switch.kernels.layout`: they move only the valid rows.

Grid ``(ceil(capacity / BLOCK_M), E_local)``; a program whose first row is past its expert's count does nothing,
so the work scales with the tokens actually received, not with the worst case ``E_local * R * N``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK_M = 8


@triton.jit
def _pack_kernel(src_ptr, dst_ptr, end_ptr, count_ptr, width, src_stride_row,
                 dst_stride_expert, dst_stride_row, dst_stride_col,
                 BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_m = tl.program_id(0)
    expert = tl.program_id(1)
    count = tl.load(count_ptr + expert)
    if pid_m * BLOCK_M < count:
        start = tl.load(end_ptr + expert).to(tl.int64) - count
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < count
        src_rows = (start + rows).to(tl.int64) * src_stride_row
        dst_rows = expert.to(tl.int64) * dst_stride_expert + rows.to(tl.int64) * dst_stride_row
        for w0 in range(0, width, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            mask = row_mask[:, None] & (cols[None, :] < width)
            v = tl.load(src_ptr + src_rows[:, None] + cols[None, :], mask=mask)
            tl.store(dst_ptr + dst_rows[:, None] + cols[None, :].to(tl.int64) * dst_stride_col, v, mask=mask)


@triton.jit
def _unpack_kernel(y_ptr, w_ptr, out_ptr, end_ptr, count_ptr, hidden, y_stride_expert, y_stride_row,
                   out_stride_row, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m = tl.program_id(0)
    expert = tl.program_id(1)
    count = tl.load(count_ptr + expert)
    if pid_m * BLOCK_M < count:
        start = tl.load(end_ptr + expert).to(tl.int64) - count
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < count
        w = tl.load(w_ptr + start + rows, mask=row_mask, other=0.0).to(tl.float32)
        y_rows = expert.to(tl.int64) * y_stride_expert + rows.to(tl.int64) * y_stride_row
        out_rows = (start + rows).to(tl.int64) * out_stride_row
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = row_mask[:, None] & (cols[None, :] < hidden)
            y = tl.load(y_ptr + y_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_rows[:, None] + cols[None, :], (y * w[:, None]).to(tl.bfloat16), mask=mask)


_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_rows_triton(rows: torch.Tensor, end: torch.Tensor, count: torch.Tensor, capacity: int,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract as ``pack_rows_torch``; rows past ``count`` are left untouched."""
    experts = end.shape[0]
    if out is None:
        out = torch.empty((experts, capacity, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    if experts == 0 or rows.shape[0] == 0:
        return out
    raw = _RAW[rows.element_size()]  # copy bits: the same kernel serves bf16, fp8 and float32 scales
    src = rows.reshape(rows.shape[0], -1).contiguous().view(raw)
    dst = out.view(raw)  # same element size, so any strides (column-major scales) are kept
    width = src.shape[1]
    block_w = min(1024, triton.next_power_of_2(width))
    grid = (triton.cdiv(capacity, _BLOCK_M), experts)
    _pack_kernel[grid](src, dst, end, count, width, src.stride(0), out.stride(0), out.stride(1), out.stride(2),
                       BLOCK_M=_BLOCK_M, BLOCK_W=block_w)
    return out


def unpack_rows_triton(y: torch.Tensor, weights: torch.Tensor, end: torch.Tensor, count: torch.Tensor,
                       num_rows: int) -> torch.Tensor:
    """Same contract as ``unpack_rows_torch``; only valid rows are written."""
    experts, capacity, hidden = y.shape
    out = torch.empty((num_rows, hidden), dtype=torch.bfloat16, device=y.device)
    if experts == 0 or num_rows == 0:
        return out
    if y.stride(-1) != 1:
        y = y.contiguous()
    block_h = min(1024, triton.next_power_of_2(hidden))
    grid = (triton.cdiv(capacity, _BLOCK_M), experts)
    _unpack_kernel[grid](y, weights, out, end, count, hidden, y.stride(0), y.stride(1), out.stride(0),
                         BLOCK_M=_BLOCK_M, BLOCK_H=block_h)
    return out



@triton.jit
def _weight_rows_kernel(rows_ptr, w_ptr, total_ptr, hidden, stride_row, BLOCK_M: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    total = tl.load(total_ptr)
    if pid * BLOCK_M < total:
        r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = r < total
        w = tl.load(w_ptr + r, mask=rmask, other=0.0).to(tl.float32)
        base = r.to(tl.int64)[:, None] * stride_row
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = rmask[:, None] & (cols[None, :] < hidden)
            v = tl.load(rows_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(rows_ptr + base + cols[None, :], (v * w[:, None]).to(tl.bfloat16), mask=mask)


def weight_rows_triton(rows: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """In place ``rows[i] = bf16(f32(rows[i]) * weights[i])`` for ``i < total`` (int32 ``[1]`` on the device):
    bf16 ``rows [R_rows, H]`` (unit column stride), float32 ``weights [R_rows]``. One launch."""
    num_rows, hidden = rows.shape
    if num_rows:
        block_h = min(1024, triton.next_power_of_2(hidden))
        _weight_rows_kernel[(triton.cdiv(num_rows, _BLOCK_M),)](rows, weights, total, hidden, rows.stride(0),
                                                                BLOCK_M=_BLOCK_M, BLOCK_H=block_h)
    return rows
