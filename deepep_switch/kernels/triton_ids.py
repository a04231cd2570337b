"""Triton kernel for :mod:`deepep_switch.kernels.ids`: the whole clean-up in one launch, BLOCK_T rows (~256 ids) a
program."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["rows", "num_experts"])
def _drop_bad_ids_kernel(ids_ptr, out_ptr, rows, num_experts, stride_row, stride_col,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    mask = (r[:, None] < rows) & (k[None, :] < K)
    r64 = r[:, None].to(tl.int64)
    ids = tl.load(ids_ptr + r64 * stride_row + k[None, :] * stride_col, mask=mask, other=-1)
    bad = (ids < 0) | (ids >= num_experts)
    for j in tl.static_range(K - 1):  # column j against every later column
        col = tl.sum(tl.where(k[None, :] == j, ids, 0), axis=1)
        bad = bad | ((ids == col[:, None]) & (k[None, :] > j))
    tl.store(out_ptr + r64 * K + k[None, :], tl.where(bad, -1, ids), mask=mask)


def drop_bad_ids_triton(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Same contract as ``drop_bad_ids_torch``: int64 ``[T, K]`` (any strides) -> a new contiguous int64."""
    rows, topk = ids.shape
    out = torch.empty((rows, topk), dtype=torch.int64, device=ids.device)
    if rows:
        block_k = triton.next_power_of_2(topk)
        # ~256 ids a program: a 128-token decode batch spreads over several SMs instead of one program's
        # serial reductions, which is what a captured decode step waits for
        block_t = max(16, 256 // block_k)
        _drop_bad_ids_kernel[(triton.cdiv(rows, block_t),)](
            ids, out, rows, num_experts, ids.stride(0), ids.stride(1), K=topk, BLOCK_K=block_k, BLOCK_T=block_t)
    return out
