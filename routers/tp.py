"""Attention-TP slicing before dispatch and the all-gather after combine, as rtp-llm's DeepEP routers do.

With ``tp_size > 1`` every TP rank holds the same ``T`` tokens; rank ``i`` dispatches rows
``[min(ceil(T/tp)*i, T), +ceil(T/tp))`` and, after combine, the TP group all-gathers the padded slices and cuts
the result back to ``T`` rows.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist


def _gather_into_tensor(out: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    gathered = torch.empty((size * out.shape[0], *out.shape[1:]), dtype=out.dtype, device=out.device)
    dist.all_gather_into_tensor(gathered, out.contiguous(), group=group)
    return gathered


def _gather_as_bytes(out: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    # gloo lacks bf16/all_gather_into_tensor on some versions: move raw bytes instead.
    raw = out.contiguous().view(torch.uint8)
    parts = [torch.empty_like(raw) for _ in range(size)]
    dist.all_gather(parts, raw, group=group)
    return torch.cat(parts).view(out.dtype)


class TensorParallelSlicer:
    """Binds the TP slicing and gathering for one router.

    Args:
        rank / size: this rank's attention-TP rank and the TP size.
        group: the TP process group (required when ``size > 1``).
    """

    def __init__(self, rank: int, size: int, group: Optional[dist.ProcessGroup]) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"tp_rank={rank} is not in [0, tp_size={size})")
        if size > 1 and group is None:
            raise ValueError("tp_size > 1 needs tp_group")
        if size > 1 and dist.get_world_size(group) != size:
            raise ValueError(f"tp_group has {dist.get_world_size(group)} ranks, tp_size is {size}")
        self.rank, self.size, self.group = rank, size, group
        self._gather: Callable[[torch.Tensor, dist.ProcessGroup, int], torch.Tensor] = (
            _gather_into_tensor if size > 1 and dist.get_backend(group) == dist.Backend.NCCL else _gather_as_bytes)

    def slice_bounds(self, num_tokens: int) -> tuple[int, int]:
        """``(begin, length)`` of this rank's slice of ``num_tokens`` tokens."""
        per_rank = -(-num_tokens // self.size)
        begin = min(per_rank * self.rank, num_tokens)
        return begin, min(num_tokens - begin, per_rank)

    def tokens_per_rank(self, num_tokens: int) -> int:
        """``ceil(T / tp)``: the most tokens any TP rank dispatches for a batch of ``num_tokens``."""
        return -(-num_tokens // self.size)

    def slice(self, t: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return t
        begin, length = self.slice_bounds(t.shape[0])
        return t.narrow(0, begin, length)

    def gather(self, out: torch.Tensor, original_num_tokens: Optional[int]) -> torch.Tensor:
        """All-gather the combined slices over TP: ``[len, H]`` -> ``[original_num_tokens, H]``."""
        if self.size == 1:
            return out
        if original_num_tokens is None:
            raise ValueError("finalize needs extra_finalize_args['original_num_tokens'] when tp_size > 1")
        per_rank = self.tokens_per_rank(original_num_tokens)
        if out.shape[0] < per_rank:
            pad = torch.empty((per_rank - out.shape[0], *out.shape[1:]), dtype=out.dtype, device=out.device)
            out = torch.cat([out, pad])
        assert self.group is not None
        return self._gather(out, self.group, self.size)[:original_num_tokens]
