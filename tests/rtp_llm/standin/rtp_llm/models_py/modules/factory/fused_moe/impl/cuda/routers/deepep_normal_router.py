"""Stand-in for alibaba/rtp-llm@4b8d39cd
``rtp_llm/models_py/modules/factory/fused_moe/impl/cuda/routers/deepep_normal_router.py``.

The module and its class names, not rtp-llm's implementations (which drive ``deep_ep.Buffer`` directly): an engine
calls ``routers.rtp_llm.install()`` at start-up, which binds deepep-switch's routers under these names
(``DeepepNormalRouterBase(config, quant_config, expert_alignment)``, ``DeepepNormalRouterNoQuant``,
``DeepepNormalRouterFp8PerBlock``). Until then, building one of these placeholders says so. rtp-llm's per-tensor
FP8, W4A8 and FP4 variants have no deepep-switch counterpart and are not mirrored.
"""

from __future__ import annotations

from typing import Any

from rtp_llm.models_py.modules.factory.fused_moe.defs.fused_moe import FusedMoeDataRouter
from rtp_llm.models_py.modules.factory.fused_moe.defs.type import RouterType


class _NotInstalled(FusedMoeDataRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{type(self).__name__} is the rtp-llm stand-in's placeholder: call "
                           "routers.rtp_llm.install() first (then import the router from this module)")

    @classmethod
    def router_type(cls) -> RouterType:
        return RouterType.DEEPEP_NORMAL

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def finalize(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class DeepepNormalRouterBase(_NotInstalled):
    """rtp-llm: ``__init__(self, config, quant_config, expert_alignment)``."""


class DeepepNormalRouterNoQuant(DeepepNormalRouterBase):
    """rtp-llm: bf16, alignment 1."""


class DeepepNormalRouterFp8PerBlock(DeepepNormalRouterBase):
    """rtp-llm: FP8 per block, alignment 128."""
