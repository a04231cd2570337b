"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm.ops.compute_ops.trt_fp8_quantize_128``
(``models_py/bindings/cuda/TrtFp8QuantOp.cc`` and ``bindings/cuda/kernels/scaled_fp8_quant.cu``,
``computeFP8Quantize128Kernel``), in PyTorch.

The kernel's recipe, step by step: per row and 128 channels, ``scale = max(1e-4, max|x|) / 448`` in float32;
``x * bf16(1 / scale)`` multiplied in **bf16**; converted to e4m3 with saturation to ±448 (``__nv_fp8x2_e4m3``
saturates to finite). It differs from DeepEP's recipe (``x * (448 / amax)`` in float32) in the last bit of a few
codes.
"""

from __future__ import annotations

import torch

_FP8_MAX = 448.0


def trt_fp8_quantize_128(input: torch.Tensor, col_major_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a bf16 ``[M, K]`` matrix (``K % 128 == 0``) per row and per 128 channels.

    Returns ``(q float8_e4m3fn [M, K], scales float32)``: scales ``[M, K/128]`` row-major, or with
    ``col_major_scale`` a contiguous ``[K/128, M]`` tensor (the op's storage; not transposed back).
    """
    if input.dim() != 2 or input.dtype != torch.bfloat16 or not input.is_contiguous():
        raise ValueError(f"trt_fp8_quantize_128 needs a contiguous 2-D bf16 tensor, got {input.dtype} "
                         f"{tuple(input.shape)}")
    m, k = input.shape
    if k % 128:
        raise ValueError(f"Last dimension must be divisible by 128, got {k}")
    if input.numel() == 0:
        raise ValueError("Input tensor cannot be empty")
    groups = input.view(m, k // 128, 128)
    scale = groups.abs().amax(dim=-1).float().clamp(min=1e-4) / _FP8_MAX      # float32 [M, K/128]
    inverse = (1.0 / scale).to(torch.bfloat16)                                 # (__nv_bfloat16)(1 / scale)
    q = (groups * inverse.unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX)           # bf16 multiply, saturate
    q = q.to(torch.float8_e4m3fn).view(m, k)
    return q, (scale.t().contiguous() if col_major_scale else scale)
