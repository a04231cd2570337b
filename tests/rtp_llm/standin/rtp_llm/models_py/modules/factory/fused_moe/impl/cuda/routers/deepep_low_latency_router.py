"""Stand-in for alibaba/rtp-llm@4b8d39cd
``rtp_llm/models_py/modules/factory/fused_moe/impl/cuda/routers/deepep_low_latency_router.py``.

The module, its constants and the class name, not rtp-llm's implementation (which drives ``deep_ep.Buffer``'s
low-latency kernels directly): ``routers.rtp_llm.install()`` binds deepep-switch's ``DeepEpLowLatencyRouter(config,
quant_config)`` (with ``_ll_num_max_token_per_rank``) under this name. Until then, building the placeholder says so.
"""

from __future__ import annotations

from typing import Any

from rtp_llm.models_py.modules.factory.fused_moe.defs.fused_moe import FusedMoeDataRouter
from rtp_llm.models_py.modules.factory.fused_moe.defs.type import RouterType

DEEPEP_QUANT_BLOCK_SIZE = 128
SUPPORTED_HIDDEN_SIZES = [1536, 2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192]


class DeepEpLowLatencyRouter(FusedMoeDataRouter):
    """rtp-llm: ``__init__(self, config, quant_config)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("DeepEpLowLatencyRouter is the rtp-llm stand-in's placeholder: call "
                           "routers.rtp_llm.install() first (then import the router from this module)")

    @classmethod
    def router_type(cls) -> RouterType:
        return RouterType.DEEPEP_LOW_LATENCY

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def finalize(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError
