"""One small, bounded collective: every rank learns every rank's vector of integers.

Used for the backend decision and for agreeing on the outcome of buffer construction. It never waits forever:
if a peer does not arrive within ``timeout_s`` (crashed, or stuck before the collective) the caller gets a
:class:`ConsensusTimeout` instead of a hung process.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class ConsensusTimeout(RuntimeError):
    """A decision collective did not complete in time: some rank never joined it."""


def group_size_and_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (the default group when None); ``(1, 0)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _device_for(group: Optional[dist.ProcessGroup]) -> torch.device:
    # NCCL only moves CUDA tensors; every other backend used here (gloo) moves CPU tensors.
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(values: Sequence[int], group: Optional[dist.ProcessGroup], timeout_s: float,
                    what: str = "decision") -> list[list[int]]:
    """All-gather a fixed-length int64 vector from every rank of ``group``.

    Args:
        values: this rank's integers; every rank must pass the same length.
        group: the process group (None = default). Without an initialized torch.distributed the result is
            just ``[list(values)]``.
        timeout_s: seconds to wait before raising :class:`ConsensusTimeout`.
        what: a name for the collective, used in the error message.

    Returns:
        ``table[r]`` = rank r's vector, in group-rank order.
    """
    world, _ = group_size_and_rank(group)
    if world == 1:
        return [list(map(int, values))]
    device = _device_for(group)
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    work = dist.all_gather(gathered, local, group=group, async_op=True)
    deadline = time.monotonic() + timeout_s
    pause = 0.0005
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise ConsensusTimeout(
                f"deepep-switch {what}: not every rank of the {world}-rank group joined within {timeout_s:.0f}s "
                "(a rank crashed or is stuck before the decision); refusing to wait longer")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    work.wait()
    return [t.cpu().tolist() for t in gathered]
