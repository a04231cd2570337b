"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/modules/factory/fused_moe/utils/config_resolver.py``:
``MoeConfigResolver``. ``get_device_type`` and ``is_bf16`` (rtp-llm's device and dtype helpers) are left out."""

from __future__ import annotations

from typing import Optional

from rtp_llm.models_py.modules.factory.fused_moe.defs.config_adapter import MoEConfigAdapter


class MoeConfigResolver:
    """Questions MoE strategies ask about a ``MoEConfigAdapter``."""

    @staticmethod
    def has_quantization(config: MoEConfigAdapter) -> bool:
        return config.model_config.quant_config is not None

    @staticmethod
    def get_quant_method(config: MoEConfigAdapter) -> Optional[str]:
        """The model's quant method name, or None when it is not quantised."""
        if config.model_config.quant_config is None:
            return None
        return config.model_config.quant_config.get_method()

    @staticmethod
    def is_ep_enabled(config: MoEConfigAdapter) -> bool:
        return config.ep_size > 1

    @staticmethod
    def use_low_latency(config: MoEConfigAdapter) -> bool:
        return config.moe_config.use_deepep_low_latency if config.moe_config else False

    @staticmethod
    def is_single_gpu(config: MoEConfigAdapter) -> bool:
        return config.ep_size == 1

    @staticmethod
    def is_tp_equal_ep(config: MoEConfigAdapter) -> bool:
        """Attention TP size (1 under prefill CP) equals EP size."""
        return config.tp_size == config.ep_size

    @staticmethod
    def is_cp_equal_ep(config: MoEConfigAdapter) -> bool:
        """Physical TP size equals EP size."""
        return config.parallelism_config.tp_size == config.ep_size

    @staticmethod
    def is_pure_tp_mode(config: MoEConfigAdapter) -> bool:
        return config.ep_size == 1 and config.dp_size == 1 and config.tp_size >= 1

    @staticmethod
    def use_all_gather(config: MoEConfigAdapter) -> bool:
        return config.moe_config.use_all_gather if config.moe_config else True
