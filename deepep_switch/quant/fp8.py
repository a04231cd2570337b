"""FP8 (e4m3) per-token, per-128-channel quantisation with DeepEP's recipe.

DeepEP's low-latency dispatch quantises inside its kernel: ``amax = max(1e-4, max|x|)`` over each group of 128
channels, ``scale_inv = amax / 448`` (or the next power of two with ``round_scale``), ``x_fp8 = sat(x * 448/amax)``.
The reference providers and the elastic routers use these functions so both backends hand the executor the same
kind of FP8 payload.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128
AMAX_FLOOR = 1e-4


def _pow2_ceil_exponent(v: torch.Tensor) -> torch.Tensor:
    """``ceil(log2(v))`` for positive normal float32 ``v``, from the exponent bits (as DeepEP's kernel does)."""
    bits = v.contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    return exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    return ((e + 127).to(torch.int32) << 23).view(torch.float32)


def quantize_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` per token and per 128 channels.

    Args:
        x: ``[..., H]`` bf16/fp32, H a multiple of 128.
        round_scale: round each scale up to a power of two (DeepEP ``round_scale=True``).

    Returns:
        ``(x_fp8 [..., H] float8_e4m3fn, scale_inv [..., H/128] float32)`` with ``x ≈ x_fp8 * scale_inv``.
    """
    hidden = x.shape[-1]
    if hidden % GROUP:
        raise ValueError(f"FP8 quantisation needs hidden % {GROUP} == 0, got {hidden}")
    groups = x.float().reshape(*x.shape[:-1], hidden // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    if round_scale:
        e = _pow2_ceil_exponent(amax * (1.0 / FP8_MAX))
        scale_inv, scale = _pow2(e), _pow2(-e)
    else:
        # A true division (one rounding), as DeepEP's kernel does; ``FP8_MAX / amax`` in torch would compute
        # ``reciprocal(amax) * FP8_MAX`` (two roundings).
        scale_inv, scale = amax * (1.0 / FP8_MAX), torch.div(torch.full_like(amax, FP8_MAX), amax)
    q = (groups * scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(x.shape), scale_inv


def dequantize_fp8(x_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` fp8 and ``[..., H/128]`` float32 scales -> ``[..., H]`` float32."""
    hidden = x_fp8.shape[-1]
    groups = x_fp8.float().reshape(*x_fp8.shape[:-1], hidden // GROUP, GROUP)
    return (groups * scale_inv.float().unsqueeze(-1)).reshape(x_fp8.shape)
