"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/config/py_config_modules.py``: ``PyEnvConfigs``.

``PyEnvConfigs`` with the members the ported tests pass to ``EngineConfig`` (and ``concurrency_config``, which
deepep_test sets); rtp-llm's others (model args, LoRA, VIT, role, EPLB, ...) are left out. rtp-llm reads its
members from the environment and server arguments; here they keep their defaults until a test sets them.
``ServerConfig``, ``LoadConfig``, ``PyMiscellaneousConfig`` and ``KVCacheConfig`` (rtp-llm:
``config/kv_cache_config.py``) are placeholders: the DeepEP path never reads them.
"""

from __future__ import annotations

from rtp_llm.ops import (ArpcConfig, CacheStoreConfig, ConcurrencyConfig, DashScGrpcConfig, DeviceResourceConfig,
                         FfnDisAggregateConfig, FMHAConfig, GrammarConfig, GrpcConfig, HWKernelConfig,
                         MiscellaneousConfig, ModelSpecificConfig, MoeConfig, ParallelismConfig, PDSepConfig,
                         ProfilingDebugLoggingConfig, RuntimeConfig, SpeculativeExecutionConfig)


class ServerConfig:
    """Placeholder (rtp-llm: ports and addresses of the server)."""


class LoadConfig:
    """Placeholder (rtp-llm: checkpoint loading settings)."""


class KVCacheConfig:
    """Placeholder (rtp-llm: ``config/kv_cache_config.py``)."""


class PyMiscellaneousConfig:
    """rtp-llm's Python-side miscellaneous settings; ``EngineConfig`` takes its ``misc_config`` member."""

    def __init__(self) -> None:
        self.misc_config = MiscellaneousConfig()


class PyEnvConfigs:
    """Every config an rtp-llm process reads from its environment (the members ``EngineConfig`` takes)."""

    def __init__(self) -> None:
        self.server_config = ServerConfig()
        self.profiling_debug_logging_config = ProfilingDebugLoggingConfig()
        self.load_config = LoadConfig()
        self.kv_cache_config = KVCacheConfig()
        self.device_resource_config = DeviceResourceConfig()
        self.runtime_config = RuntimeConfig()
        self.pd_separation_config = PDSepConfig()
        self.parallelism_config = ParallelismConfig()
        self.ffn_disaggregate_config = FfnDisAggregateConfig()
        self.model_specific_config = ModelSpecificConfig()
        self.fmha_config = FMHAConfig()
        self.misc_config = PyMiscellaneousConfig()
        self.concurrency_config = ConcurrencyConfig()
        self.moe_config = MoeConfig()
        self.py_hw_kernel_config = HWKernelConfig()
        self.sp_config = SpeculativeExecutionConfig()
        self.cache_store_config = CacheStoreConfig()
        self.arpc_config = ArpcConfig()
        self.grpc_config = GrpcConfig()
        self.dash_sc_grpc_config = DashScGrpcConfig()
        self.grammar_config = GrammarConfig()
