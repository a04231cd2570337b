"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/distributed/deepep_wrapper.py``.

rtp-llm's own DeepEP wrapper, rewritten: ``DeepEPMode``, ``DeepepWrapperConfig`` (18 fields, ``from_config_adapter``,
``equal``, ``calc_low_latency_max_token_per_rank``), the ``DeepEPWrapper`` singleton (``create`` / ``get_instance``
/ ``reset``, one ``deep_ep.Buffer`` in NORMAL or LOW_LATENCY mode) and ``init_deepep_wrapper(engine_config,
model_config)``. ``routers.rtp_llm.install()`` replaces ``DeepEPWrapper``, ``DeepepWrapperConfig``, ``DeepEPMode``
and ``init_deepep_wrapper`` in this module with deepep-switch's; the ported tests call it first, as an engine would.

``DeepEPBuffer`` / ``DeepEPConfig`` alias DeepEP's ``Buffer`` / ``Config`` as in rtp-llm, with one difference:
they come from the provider deepep-switch is told to use (``DEEPEP_SWITCH_PROVIDER``, default ``deep_ep``):
``deep_ep``'s when that is the provider and it imports, else the reference providers' ``ReferenceBuffer`` /
``ReferenceConfig`` (pure PyTorch, CPU). Not mirrored: the ACCL-only M2N buffer (``LOW_LATENCY_M2N`` raises, as
rtp-llm does on a provider without it), rtp-llm's ``_DeepEPUnavailable`` stubs (the reference providers take
their place), and the ``feat/dsv4_on_dev_sleep`` lifecycle (``destroy_buffer`` / ``rebuild_buffer``), which exists
here only as deepep-switch's after ``install()``.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import threading
from dataclasses import dataclass
from enum import IntEnum, auto
from typing import Any, Optional

import torch
from torch.distributed import ProcessGroup

from rtp_llm.config.engine_config import EngineConfig
from rtp_llm.config.model_config import ModelConfig
from rtp_llm.config.quant_config import QuantizationConfig
from rtp_llm.models_py.modules.factory.fused_moe.defs.config_adapter import MoEConfigAdapter
from rtp_llm.models_py.utils.arch import is_sm10x
from rtp_llm.ops import SpeculativeType


def _provider_classes() -> tuple[Any, Any]:
    """``(Buffer, Config)`` of the provider deepep-switch uses (see the module docstring)."""
    from deepep_switch.settings import PROVIDER_ENV

    if os.environ.get(PROVIDER_ENV, "deep_ep").strip().lower() == "deep_ep":
        try:
            from deep_ep import Buffer, Config

            return Buffer, Config
        except ImportError:
            pass
    from deepep_switch.providers.reference import ReferenceBuffer, ReferenceConfig

    return ReferenceBuffer, ReferenceConfig


DeepEPBuffer, DeepEPConfig = _provider_classes()

__all__ = ["DeepepWrapperConfig", "DeepEPWrapper", "DeepEPBuffer", "DeepEPConfig", "DeepEPMode", "use_accl_ep",
           "allow_mnnvl", "init_deepep_wrapper"]


def use_accl_ep() -> bool:
    """rtp-llm: every non-ROCm device uses ACCL-EP's extra Buffer arguments (no ROCm here)."""
    return True


def allow_mnnvl() -> bool:
    """Multi-node NVLink: aarch64 Blackwell only."""
    return "aarch64" in platform.machine() and is_sm10x()


class DeepEPMode(IntEnum):
    """The mode of deep_ep."""

    NORMAL = auto()
    LOW_LATENCY = auto()
    LOW_LATENCY_M2N = auto()


@dataclass
class DeepepWrapperConfig:
    """The parameters that size and shape the one DeepEP buffer of a process."""

    ep_rank: int
    ep_size: int
    tp_size: int
    local_rank: int
    world_size: int
    hidden_size: int
    expert_num: int
    moe_k: int
    deep_ep_num_sm: int
    use_deepep_low_latency: bool
    use_deepep_internode: bool
    ll_num_max_token: int
    enable_ffn_disaggregate: bool = False
    attention_tp_size: int = 0
    attention_dp_size: int = 0
    ffn_tp_size: int = 0
    ffn_dp_size: int = 0
    ll_num_max_token_per_rank: int = 0

    @classmethod
    def from_config_adapter(cls, config_adapter: MoEConfigAdapter,
                            ll_num_max_token_per_rank: int = 0) -> "DeepepWrapperConfig":
        """Read the fields off a ``MoEConfigAdapter``; ``tp_size`` is the raw parallelism TP size."""
        model, parallel, moe = config_adapter.model_config, config_adapter.parallelism_config, config_adapter.moe_config
        ffn = parallel.ffn_disaggregate_config
        return cls(
            ep_rank=parallel.ep_rank, ep_size=parallel.ep_size, tp_size=parallel.tp_size,
            local_rank=parallel.local_rank, world_size=parallel.world_size,
            hidden_size=model.hidden_size, expert_num=model.expert_num, moe_k=model.moe_k,
            deep_ep_num_sm=moe.deep_ep_num_sm, use_deepep_low_latency=moe.use_deepep_low_latency,
            use_deepep_internode=moe.use_deepep_internode, ll_num_max_token=config_adapter.ll_num_max_token,
            enable_ffn_disaggregate=ffn.enable_ffn_disaggregate if ffn else False,
            attention_tp_size=ffn.attention_tp_size if ffn else 0,
            attention_dp_size=ffn.attention_dp_size if ffn else 0,
            ffn_tp_size=ffn.ffn_tp_size if ffn else 0, ffn_dp_size=ffn.ffn_dp_size if ffn else 0,
            ll_num_max_token_per_rank=ll_num_max_token_per_rank)

    def equal(self, other: "DeepepWrapperConfig") -> bool:
        """All 18 fields equal."""
        names = ("ep_rank", "ep_size", "tp_size", "local_rank", "world_size", "hidden_size", "expert_num", "moe_k",
                 "deep_ep_num_sm", "use_deepep_low_latency", "use_deepep_internode", "ll_num_max_token",
                 "enable_ffn_disaggregate", "attention_tp_size", "attention_dp_size", "ffn_tp_size", "ffn_dp_size",
                 "ll_num_max_token_per_rank")
        return all(getattr(self, n) == getattr(other, n) for n in names)

    @staticmethod
    def calc_low_latency_max_token_per_rank(ll_num_max_token: int, tp_size: int,
                                            quant_config: Optional[QuantizationConfig]) -> int:
        """Per-rank low-latency capacity: ``ceil(n / tp)`` bucketed (DeepGEMM's masked GEMM is wrong below 64
        rows): above 128 up to a multiple of 128; else the first bucket that fits, [64, 128] (only [128] with
        MNNVL) for bf16 / FP8 per block / FP4, 16..128 in steps of 8 for per-token methods."""
        per_rank = (ll_num_max_token + tp_size - 1) // tp_size
        method = quant_config.get_method() if quant_config is not None else None
        is_quantized = quant_config is not None and quant_config.is_quanted()
        if not is_quantized or method in ("FP8_PER_BLOCK", "modelopt_fp4"):
            buckets = [128] if allow_mnnvl() else [64, 128]
        elif method in ("FP8_PER_TENSOR_COMPRESSED", "FP8_DYNAMIC_PER_TENSOR", "W4A8_INT4_PER_CHANNEL",
                        "W4A8_INT4_PER_CHANNEL_COMPRESSED"):
            buckets = list(range(16, 129, 8))
        else:
            raise ValueError("Unsupported quantization config")
        if per_rank > 128:
            return (per_rank + 127) // 128 * 128
        return next((b for b in buckets if per_rank <= b), 128)


class DeepEPWrapper:
    """The process's one DeepEP buffer, a thread-safe singleton built by :meth:`create`."""

    _instance: Optional["DeepEPWrapper"] = None
    _lock = threading.Lock()
    _initialized = False

    def __init__(self, group: ProcessGroup, config: DeepepWrapperConfig) -> None:
        self._config = config
        self._use_accl_ep = use_accl_ep()
        self._mode, self._buffer = self._init_deepep_buffer(group)

    @classmethod
    def supported(cls) -> bool:
        """rtp-llm: ``import deep_ep`` works. Here: the provider's Buffer class exists (always, with the
        reference providers)."""
        return DeepEPBuffer is not None

    @classmethod
    def is_initialized(cls) -> bool:
        return cls._initialized

    @classmethod
    def get_instance(cls, config: DeepepWrapperConfig) -> "DeepEPWrapper":
        """The created wrapper; raises if there is none or its config differs. Never creates one."""
        with cls._lock:
            if not cls._initialized:
                raise RuntimeError("DeepEPWrapper is not initialized. Call init_deepep_wrapper first.")
            if cls._instance is None:
                raise RuntimeError("DeepEP state is inconsistent, _initialized is True but _instance is None")
            if not cls._instance._config.equal(config):
                raise RuntimeError(f"DeepEP already initialized with different config, origin: "
                                   f"{cls._instance._config}, new: {config}")
            return cls._instance

    @staticmethod
    def create(config: DeepepWrapperConfig) -> None:
        """Build the wrapper over WORLD (collective); a second call with an equal config only warns."""
        if not torch.distributed.is_initialized():
            raise RuntimeError("Distributed environment is not initialized")
        with DeepEPWrapper._lock:
            if DeepEPWrapper._initialized:
                if DeepEPWrapper._instance is None:
                    raise RuntimeError("DeepEP state is inconsistent, _initialized is True but _instance is None")
                if not DeepEPWrapper._instance._config.equal(config):
                    raise RuntimeError(f"DeepEP already initialized with different config, origin: "
                                       f"{DeepEPWrapper._instance._config}, new: {config}")
                logging.warning("DeepEP already initialized with the same config")
                return
            if DeepEPWrapper._instance is not None:
                raise RuntimeError("DeepEP state is inconsistent, _initialized is False but _instance is not None")
            DeepEPWrapper._instance = DeepEPWrapper(torch.distributed.group.WORLD, config)
            DeepEPWrapper._initialized = True

    @classmethod
    def reset(cls) -> None:
        """Drop the singleton and its buffer (tests)."""
        with cls._lock:
            if cls._instance is not None:
                cls._instance._destroy_buffer()
                cls._instance = None
            cls._initialized = False

    @property
    def buffer(self) -> Any:
        if self._buffer is None:
            raise RuntimeError("DeepEP buffer is not initialized")
        return self._buffer

    @property
    def mode(self) -> DeepEPMode:
        return self._mode

    @property
    def config(self) -> DeepepWrapperConfig:
        return self._config

    @property
    def ep_rank(self) -> int:
        return self._config.ep_rank

    @property
    def ep_size(self) -> int:
        return self._config.ep_size

    @property
    def hidden_size(self) -> int:
        return self._config.hidden_size

    @property
    def num_experts(self) -> int:
        return self._config.expert_num

    @property
    def num_topk(self) -> int:
        return self._config.moe_k

    @property
    def ll_num_max_token_per_rank(self) -> int:
        return self._config.ll_num_max_token_per_rank

    @property
    def num_sms(self) -> int:
        return self._config.deep_ep_num_sm

    @property
    def use_accl_ep(self) -> bool:
        return self._use_accl_ep

    def _init_deepep_buffer(self, group: ProcessGroup) -> tuple[DeepEPMode, Any]:
        config = self._config
        if config.use_deepep_low_latency and config.enable_ffn_disaggregate:
            raise RuntimeError(f"[rank: {config.ep_rank}] init deep_ep buffer failed, current deep_ep provider does "
                               f"not support use_deepep_low_latency and enable_ffn_disaggregate")
        if config.use_deepep_low_latency:
            return DeepEPMode.LOW_LATENCY, self._init_low_latency_buffer(group)
        if not config.enable_ffn_disaggregate:
            return DeepEPMode.NORMAL, self._init_normal_buffer(group)
        raise RuntimeError(f"[rank: {config.ep_rank}] init deep_ep buffer failed, unsupported configuration: "
                           f"use_deepep_low_latency={config.use_deepep_low_latency}, "
                           f"enable_ffn_disaggregate={config.enable_ffn_disaggregate}")

    def _init_normal_buffer(self, group: ProcessGroup) -> Any:
        """2 GB of NVL buffer (plus 1 GB RDMA and ``deep_ep_num_sm // 2`` QPs internode)."""
        config = self._config
        num_rdma_bytes, num_qps_per_rank = 0, 1
        if config.use_deepep_internode:
            num_rdma_bytes = int(1e9)
            if os.environ.get("ACCL_NORMAL_MODE", "IBRC") == "IBGDA":
                os.environ["ACCL_NORMAL_MODE"] = "IBGDA"
                num_qps_per_rank = max(config.deep_ep_num_sm // 2, int(config.expert_num / config.ep_size))
            else:
                os.environ["ACCL_NORMAL_MODE"] = "IBRC"
                num_qps_per_rank = config.deep_ep_num_sm // 2
        kwargs: dict[str, Any] = dict(group=group, num_nvl_bytes=int(2e9), num_rdma_bytes=num_rdma_bytes,
                                      low_latency_mode=False, num_qps_per_rank=num_qps_per_rank)
        if self._use_accl_ep:
            kwargs["allow_nvlink_for_low_latency_mode"] = True
            kwargs["allow_mnnvl"] = allow_mnnvl()
            if kwargs["allow_mnnvl"]:
                kwargs["use_fabric"] = True
        return DeepEPBuffer(**kwargs)

    def _init_low_latency_buffer(self, group: ProcessGroup) -> Any:
        """``get_low_latency_rdma_size_hint(N, H, R, E)`` RDMA bytes, ``E / R`` QPs per rank."""
        config = self._config
        num_rdma_bytes = DeepEPBuffer.get_low_latency_rdma_size_hint(
            config.ll_num_max_token_per_rank, config.hidden_size, config.ep_size, config.expert_num)
        kwargs: dict[str, Any] = dict(group=group, num_nvl_bytes=0, num_rdma_bytes=num_rdma_bytes,
                                      low_latency_mode=True, num_qps_per_rank=config.expert_num / config.ep_size,
                                      allow_mnnvl=True)
        if self._use_accl_ep:
            os.environ["ACCL_LOW_LATENCY_OPTIMIZE"] = "1"
            kwargs["allow_nvlink_for_low_latency_mode"] = True
            kwargs["allow_mnnvl"] = allow_mnnvl()
        return DeepEPBuffer(**kwargs)

    def _destroy_buffer(self) -> None:
        if self._buffer is not None:
            del self._buffer
            self._buffer = None
        gc.collect()


def init_deepep_wrapper(engine_config: EngineConfig, model_config: ModelConfig) -> None:
    """Build the process's wrapper before the model (collective over WORLD).

    The low-latency capacity is ``calc_low_latency_max_token_per_rank(max_generate_batch_size x
    (gen_num_per_cycle + 1 under speculation), raw tp_size, model quant config)``; the config's own
    ``ll_num_max_token`` stays ``moe_config.ll_num_max_token``.
    """
    if not DeepEPWrapper.supported():
        logging.warning("DeepEP is not supported on this device, skipping initialization")
        return
    hw = engine_config.hw_kernel_config
    adapter = MoEConfigAdapter(model_config=model_config, parallelism_config=engine_config.parallelism_config,
                               moe_config=engine_config.moe_config, quant_config=model_config.quant_config,
                               enable_cuda_graph=hw.enable_cuda_graph if hw is not None else False)
    ll_num_max_token_per_rank = 0
    if engine_config.moe_config.use_deepep_low_latency:
        ll_num_max_token = engine_config.runtime_config.max_generate_batch_size
        if engine_config.sp_config.type != SpeculativeType.NONE:
            ll_num_max_token *= engine_config.sp_config.gen_num_per_cycle + 1
        ll_num_max_token_per_rank = DeepepWrapperConfig.calc_low_latency_max_token_per_rank(
            ll_num_max_token, engine_config.parallelism_config.tp_size, model_config.quant_config)
    DeepEPWrapper.create(DeepepWrapperConfig.from_config_adapter(adapter, ll_num_max_token_per_rank))
