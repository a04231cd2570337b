"""The dispatch quantisation: one type (:class:`Quant`) for routers, wrapper config and the rtp-llm adapter, with
its kernels in this folder.

* :mod:`.fp8`: DeepEP's FP8 recipe in torch (the reference; also what runs on CPU);
* :mod:`.triton_fp8`: the same recipe in one Triton pass (CUDA).

Adding a format: a member here, its ``quantizer_for`` branch and kernels beside it; routers and backends only see
``Quant`` and the quantiser function it selects.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Callable, Optional, Union

import torch

from ..kernels.select import triton_on_cuda
from .fp8 import dequantize_fp8, quantize_fp8

logger = logging.getLogger("deepep_switch.quant")

Quantized = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
Quantizer = Callable[[torch.Tensor], Quantized]


class Quant(str, Enum):
    """How a router sends hidden states.

    ``FP8_BLOCK`` and ``FP8_BLOCK_POW2`` send float8_e4m3fn with one float32 scale per token per 128 channels
    (DeepEP's recipe: ``scale = max(amax, 1e-4) / 448``); ``POW2`` rounds each scale up to a power of two, for
    GEMMs that consume UE8M0 scales.
    """

    NONE = "none"
    FP8_BLOCK = "fp8_block"
    FP8_BLOCK_POW2 = "fp8_block_pow2"

    @property
    def is_fp8(self) -> bool:
        return self is not Quant.NONE

    @property
    def round_scale(self) -> bool:
        return self is Quant.FP8_BLOCK_POW2

    @classmethod
    def from_flags(cls, use_fp8: bool, round_scale: bool = False) -> "Quant":
        """The member for DeepEP's own pair of flags (``use_fp8``, ``round_scale``)."""
        if not use_fp8:
            if round_scale:
                raise ValueError("round_scale needs use_fp8")
            return cls.NONE
        return cls.FP8_BLOCK_POW2 if round_scale else cls.FP8_BLOCK


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def quantizer_for(quant: Quant, device: torch.device) -> tuple[Optional[str], Quantizer]:
    """``(kernel name, fn)`` applying ``quant`` to bf16 ``[T, H]``: the Triton kernel on CUDA when it compiles,
    else the torch reference; ``(None, identity)`` for ``NONE`` (nothing is compiled then)."""
    if not quant.is_fp8:
        return None, _identity
    round_scale = quant.round_scale

    def build() -> tuple[Optional[str], Quantizer]:
        from .triton_fp8 import quantize_fp8_triton

        quantize_fp8_triton(torch.ones((1, 128), dtype=torch.bfloat16, device=device), round_scale)  # compiles
        return "triton", lambda x: quantize_fp8_triton(x, round_scale)
    return triton_on_cuda(device, build, ("torch", lambda x: quantize_fp8(x, round_scale)), "FP8 quantiser",
                          "using the torch one", logger)


# rtp-llm quant methods whose MoE activations are FP8 (they size the buffer for FP8 payloads).
RTP_LLM_FP8_METHODS = frozenset({"FP8_PER_BLOCK", "FP8_PER_TENSOR_COMPRESSED", "FP8_DYNAMIC_PER_TENSOR"})


def quant_for_rtp_method(method: Optional[str]) -> Quant:
    """The buffer sizing for rtp-llm's model quant method (``QuantizationConfig.get_method()``)."""
    return Quant.FP8_BLOCK if method in RTP_LLM_FP8_METHODS else Quant.NONE


def quant_for_fused_moe(quant_config: Any, ue8m0_scales: bool, who: str = "router") -> Quant:
    """The dispatch quantisation for rtp-llm's ``FusedMoEQuantConfig``.

    FP8 with block scales maps to ``FP8_BLOCK`` (``FP8_BLOCK_POW2`` when DeepGEMM consumes UE8M0 scales);
    per-token FP8 raises ValueError (it needs ACCL-EP); anything else is sent as bf16.
    """
    if not (quant_config.is_quantized and quant_config.quant_dtype == torch.float8_e4m3fn):
        return Quant.NONE
    if not quant_config.is_block_quantized:
        raise ValueError(f"{who}: deepep-switch sends FP8 with block scales (one per 128 channels) only; "
                         f"per-token FP8 dispatch needs ACCL-EP. Got {quant_config}")
    return Quant.from_flags(True, ue8m0_scales)


__all__ = ["Quant", "Quantized", "Quantizer", "dequantize_fp8", "quant_for_fused_moe", "quant_for_rtp_method",
           "quantize_fp8", "quantizer_for"]
