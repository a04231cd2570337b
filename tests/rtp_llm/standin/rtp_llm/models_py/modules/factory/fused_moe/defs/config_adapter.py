"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/modules/factory/fused_moe/defs/config_adapter.py``:
``MoEConfigAdapter``, the one config object routers and executors are built from."""

from __future__ import annotations

from typing import Optional

from rtp_llm.config.model_config import ModelConfig
from rtp_llm.config.quant_config import QuantizationConfig
from rtp_llm.ops import MoeConfig, ParallelismConfig


class MoEConfigAdapter:
    """Shortcuts over the model, parallelism and MoE configs.

    ``tp_size``/``tp_rank`` are the attention-TP view (``get_attn_tp_size()``); ``ll_num_max_token`` is read from
    the ``moe_config`` *argument* (so it must be given); ``quant_config`` is only what the caller passes (the
    routers read the model's through ``model_config.quant_config``).
    """

    def __init__(self, model_config: ModelConfig, parallelism_config: ParallelismConfig,
                 moe_config: Optional[MoeConfig] = None, quant_config: Optional[QuantizationConfig] = None,
                 enable_cuda_graph: bool = False) -> None:
        self.model_config = model_config
        self.parallelism_config = parallelism_config
        self.moe_config = moe_config or MoeConfig()
        self.quant_config = quant_config

        self.ep_size = parallelism_config.ep_size
        self.ep_rank = parallelism_config.ep_rank
        self.tp_size = parallelism_config.get_attn_tp_size()
        self.tp_rank = parallelism_config.get_attn_tp_rank()
        self.dp_size = parallelism_config.dp_size
        self.dp_rank = parallelism_config.dp_rank
        self.world_size = parallelism_config.world_size
        self.local_rank = parallelism_config.local_rank

        self.expert_num = model_config.expert_num
        self.moe_k = model_config.moe_k
        self.moe_topk_group = model_config.moe_topk_group
        self.hidden_size = model_config.hidden_size
        self.data_type = model_config.data_type
        self.head_num = model_config.attn_config.head_num
        self.ll_num_max_token = moe_config.ll_num_max_token
        self.masked_max_token_num = moe_config.masked_max_token_num
        self.moe_strategy = moe_config.moe_strategy
        self.use_mori_ep = moe_config.use_mori_ep
        self.use_deepep_moe = moe_config.use_deepep_moe
        self.enable_cuda_graph = enable_cuda_graph

    @property
    def activation_type(self) -> str:
        return self.model_config.activation_type
