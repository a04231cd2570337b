"""Triton kernels for :mod:`deepep_switch.kernels.token_layout`: one program per received row; a program past the
valid count (read on the device) returns at once, so the work follows the rows actually received.

* pack: the row's slots (its position = how many entries with the same local id come before it in row-major
  order: one vectorised compare against the earlier rows' ids, deterministic), then the row (and its FP8 scales,
  in the same launch) copied to each of its slots; ``E_local`` extra programs count each expert's entries (no
  memset, no atomics: one launch in all).
* fold: for each column block, the row's slots gathered as a ``[K, BLOCK_H]`` tile, weighted and summed in fp32,
  one bf16 row written.

Cost of the positions: row ``i`` compares its ``K`` ids with the ``i*K`` ids before it, ``_CHUNK`` at a time, so the
last rows make ``R*M*K / _CHUNK`` dependent steps and the launch reads ``~4*K*(R*M)^2`` bytes of ids from L2:
1 step and 2 MB at ``R*M = 256`` (EP2, 128 tokens), 4 steps and 34 MB at 1024, 16 steps and 540 MB at 4096, where
the ``expand`` layout (DeepEP's own expansion) is likely the faster one.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_CHUNK = 2048  # earlier ids compared per step when computing positions (and counted per step)
_BLOCK_H = 1024


@triton.jit
def _pack_tokens_kernel(ids_ptr, valid_ptr, rows_ptr, out_ptr, sf_ptr, out_sf_ptr, dest_ptr, counts_ptr,
                        num_rows, num_local, capacity, width, groups, rows_stride, sf_stride_row, sf_stride_g,
                        osf_stride_e, osf_stride_t, osf_stride_g,
                        K: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_W: tl.constexpr,
                        BLOCK_G: tl.constexpr, HAS_SF: tl.constexpr):
    row = tl.program_id(0)
    valid = tl.load(valid_ptr)
    if row >= num_rows:  # one extra program per local expert: count its entries (deterministic, no atomics)
        expert = row - num_rows
        total = valid * K
        hits = tl.zeros([CHUNK], dtype=tl.int32)
        for c0 in range(0, total, CHUNK):
            e = c0 + tl.arange(0, CHUNK)
            p = tl.load(ids_ptr + e, mask=e < total, other=-1).to(tl.int64)
            hits += (p == expert).to(tl.int32)
        tl.store(counts_ptr + expert, tl.minimum(tl.sum(hits, axis=0), capacity))
    if row < valid:
        k = tl.arange(0, BLOCK_K)
        kmask = k < K
        base = row.to(tl.int64) * K
        v = tl.load(ids_ptr + base + k, mask=kmask, other=-1).to(tl.int64)
        local = kmask & (v >= 0) & (v < num_local)
        pos = tl.zeros([BLOCK_K], dtype=tl.int32)
        before = row * K  # entries of the earlier rows, all valid
        for c0 in range(0, before, CHUNK):
            e = c0 + tl.arange(0, CHUNK)
            p = tl.load(ids_ptr + e, mask=e < before, other=-1).to(tl.int64)
            pos += tl.sum((p[None, :] == v[:, None]).to(tl.int32), axis=1)
        # Earlier entries of this row with the same id (only with repeated ids, i.e. validation off).
        pos += tl.sum(((v[None, :] == v[:, None]) & (k[None, :] < k[:, None])).to(tl.int32), axis=1)
        local = local & (pos < capacity)  # only repeated ids (validation off) can overflow an expert
        dest = tl.where(local, v * capacity + pos, -1)
        tl.store(dest_ptr + base + k, dest.to(tl.int32), mask=kmask)
        d64 = dest.to(tl.int64)
        src = rows_ptr + row.to(tl.int64) * rows_stride
        for w0 in range(0, width, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            cmask = cols < width
            x = tl.load(src + cols, mask=cmask)
            tile = tl.broadcast_to(x[None, :], (BLOCK_K, BLOCK_W))
            tl.store(out_ptr + d64[:, None] * width + cols[None, :], tile, mask=local[:, None] & cmask[None, :])
        if HAS_SF:
            g = tl.arange(0, BLOCK_G)
            gmask = g < groups
            s = tl.load(sf_ptr + row.to(tl.int64) * sf_stride_row + g * sf_stride_g, mask=gmask)
            expert = d64 // capacity
            slot = d64 - expert * capacity
            where = expert[:, None] * osf_stride_e + slot[:, None] * osf_stride_t + g[None, :] * osf_stride_g
            tl.store(out_sf_ptr + where, tl.broadcast_to(s[None, :], (BLOCK_K, BLOCK_G)),
                     mask=local[:, None] & gmask[None, :])


@triton.jit
def _fold_tokens_kernel(y_ptr, dest_ptr, w_ptr, valid_ptr, out_ptr, hidden, out_stride,
                        K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    valid = tl.load(valid_ptr)
    if row < valid:
        k = tl.arange(0, BLOCK_K)
        kmask = k < K
        base = row.to(tl.int64) * K
        d = tl.load(dest_ptr + base + k, mask=kmask, other=-1)
        ok = d >= 0
        w = tl.where(ok, tl.load(w_ptr + base + k, mask=ok, other=0.0).to(tl.float32), 0.0)
        d64 = tl.where(ok, d, 0).to(tl.int64)
        dst = out_ptr + row.to(tl.int64) * out_stride
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            cmask = cols < hidden
            vals = tl.load(y_ptr + d64[:, None] * hidden + cols[None, :], mask=ok[:, None] & cmask[None, :],
                           other=0.0).to(tl.float32)
            tl.store(dst + cols, tl.sum(vals * w[:, None], axis=0).to(tl.bfloat16), mask=cmask)


def pack_tokens_triton(rows: torch.Tensor, scales: Optional[torch.Tensor], ids: torch.Tensor, valid: torch.Tensor,
                       num_local_experts: int, capacity: int
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Same contract as ``pack_tokens_torch`` (one launch); slots past ``counts`` are left untouched."""
    num_rows, hidden = rows.shape
    topk = ids.shape[1]
    device = rows.device
    expert_x = torch.empty((num_local_experts, capacity, hidden), dtype=rows.dtype, device=device)
    expert_sf = None
    if scales is not None:
        expert_sf = torch.empty((num_local_experts, scales.shape[1], capacity), dtype=scales.dtype,
                                device=device).transpose(1, 2)  # DeepEP's layout: token dimension contiguous
    dest = torch.empty((num_rows, topk), dtype=torch.int32, device=device)
    counts = torch.empty((num_local_experts,), dtype=torch.int32, device=device)
    if num_rows == 0 or num_local_experts == 0:
        return expert_x, expert_sf, dest.fill_(-1), counts.zero_()
    raw = _RAW[rows.element_size()]  # copy bits: bf16 and fp8 alike
    src = rows.view(raw)
    if src.stride(1) != 1:
        src = src.contiguous()
    ids = ids if ids.is_contiguous() else ids.contiguous()
    width = src.shape[1]
    sf, out_sf = (scales, expert_sf) if scales is not None else (src, expert_x)  # unused without scales
    groups = scales.shape[1] if scales is not None else 1
    _pack_tokens_kernel[(num_rows + num_local_experts,)](
        ids, valid, src, expert_x.view(raw), sf, out_sf, dest, counts, num_rows, num_local_experts, capacity, width,
        groups,
        src.stride(0), sf.stride(0), sf.stride(1) if sf.dim() > 1 else 1,
        out_sf.stride(0), out_sf.stride(1), out_sf.stride(2),
        K=topk, BLOCK_K=triton.next_power_of_2(topk), CHUNK=_CHUNK, BLOCK_W=min(_BLOCK_H, triton.next_power_of_2(width)),
        BLOCK_G=triton.next_power_of_2(groups), HAS_SF=scales is not None, num_warps=8)
    return expert_x, expert_sf, dest, counts


def fold_tokens_triton(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """Same contract as ``fold_tokens_torch`` for the valid rows; rows past ``valid`` are left uninitialised
    (``ElasticBuffer.combine`` never reads them)."""
    hidden = y.shape[-1]
    num_rows, topk = dest.shape
    out = torch.empty((num_rows, hidden), dtype=torch.bfloat16, device=y.device)
    if num_rows == 0:
        return out
    if not y.is_contiguous():
        y = y.contiguous()
    weights = weights if weights.is_contiguous() else weights.contiguous()
    _fold_tokens_kernel[(num_rows,)](y, dest, weights, valid, out, hidden, out.stride(0), K=topk,
                                     BLOCK_K=triton.next_power_of_2(topk),
                                     BLOCK_H=min(_BLOCK_H, triton.next_power_of_2(hidden)))
    return out
