"""MoE routers over deepep-switch: the same payload to the executor whichever DeepEP generation runs.

``NormalRouter`` (prefill) and ``LowLatencyRouter`` (decode, CUDA graphs) follow rtp-llm's
``FusedMoeDataRouter`` signatures; ``routers.rtp_llm`` registers them with rtp-llm when it is importable.
``AutoRouter`` picks one of the two per batch over a wrapper that owns both modes.
"""

from .auto import AutoRouter, ModeChooser
from .base import RouterBase, RouterOptions
from .low_latency import LowLatencyRouter
from .normal import NormalRouter
from .payloads import CombineForwardPayload, ExpertForwardPayload, ExpertTokensMetadata, FinalizeArgs

__all__ = [
    "AutoRouter", "ModeChooser", "CombineForwardPayload", "ExpertForwardPayload", "ExpertTokensMetadata", "FinalizeArgs", "LowLatencyRouter",
    "NormalRouter", "RouterBase", "RouterOptions",
]
