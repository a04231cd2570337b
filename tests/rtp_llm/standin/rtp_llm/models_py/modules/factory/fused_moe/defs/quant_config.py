"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/modules/factory/fused_moe/defs/quant_config.py``:
``FusedMoEQuantConfig``, the activation quantisation a MoE strategy hands its router and executor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

QuantDtype = Union[None, torch.dtype, str]


@dataclass
class FusedMoEQuantConfig:
    """``quant_dtype`` None: bf16; ``float8_e4m3fn`` with ``block_shape`` [128, 128]: FP8 per block; with
    ``per_act_token_quant``: FP8 per token; ``uint8`` with block [16, 16]: FP4 per group."""

    quant_dtype: QuantDtype = None
    per_act_token_quant: bool = False
    per_out_ch_quant: bool = False
    block_shape: Optional[list[int]] = None

    def __post_init__(self) -> None:
        assert not self.per_act_token_quant or self.block_shape is None, "illegal quantization"

    def __str__(self) -> str:
        if not self.is_quantized:
            return "FusedMoEQuantConfig(no_quant)"
        dtype = str(self.quant_dtype).replace("torch.", "") if isinstance(self.quant_dtype, torch.dtype) \
            else str(self.quant_dtype)
        parts = [dtype]
        if self.per_act_token_quant:
            parts.append("per_token")
        elif self.is_block_quantized:
            parts.append(f"per_block{self.block_shape}")
        else:
            parts.append("per_tensor")
        if self.per_out_ch_quant:
            parts.append("per_out_ch")
        return f"FusedMoEQuantConfig({', '.join(parts)})"

    @property
    def is_quantized(self) -> bool:
        return self.quant_dtype is not None

    @property
    def is_per_act_token(self) -> bool:
        return self.per_act_token_quant

    @property
    def is_block_quantized(self) -> bool:
        return self.block_shape is not None

    @property
    def is_per_tensor(self) -> bool:
        return not self.per_act_token_quant and self.block_shape is None

    @property
    def is_per_group_fp4(self) -> bool:
        return self.quant_dtype == torch.uint8 and self.block_shape[0] == 16

    def scale_shape(self, max_tokens: int, hidden_dim: int) -> Optional[tuple[int, int]]:
        if not self.is_quantized:
            return None
        if self.is_block_quantized:
            assert self.block_shape is not None
            _, block_k = self.block_shape
            return (max_tokens, (hidden_dim + block_k - 1) // block_k)
        return (max_tokens, 1) if self.is_per_act_token else (1, 1)

    def batched_scale_shape(self, num_experts: int, max_tokens: int,
                            hidden_dim: int) -> Optional[tuple[int, int, int]]:
        if not self.is_quantized:
            return None
        scale_shape = self.scale_shape(max_tokens, hidden_dim)
        assert scale_shape is not None
        return (num_experts, *scale_shape)
