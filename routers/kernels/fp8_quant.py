"""DeepEP's FP8 recipe (per token, per 128 channels, ``scale_inv = max(amax, 1e-4) / 448``) in one pass.

:func:`deepep_switch.fp8.quantize_fp8` is the reference (several torch kernels and an fp32 copy of ``x``); the
Triton kernel here reads ``x`` once and writes ``x_fp8`` and the scales, which is what keeps FP8 dispatch on the
elastic path (where DeepEP does not quantise for us) close to the legacy low-latency kernel's in-kernel cast.
:func:`quantizer_for` picks one at router construction.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from deepep_switch.fp8 import quantize_fp8

logger = logging.getLogger("routers.kernels")

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def quantizer_for(device: torch.device, round_scale: bool) -> tuple[str, Quantizer]:
    """``(name, fn)``: the Triton quantiser on CUDA when Triton imports, else the torch reference."""
    if device.type == "cuda":
        try:
            from .triton_fp8_quant import quantize_fp8_triton

            quantize_fp8_triton(torch.ones((1, 128), dtype=torch.bfloat16, device=device), round_scale)  # compiles
        except Exception as exc:  # no Triton, or it cannot build here: correct but slower
            logger.warning("Triton FP8 quantiser unavailable (%s); using the torch one", exc)
        else:
            return "triton", lambda x: quantize_fp8_triton(x, round_scale)
    return "torch", lambda x: quantize_fp8(x, round_scale)
