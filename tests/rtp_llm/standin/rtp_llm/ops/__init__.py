"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/ops`` (pybind11 bindings of ``ConfigModules.h``).

The C++ config structs the DeepEP tests and ``init_deepep_wrapper`` touch, as plain Python classes with the
fields they read and rtp-llm's defaults (as recorded from ``ConfigModules.h`` in the research notes:
``MoeConfig.use_deepep_low_latency`` defaults to True, ``RuntimeConfig.max_generate_batch_size`` to 1,
``ConcurrencyConfig.concurrency_limit`` to 32, ``SpeculativeExecutionConfig`` to no speculation with
``gen_num_per_cycle`` 1). Fields the DeepEP path never reads are left out. The remaining ``EngineConfig`` members
(``PDSepConfig`` ... ``GrammarConfig``) are empty placeholders: ``EngineConfig`` requires them, nothing reads them.
"""

from __future__ import annotations

from enum import Enum


class FfnDisAggregateConfig:
    """FFN disaggregation (M2N, ACCL-EP only). ``DeepepWrapperConfig.from_config_adapter`` reads all five fields."""

    def __init__(self) -> None:
        self.enable_ffn_disaggregate = False
        self.attention_tp_size = 1
        self.attention_dp_size = 1
        self.ffn_tp_size = 1
        self.ffn_dp_size = 1


class ParallelismConfig:
    """Sizes and ranks of one process. ``get_attn_tp_size``/``get_attn_tp_rank`` return the raw TP size/rank:
    rtp-llm returns 1/0 under prefill context parallelism, which no ported test enables (not mirrored)."""

    def __init__(self) -> None:
        self.tp_size = 1
        self.ep_size = 1
        self.dp_size = 1
        self.pp_size = 1
        self.world_size = 1
        self.world_rank = 0
        self.local_world_size = 1
        self.local_rank = 0
        self.tp_rank = 0
        self.ep_rank = 0
        self.dp_rank = 0
        self.ffn_disaggregate_config = FfnDisAggregateConfig()

    def get_attn_tp_size(self) -> int:
        return self.tp_size

    def get_attn_tp_rank(self) -> int:
        return self.tp_rank


class MoeConfig:
    """MoE settings (``ConfigModules.h``), with rtp-llm's defaults."""

    def __init__(self) -> None:
        self.use_deepep_moe = False
        self.use_deepep_internode = False
        self.use_deepep_low_latency = True
        self.use_deepep_p2p_low_latency = False
        self.use_mori_ep = False
        self.deep_ep_num_sm = 0
        self.masked_max_token_num = 256
        self.use_all_gather = False
        self.ll_num_max_token = 0
        self.moe_strategy = "auto"


class NcclCommConfig:
    """Where ranks rendezvous: ``init_distributed_environment`` uses ``nccl_ip`` (the ports feed rtp-llm's C++)."""

    def __init__(self, nccl_ip: str = "", tp_nccl_port: int = 0, dp_tp_nccl_port: int = 0,
                 ffn_tp_nccl_port: int = 0) -> None:
        self.nccl_ip = nccl_ip
        self.tp_nccl_port = tp_nccl_port
        self.dp_tp_nccl_port = dp_tp_nccl_port
        self.ffn_tp_nccl_port = ffn_tp_nccl_port


class RuntimeConfig:
    """``max_generate_batch_size``: the decode batch ``init_deepep_wrapper`` sizes the low-latency buffer for."""

    def __init__(self) -> None:
        self.max_generate_batch_size = 1


class ConcurrencyConfig:
    """``concurrency_limit``: ``EngineConfig.create`` copies it into ``max_generate_batch_size``."""

    def __init__(self) -> None:
        self.concurrency_limit = 32


class SpeculativeType(Enum):
    """Speculative decoding kind; ``init_deepep_wrapper`` only asks whether it is ``NONE``. rtp-llm's enum has
    more kinds; ``EAGLE`` stands for the one deepep_test's speculative case sets (``SP_TYPE=eagle``)."""

    NONE = 0
    EAGLE = 1


class SpeculativeExecutionConfig:
    """``type`` and ``gen_num_per_cycle`` (tokens proposed per step): the low-latency budget grows by
    ``gen_num_per_cycle + 1`` under speculation."""

    def __init__(self) -> None:
        self.type = SpeculativeType.NONE
        self.gen_num_per_cycle = 1


class HWKernelConfig:
    """``enable_cuda_graph``: ``init_deepep_wrapper`` passes it to ``MoEConfigAdapter``."""

    def __init__(self) -> None:
        self.enable_cuda_graph = False


class _Unread:
    """An ``EngineConfig`` member the DeepEP path never reads."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PDSepConfig(_Unread):
    pass


class FMHAConfig(_Unread):
    pass


class ProfilingDebugLoggingConfig(_Unread):
    pass


class DeviceResourceConfig(_Unread):
    pass


class ModelSpecificConfig(_Unread):
    pass


class CacheStoreConfig(_Unread):
    pass


class MiscellaneousConfig(_Unread):
    pass


class ArpcConfig(_Unread):
    pass


class GrpcConfig(_Unread):
    pass


class DashScGrpcConfig(_Unread):
    pass


class GrammarConfig(_Unread):
    pass
