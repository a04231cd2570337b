"""MoE routers over deepep-switch: the same payload to the executor whichever DeepEP generation runs.

``NormalRouter`` (prefill) and ``LowLatencyRouter`` (decode, CUDA graphs) follow rtp-llm's
``FusedMoeDataRouter`` signatures; ``routers.rtp_llm`` registers them with rtp-llm when it is importable.
"""

from .base import RouterBase, RouterOptions
from .low_latency import LowLatencyRouter
from .normal import NormalRouter
from .payloads import CombineForwardPayload, ExpertForwardPayload, ExpertTokensMetadata, FinalizeArgs

__all__ = [
    "CombineForwardPayload", "ExpertForwardPayload", "ExpertTokensMetadata", "FinalizeArgs", "LowLatencyRouter",
    "NormalRouter", "RouterBase", "RouterOptions",
]
