"""How big each buffer is and how it is built, from the provider's own size hints (never a flat constant).

* legacy normal: ``num_nvl_bytes`` = max of the dispatch and combine ``Config`` NVL hints for the rank count
  (sized for bf16, which also covers FP8 payloads); ``num_rdma_bytes`` from the RDMA hints when internode;
* legacy low-latency: ``Buffer.get_low_latency_rdma_size_hint(N, H, R, E)`` and ``num_qps_per_rank = E // R``;
* elastic: ``ElasticBuffer.get_buffer_size_hint(group, M, H, K, fp8, hybrid, multiple_reduction)``.

Every plan sets ``explicitly_destroy=True`` so :meth:`DeepEPWrapper.reset` can free memory collectively instead
of leaving it to a destructor at interpreter exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from .backend import Backend
from .config import DeepEPMode, DeepepWrapperConfig
from .providers import Provider
from .settings import SwitchSettings


@dataclass(frozen=True)
class BufferPlan:
    """A buffer about to be built.

    Attributes:
        backend: which class to build.
        kwargs: constructor keyword arguments (the group is passed separately).
        bytes: what the hints asked for, by pool ("nvl", "rdma", or "elastic").
        capacity: tokens per rank per dispatch the buffer accepts (None = no fixed limit, legacy normal).
    """

    backend: Backend
    kwargs: dict[str, Any]
    bytes: dict[str, int]
    capacity: Optional[int]


def plan_legacy(provider: Provider, config: DeepepWrapperConfig, settings: SwitchSettings) -> BufferPlan:
    """Size a ``Buffer`` for ``config.mode``. Raises ValueError for rank counts DeepEP has no config for."""
    ranks, hidden, experts = config.ep_size, config.hidden_size, config.expert_num
    if settings.num_sms:
        provider.Buffer.set_num_sms(settings.num_sms)  # class-wide in DeepEP: one value per process
    if config.mode is DeepEPMode.LOW_LATENCY:
        tokens = config.ll_num_max_token_per_rank
        rdma = int(provider.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, ranks, experts))
        kwargs = dict(num_nvl_bytes=0, num_rdma_bytes=rdma, low_latency_mode=True,
                      num_qps_per_rank=experts // ranks, allow_nvlink_for_low_latency_mode=True,
                      explicitly_destroy=True)
        return BufferPlan(Backend.LEGACY, kwargs, {"rdma": rdma}, tokens)
    try:
        configs = [provider.Buffer.get_dispatch_config(ranks), provider.Buffer.get_combine_config(ranks)]
    except AssertionError as exc:
        raise ValueError(f"legacy normal mode has no DeepEP config for ep_size={ranks}: {exc}") from exc
    hidden_bytes = hidden * 2  # bf16 sizing also fits FP8 rows and their scales
    nvl = max(int(c.get_nvl_buffer_size_hint(hidden_bytes, ranks)) for c in configs)
    rdma = max(int(c.get_rdma_buffer_size_hint(hidden_bytes, ranks)) for c in configs) if config.use_deepep_internode else 0
    qps = max(1, provider.Buffer.num_sms // 2) if config.use_deepep_internode else 1
    kwargs = dict(num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=False, num_qps_per_rank=qps,
                  explicitly_destroy=True)
    return BufferPlan(Backend.LEGACY, kwargs, {"nvl": nvl, "rdma": rdma}, None)


def elastic_capacity(config: DeepepWrapperConfig, settings: SwitchSettings) -> int:
    """M, the ElasticBuffer's tokens per rank: the LL budget, or the normal-mode capacity (setting wins)."""
    if config.mode is DeepEPMode.LOW_LATENCY:
        return config.ll_num_max_token_per_rank
    return settings.max_tokens_per_rank or config.max_tokens_per_rank


def plan_elastic(provider: Provider, group: dist.ProcessGroup, config: DeepepWrapperConfig,
                 settings: SwitchSettings) -> BufferPlan:
    """Size an ``ElasticBuffer``. ``get_buffer_size_hint`` reads the group's NCCL communicator."""
    if provider.ElasticBuffer is None:
        raise RuntimeError("this deep_ep has no ElasticBuffer")
    tokens = elastic_capacity(config, settings)
    num_bytes = int(provider.ElasticBuffer.get_buffer_size_hint(
        group, tokens, config.hidden_size, num_topk=config.moe_k, use_fp8_dispatch=config.use_fp8_dispatch,
        allow_hybrid_mode=settings.elastic_allow_hybrid,
        allow_multiple_reduction=settings.elastic_allow_multiple_reduction))
    kwargs = dict(num_bytes=num_bytes, num_max_tokens_per_rank=tokens, hidden=config.hidden_size,
                  num_topk=config.moe_k, use_fp8_dispatch=config.use_fp8_dispatch,
                  deterministic=settings.elastic_deterministic, allow_hybrid_mode=settings.elastic_allow_hybrid,
                  allow_multiple_reduction=settings.elastic_allow_multiple_reduction,
                  prefer_overlap_with_compute=settings.elastic_prefer_overlap, explicitly_destroy=True)
    return BufferPlan(Backend.ELASTIC, kwargs, {"elastic": num_bytes}, tokens)
