"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/modules/factory/fused_moe/defs/type.py``."""

from enum import Enum


class RouterType(Enum):
    """Router implementation type, ordered by communication efficiency (higher is better)."""

    BATCHED_DATA = 0
    DEEPGEMM_CONTINUOUS = 1
    DEEPEP_NORMAL = 2
    DEEPEP_LOW_LATENCY = 4
    PURE_TP = 5
    MORI_EP_INTRANODE = 6
    MORI_EP_INTERNODE = 7


class ExecutorType(Enum):
    """Executor implementation type, ordered by computation efficiency (higher is better)."""

    BATCHED_TRITON = 0
    FUSED_MOE = 2
    DEEPGEMM_CONTINUOUS = 1
    DEEPGEMM_MASKED = 2
    CUTLASS_FP8 = 3
    CUTLASS_BATCHED_FP8 = 4
    CUTLASS_W4A8_INT4_PER_CHANNEL = 5
    CUTLASS_BATCHED_W4A8_INT4_PER_CHANNEL = 6
    TRTLLM_FP4 = 7
    CUTEDSL_FP4 = 8
