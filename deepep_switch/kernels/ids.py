"""Device-side clean-up of expert ids (``RTP_LLM_DEEPEP_VALIDATE=basic``): every id outside ``[0, E)`` and every
repeat of an id earlier in its row becomes -1; the first occurrence of a repeated id is kept.

No host sync and static shapes, so the clean-up is CUDA-graph capturable. :func:`id_cleaner_for` binds, once per
router, a single Triton kernel on CUDA (one launch: what a captured decode step pays) when it compiles, else
:class:`TorchIdCleaner` here (five small kernels, any device). :func:`drop_bad_ids_torch` is the plain reference
both are tested against.
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
    clamped = ids.clamp(-1, num_experts)                  # < -1 -> -1; >= E -> E (a new tensor: ours to fill)
    return clamped.masked_fill_(clamped == num_experts, -1)


def drop_bad_ids_torch(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """As :func:`drop_out_of_range_torch`, and every repeat of an earlier id in its row set to -1."""
    clamped = ids.clamp(-1, num_experts)
    return clamped.masked_fill((clamped == num_experts) | repeated_ids(clamped), -1)


class TorchIdCleaner:
    """:func:`drop_bad_ids_torch` in five torch ops (clamp, where, eq, any, in-place fill), for one layer's K and E.

    Repeats and ids ``>= E`` are found in one ``[T, K, K]`` comparison of the clamped ids ``c`` against a table
    built from ``c``: below the diagonal the earlier ids of the row (a match is a repeat), on the diagonal the value
    E (a match is an id ``>= E``), above it ``E + 1``, which no clamped id equals. Ids below 0 are already -1 after
    the clamp.

    Args:
        num_topk / num_experts: the layer's K and E. device: where the ids live (the constant tables go there).
    """

    __slots__ = ("num_experts", "_earlier", "_fill")

    def __init__(self, num_topk: int, num_experts: int, device: torch.device) -> None:
        self.num_experts = num_experts
        # _earlier[k, j]: j < k. _fill[k, j]: the value compared where j >= k (E on the diagonal, E + 1 above).
        self._earlier = torch.ones((num_topk, num_topk), dtype=torch.bool, device=device).tril(diagonal=-1)
        fill = torch.full((num_topk, num_topk), num_experts + 1, dtype=torch.int64, device=device)
        self._fill = fill.fill_diagonal_(num_experts)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[T, K]`` (any strides) -> a new int64 ``[T, K]``, as :func:`drop_bad_ids_torch`."""
        clamped = ids.clamp(-1, self.num_experts)
        table = torch.where(self._earlier, clamped.unsqueeze(1), self._fill)            # [T, K, K]
        return clamped.masked_fill_((clamped.unsqueeze(2) == table).any(dim=2), -1)


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
    return triton_on_cuda(device, build, ("torch", TorchIdCleaner(num_topk, num_experts, device)),
                          "id clean-up", "using the torch one", logger)
