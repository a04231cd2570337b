"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/distributed/collective_torch.py``.

rtp-llm's process-group bookkeeping over ``torch.distributed``: ``init_distributed_environment`` (WORLD is the
DP_AND_TP group; one TP group per DP rank and one DP group per TP rank when they are not the whole world),
``_get_group`` (TP -> WORLD when tp == world), ``all_gather`` / ``all_reduce`` / ``broadcast``, and
``destroy_distributed_environment``. Differences, all infrastructure:

* the backend is ``$RTP_LLM_STANDIN_DIST_BACKEND`` (the ported tests set gloo for CPU ranks, nccl for GPU
  ranks), else NCCL when CUDA is available and gloo otherwise (rtp-llm asserts ``backend == "nccl"``);
* the process-group timeout is the caller's ``timeout`` (rtp-llm: 100 years, so a hung peer waits forever);
* when ``torch.distributed`` is already initialised (deepep-switch's ``launch.spawn`` starts every rank with
  WORLD up) only the groups are created, which is rtp-llm's own branch for that case;
* rtp-llm's C++ comm-op registration, CPU TP broadcaster, symmetric memory, user buffers and ROCm RCCL are left
  out (no DeepEP code path uses them).
"""

from __future__ import annotations

import gc
import logging
import os
from datetime import timedelta
from enum import Enum
from typing import Optional, Union

import torch
import torch.distributed

from rtp_llm.ops import NcclCommConfig, ParallelismConfig

logger = logging.getLogger(__name__)


class Group(Enum):
    """Process group types for collective operations."""

    DP = "DP"
    TP = "TP"
    DP_AND_TP = "DP_AND_TP"


_group_map: dict[Union[Group, str], torch.distributed.ProcessGroup] = {}
_parallelism_config: Optional[ParallelismConfig] = None
_initialized = False


def _backend() -> str:
    return os.environ.get("RTP_LLM_STANDIN_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")


def _normalize_parallelism_ranks(parallelism_config: ParallelismConfig) -> None:
    """Process groups use the world-rank layout: ``tp_rank = world_rank % tp``, ``dp_rank = world_rank // tp``."""
    if parallelism_config.tp_size > 0:
        parallelism_config.tp_rank = parallelism_config.world_rank % parallelism_config.tp_size
        parallelism_config.dp_rank = parallelism_config.world_rank // parallelism_config.tp_size


def init_distributed_environment(parallelism_config: ParallelismConfig, nccl_comm_config: NcclCommConfig,
                                 nccl_init_port: int, backend: str = "nccl", timeout: Optional[int] = None) -> None:
    """Initialise WORLD (``tcp://{nccl_ip}:{nccl_init_port}``) unless it is up, then create the DP/TP groups.

    Callable again only after :func:`destroy_distributed_environment`.
    """
    global _parallelism_config, _initialized
    group_timeout = timedelta(seconds=timeout) if timeout else timedelta(days=36500)
    if _initialized and torch.distributed.is_initialized():
        logger.warning("Distributed environment already initialized, skipping initialization")
        if not _group_map:
            _normalize_parallelism_ranks(parallelism_config)
            _create_process_groups(parallelism_config, group_timeout)
        return
    _normalize_parallelism_ranks(parallelism_config)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=_backend(), init_method=f"tcp://{nccl_comm_config.nccl_ip}:{nccl_init_port}",
            world_size=parallelism_config.world_size, rank=parallelism_config.world_rank, timeout=group_timeout)
        torch.distributed.barrier(group=torch.distributed.group.WORLD)
    else:
        logger.info("torch.distributed already initialized, creating process groups")
    _group_map[Group.DP_AND_TP] = torch.distributed.group.WORLD
    _create_process_groups(parallelism_config, group_timeout)
    _parallelism_config = parallelism_config
    _initialized = True


def _create_process_groups(parallelism_config: ParallelismConfig, timeout: timedelta) -> None:
    """DP groups (same tp_rank) and TP groups (same dp_rank); every rank takes part in creating every group."""
    world_rank, world_size = parallelism_config.world_rank, parallelism_config.world_size
    tp_size, dp_size = parallelism_config.tp_size, parallelism_config.dp_size
    if dp_size > 1 and world_size != dp_size:
        for tp_rank in range(tp_size):
            ranks = [r for r in range(world_size) if r % tp_size == tp_rank]
            group = torch.distributed.new_group(ranks=ranks, backend=_backend(), timeout=timeout)
            if world_rank in ranks:
                _group_map[Group.DP.name + str(tp_rank)] = group
            torch.distributed.barrier()
    if tp_size > 1 and world_size != tp_size:
        for dp_rank in range(dp_size):
            ranks = [r for r in range(world_size) if r // tp_size == dp_rank]
            group = torch.distributed.new_group(ranks=ranks, backend=_backend(), timeout=timeout)
            if world_rank in ranks:
                _group_map[Group.TP.name + str(dp_rank)] = group
            torch.distributed.barrier()


def distributed_environment_initialized() -> bool:
    return torch.distributed.is_initialized()


def destroy_distributed_environment() -> None:
    """Destroy WORLD (and with it every group) and forget the groups; init may be called again."""
    global _parallelism_config, _initialized
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _group_map.clear()
    _parallelism_config = None
    _initialized = False
    gc.collect()


def _get_group(group: Group) -> torch.distributed.ProcessGroup:
    """The process group of ``group`` for this rank (TP/DP fall back to WORLD when they span the world)."""
    if not torch.distributed.is_initialized() or not _initialized or _parallelism_config is None:
        raise RuntimeError("Distributed environment is not initialized. "
                           "Call init_distributed_environment(parallelism_config) first.")
    tp_size, dp_size = _parallelism_config.tp_size, _parallelism_config.dp_size
    world_size = _parallelism_config.world_size
    key: Union[Group, str]
    if group == Group.DP and dp_size > 1 and world_size != dp_size:
        key = Group.DP.name + str(torch.distributed.get_rank() % tp_size)
    elif group == Group.TP and tp_size > 1 and world_size != tp_size:
        key = Group.TP.name + str(torch.distributed.get_rank() // tp_size)
    else:
        key = Group.DP_AND_TP
    if key not in _group_map:
        raise ValueError(f"Process group {key} not found. Make sure init_distributed_environment() was called.")
    return _group_map[key]


def broadcast(tensor: torch.Tensor, src: int, group: Group) -> None:
    torch.distributed.broadcast(tensor, src, group=_get_group(group))


def all_reduce(tensor: torch.Tensor, group: Group, *, inplace: bool = False) -> torch.Tensor:
    """Sum over ``group``, in place (``inplace`` matters only for rtp-llm's symmetric-memory path)."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=_get_group(group))
    return tensor


def all_gather(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0: ``[world * N, ...]``."""
    process_group = _get_group(group)
    world_size = torch.distributed.get_world_size(process_group)
    out = torch.zeros([world_size * tensor.shape[0]] + list(tensor.shape)[1:], device=tensor.device,
                      dtype=tensor.dtype)
    torch.distributed.all_gather_into_tensor(out, tensor, group=process_group)
    return out
