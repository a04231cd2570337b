"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/test/utils/numeric_util.py`` (itself copied from DeepGEMM):
the FP8 cast helpers and comparison metrics the DeepEP tests use."""

from __future__ import annotations

import os

import torch


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The next power of two of each (positive) value."""
    assert x.view(-1).amax().item() > 0
    return torch.pow(2.0, torch.ceil(torch.log2(x.abs())))


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and 128 channels: ``sf = max(amax, 1e-4) / 448`` (a power of two with ``use_ue8m0``);
    returns ``(e4m3 [M, N], sf float32 [M, N/128])``. The multiply is by ``1 / sf`` in float32."""
    assert x.dim() == 2 and x.size(1) % 128 == 0
    m, n = x.shape
    x_view = x.view(m, -1, 128)
    sf = x_view.abs().float().amax(dim=2).view(m, -1).clamp(1e-4) / 448.0
    sf = ceil_to_ue8m0(sf) if use_ue8m0 else sf
    return (x_view * (1.0 / sf.unsqueeze(2))).to(torch.float8_e4m3fn).view(m, n), sf


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor, pertoken_quant: bool = False) -> torch.Tensor:
    """Dequantise to bf16: float32 scales per 128 channels (or per token with ``pertoken_quant`` /
    ``ACCL_FP8_CAST_LEVEL=2``); int32 scales are UE8M0 bytes (``byte << 23`` read as float32)."""
    if x_fp8.numel() == 0:
        return x_fp8.to(torch.bfloat16)
    assert x_fp8.dim() == 2
    m, n = x_fp8.shape
    per_token = os.getenv("ACCL_FP8_CAST_LEVEL", "1") == "2" or pertoken_quant
    padded = torch.nn.functional.pad(x_fp8, (0, align(n, 128) - n), mode="constant", value=0)
    if x_scales.dtype == torch.int:
        x_scales = x_scales << 23 if per_token else x_scales.view(dtype=torch.uint8).to(torch.int) << 23
        x_scales = x_scales.view(dtype=torch.float)
    if per_token:
        groups = x_fp8.to(torch.float32).view(m, -1, n)
    else:
        groups = padded.to(torch.float32).view(m, -1, 128)
    dequant = groups * x_scales.view(m, -1, 1)
    if per_token:
        return dequant.reshape(x_fp8.shape).to(torch.bfloat16).contiguous()
    return dequant.view(padded.shape).to(torch.bfloat16)[:, :n].contiguous()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 Σ(x+1)(y+1) / Σ((x+1)² + (y+1)²)`` in float64: 0 for equal tensors."""
    x, y = x.double() + 1, y.double() + 1
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def hash_tensor(t: torch.Tensor) -> int:
    return t.view(torch.int64).sum().item()
