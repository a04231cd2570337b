"""Triton kernel for :mod:`deepep_switch.quant`: one read of ``x``, one write of ``x_fp8`` and scales."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_GROUP = 128
_GROUPS_PER_PROGRAM = 4


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, num_groups, x_stride, q_stride, s_stride,
                  ROUND_SCALE: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = g[:, None] < num_groups
    v = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-4)
    if ROUND_SCALE:
        bits = (amax * (1.0 / 448.0)).to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale_inv = ((e + 127) << 23).to(tl.float32, bitcast=True)
        scale = ((127 - e) << 23).to(tl.float32, bitcast=True)
    else:
        scale_inv = amax * (1.0 / 448.0)
        scale = tl.fdiv(tl.full(amax.shape, 448.0, tl.float32), amax, ieee_rounding=True)  # IEEE, as torch divides
    q = tl.minimum(tl.maximum(v * scale[:, None], -448.0), 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + row * q_stride + cols, q, mask=mask)
    tl.store(s_ptr + row * s_stride + g, scale_inv, mask=g < num_groups)


def quantize_fp8_triton(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`deepep_switch.quant.fp8.quantize_fp8` for a 2-D CUDA ``x [T, H]``, H % 128 == 0."""
    tokens, hidden = x.shape
    if hidden % _GROUP:
        raise ValueError(f"FP8 quantisation needs hidden % {_GROUP} == 0, got {hidden}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    groups = hidden // _GROUP
    q = torch.empty((tokens, hidden), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((tokens, groups), dtype=torch.float32, device=x.device)
    if tokens:
        grid = (tokens, triton.cdiv(groups, _GROUPS_PER_PROGRAM))
        _quant_kernel[grid](x, q, s, groups, x.stride(0), q.stride(0), s.stride(0), ROUND_SCALE=round_scale,
                            GROUP=_GROUP, GROUPS=_GROUPS_PER_PROGRAM)
    return q, s
