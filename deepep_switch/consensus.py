"""One small, bounded collective: every rank learns every rank's vector of integers.

Used for the backend decision and for agreeing on the outcome of buffer construction. It never waits forever:
if a peer does not arrive within ``timeout_s`` (crashed, or stuck before the collective) the caller gets a
:class:`ConsensusTimeout` (a :class:`~deepep_switch.deadline.CommunicationTimeout`) naming the ranks that never
arrived, instead of a hung process.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .deadline import CommunicationTimeout, Peers, collective_device, group_size_and_rank

__all__ = ["ConsensusTimeout", "all_gather_ints", "group_size_and_rank"]


class ConsensusTimeout(CommunicationTimeout):
    """A decision collective did not complete in time: some rank never joined it."""


def all_gather_ints(values: Sequence[int], group: Optional[dist.ProcessGroup], timeout_s: float,
                    what: str = "decision") -> list[list[int]]:
    """All-gather a fixed-length int64 vector from every rank of ``group``.

    Args:
        values: this rank's integers; every rank must pass the same length.
        group: the process group (None = default). Without an initialized torch.distributed the result is
            just ``[list(values)]``.
        timeout_s: seconds to wait before raising :class:`ConsensusTimeout`.
        what: the operation's name, carried by the error.

    Returns:
        ``table[r]`` = rank r's vector, in group-rank order.
    """
    world, _ = group_size_and_rank(group)
    if world == 1:
        return [list(map(int, values))]
    device = collective_device(group)
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    Peers(group, timeout_s, error=ConsensusTimeout).collective(
        what, lambda: dist.all_gather(gathered, local, group=group, async_op=True))
    return [t.cpu().tolist() for t in gathered]
