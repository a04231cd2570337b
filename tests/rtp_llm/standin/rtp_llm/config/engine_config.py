"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/config/engine_config.py``: ``EngineConfig``.

The dataclass with rtp-llm's 21 required fields in rtp-llm's order, so the ported tests build it with the same
21 keyword arguments. ``init_deepep_wrapper`` reads ``parallelism_config``, ``moe_config``,
``runtime_config.max_generate_batch_size``, ``sp_config.{type, gen_num_per_cycle}`` and
``hw_kernel_config.enable_cuda_graph``. ``EngineConfig.create(py_env_configs, ...)`` (server argument parsing,
PD separation setup) is not mirrored; of it the ported speculative test needs only
``runtime_config.max_generate_batch_size = concurrency_config.concurrency_limit`` (``engine_config.py:245``),
which it does by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtp_llm.config.py_config_modules import KVCacheConfig, LoadConfig, ServerConfig
from rtp_llm.ops import (ArpcConfig, CacheStoreConfig, ConcurrencyConfig, DashScGrpcConfig, DeviceResourceConfig,
                         FMHAConfig, GrammarConfig, GrpcConfig, HWKernelConfig, MiscellaneousConfig,
                         ModelSpecificConfig, MoeConfig, NcclCommConfig, ParallelismConfig, PDSepConfig,
                         ProfilingDebugLoggingConfig, RuntimeConfig, SpeculativeExecutionConfig)


@dataclass
class EngineConfig:
    """Engine configuration collection (rtp-llm: created from ``PyEnvConfigs``)."""

    parallelism_config: ParallelismConfig
    runtime_config: RuntimeConfig
    nccl_comm_config: NcclCommConfig
    server_config: ServerConfig
    pd_sep_config: PDSepConfig
    concurrency_config: ConcurrencyConfig
    fmha_config: FMHAConfig
    kv_cache_config: KVCacheConfig
    profiling_debug_logging_config: ProfilingDebugLoggingConfig
    hw_kernel_config: HWKernelConfig
    device_resource_config: DeviceResourceConfig
    moe_config: MoeConfig
    model_specific_config: ModelSpecificConfig
    sp_config: SpeculativeExecutionConfig
    cache_store_config: CacheStoreConfig
    misc_config: MiscellaneousConfig
    arpc_config: ArpcConfig
    grpc_config: GrpcConfig
    dash_sc_grpc_config: DashScGrpcConfig
    grammar_config: GrammarConfig
    load_config: LoadConfig
