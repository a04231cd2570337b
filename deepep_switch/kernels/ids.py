"""Device-side clean-up of expert ids (``RTP_LLM_DEEPEP_VALIDATE=basic``): every id outside ``[0, E)`` and every
repeat of an id earlier in its row becomes -1; the first occurrence of a repeated id is kept.

No host sync and static shapes, so the clean-up is CUDA-graph capturable. :func:`id_cleaner_for` binds, once per
router, a single Triton kernel on CUDA (one launch: what a captured decode step pays) when it compiles, else the
torch version here (about six small kernels; any device, and the reference the Triton kernel is tested against).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .select import triton_on_cuda

logger = logging.getLogger("deepep_switch.kernels")

IdCleaner = Callable[[torch.Tensor], torch.Tensor]
"""int64 ``[T, K]`` global expert ids -> a new int64 ``[T, K]`` with the bad ones set to -1."""


def repeated_ids(ids: torch.Tensor) -> torch.Tensor:
    """bool ``[T, K]``: True where ``ids[t, k]`` equals an earlier id of its row (``ids[t, j]``, ``j < k``).

    ``O(T*K*K)`` comparisons (K <= 32 in DeepEP), no host sync. Repeats of -1 are flagged too.
    """
    same = ids.unsqueeze(2) == ids.unsqueeze(1)          # [T, K, K]: same[t, k, j] = ids[t, k] == ids[t, j]
    return same.tril(diagonal=-1).any(dim=2)              # keep j < k only


def drop_out_of_range_torch(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[T, K]`` -> a new int64 ``[T, K]`` with every id outside ``[0, num_experts)`` set to -1."""
    clamped = ids.clamp(-1, num_experts)                  # < -1 -> -1; >= E -> E
    return clamped.masked_fill(clamped == num_experts, -1)


def drop_bad_ids_torch(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """As :func:`drop_out_of_range_torch`, and every repeat of an earlier id in its row set to -1."""
    clamped = ids.clamp(-1, num_experts)
    return clamped.masked_fill((clamped == num_experts) | repeated_ids(clamped), -1)


def id_cleaner_for(device: torch.device, num_topk: int, num_experts: int) -> tuple[str, IdCleaner]:
    """``(kernel name, cleaner)`` for a layer with K = ``num_topk``, E = ``num_experts`` on ``device``.

    CUDA: the Triton kernel, compiled here for this K (a failure falls back to torch with one warning). Elsewhere,
    or with K == 1 (nothing can repeat; two torch kernels are enough): torch.
    """
    if num_topk == 1:
        return "torch", lambda ids: drop_out_of_range_torch(ids, num_experts)

    def build() -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        from .triton_ids import drop_bad_ids_triton

        drop_bad_ids_triton(torch.full((1, num_topk), -1, dtype=torch.int64, device=device), num_experts)
        return "triton", lambda ids: drop_bad_ids_triton(ids, num_experts)
    return triton_on_cuda(device, build, ("torch", lambda ids: drop_bad_ids_torch(ids, num_experts)),
                          "id clean-up", "using the torch one", logger)
