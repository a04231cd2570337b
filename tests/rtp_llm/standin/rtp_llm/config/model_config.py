"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/config/model_config.py``: ``ModelConfig``.

rtp-llm's ``ModelConfig`` (a Python subclass of the C++ one) has many more members; these are the ones the
ported tests set and ``MoEConfigAdapter`` / ``DeepepWrapperConfig.from_config_adapter`` / ``init_deepep_wrapper``
read. ``quant_config`` is None unless the model is quantised (rtp-llm: ``model_config.py:567``).
"""

from __future__ import annotations

from typing import Optional

from rtp_llm.config.quant_config import QuantizationConfig


class AttentionConfig:
    """The attention shape members the DeepEP tests set (``head_num`` is read by ``MoEConfigAdapter``)."""

    def __init__(self) -> None:
        self.head_num = 0
        self.size_per_head = 0


class ModelConfig:
    """Model shape: experts, top-k, hidden size, and the quantisation of the checkpoint."""

    def __init__(self) -> None:
        self.expert_num = 0
        self.moe_k = 0
        self.moe_topk_group = 1
        self.hidden_size = 0
        self.data_type = "bf16"
        self.activation_type = "SiGLU"
        self.attn_config = AttentionConfig()
        self.num_layers = 0
        self.max_seq_len = 0
        self.vocab_size = 0
        self.quant_config: Optional[QuantizationConfig] = None
