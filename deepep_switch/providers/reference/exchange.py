"""Row exchange over torch.distributed, shared by the reference buffers.

Every tensor that travels with a row (hidden states, FP8 scales, ids, weights, source indices) is packed into
one ``uint8`` matrix, so each exchange is a single ``all_to_all_single`` with uneven splits. Bytes travel on
every backend (gloo has no float8 or, in older versions, bfloat16), on CPU (gloo) and GPU (NCCL) alike.

Every collective here goes through :class:`~deepep_switch.deadline.Peers`: it completes within the buffer's
deadline or raises :class:`~deepep_switch.deadline.CommunicationTimeout` naming the operation ("dispatch",
"combine", ...) and the ranks that never arrived, so one rank that fails before communicating makes its peers
raise instead of hang.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ...deadline import Peers


def as_row_bytes(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` (``[N, ...]``, any dtype) as ``[N, bytes_per_row]`` uint8 (a copy if not contiguous)."""
    rows, per_row = t.shape[0], math.prod(t.shape[1:])
    return t.contiguous().reshape(rows, per_row).view(torch.uint8)


def from_row_bytes(b: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`as_row_bytes`: ``[N, nbytes]`` uint8 -> ``[N, *shape]`` of ``dtype``."""
    return b.contiguous().view(dtype).reshape(b.shape[0], *shape)


class RowPack:
    """Packs several per-row tensors side by side into one uint8 matrix and splits them again.

    Args:
        parts: ``(dtype, per-row shape)`` for each packed tensor, in order.
    """

    def __init__(self, parts: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.parts = list(parts)
        self.widths = [torch.empty((1, *shape), dtype=dtype).view(torch.uint8).numel() for dtype, shape in parts]

    @property
    def row_bytes(self) -> int:
        return sum(self.widths)

    def pack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([as_row_bytes(t) for t in tensors], dim=1) if tensors else torch.empty(0)

    def unpack(self, rows: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for (dtype, shape), width in zip(self.parts, self.widths):
            out.append(from_row_bytes(rows[:, start:start + width], dtype, shape))
            start += width
        return out


def token_in_rank(topk_idx: torch.Tensor, num_experts: int, ranks: int) -> torch.Tensor:
    """bool ``[T, R]``: whether token t picked any expert owned by rank r (-1 ids pick none)."""
    local_experts = num_experts // ranks
    owner = torch.where(topk_idx >= 0, topk_idx // local_experts, torch.full_like(topk_idx, ranks))
    in_rank = torch.zeros((topk_idx.shape[0], ranks + 1), dtype=torch.bool, device=topk_idx.device)
    in_rank.scatter_(1, owner, True)
    return in_rank[:, :ranks].contiguous()


def to_local_ids(global_ids: torch.Tensor, rank: int, local_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert ids -> ``(local ids with -1 for experts on other ranks, mask of the ids this rank owns)``."""
    first = rank * local_experts
    owned = (global_ids >= first) & (global_ids < first + local_experts)
    return torch.where(owned, global_ids - first, torch.full_like(global_ids, -1)), owned


def exchange_counts(send_counts: list[int], peers: Peers, device: torch.device, operation: str) -> list[int]:
    """Tell every rank how many rows it will receive from each rank; returns the receive counts.

    ``send_counts[r]`` = rows this rank sends to rank r; the result's ``[s]`` = rows it receives from rank s.
    """
    send = torch.tensor(send_counts, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    peers.collective(operation, lambda: dist.all_to_all_single(recv, send, group=peers.group, async_op=True))
    return [int(v) for v in recv.tolist()]


def exchange_rows(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], peers: Peers,
                  operation: str) -> torch.Tensor:
    """Send ``rows`` (uint8 ``[sum(send_counts), B]``, grouped by destination rank in rank order).

    Returns the received uint8 ``[sum(recv_counts), B]``, grouped by source rank in rank order, each group in
    the order its sender packed it.
    """
    width = rows.shape[1]
    recv = torch.empty((sum(recv_counts), width), dtype=torch.uint8, device=rows.device)
    send = rows.contiguous()
    peers.collective(operation, lambda: dist.all_to_all_single(
        recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=peers.group,
        async_op=True))
    return recv


def all_gather_counts(values: list[int], peers: Peers, device: torch.device, operation: str) -> torch.Tensor:
    """``[R, len(values)]`` int64 table of every rank's ``values``."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(peers.world_size)]
    peers.collective(operation, lambda: dist.all_gather(out, local, group=peers.group, async_op=True))
    return torch.stack(out)


def barrier(peers: Peers, device: torch.device, operation: str) -> None:
    """Wait (bounded) until every rank of the group reaches this point, as DeepEP's collective calls do."""
    all_gather_counts([peers.rank], peers, device, operation)


class NoEvent:
    """Stands in for DeepEP's EventOverlap: the reference providers finish synchronously."""

    def __init__(self) -> None:
        self.event = None

    def current_stream_wait(self, release_handle: bool = False) -> None:
        return None

    def __enter__(self) -> "NoEvent":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def no_hook() -> None:
    """Stands in for a receive hook: the data has already arrived."""
    return None
