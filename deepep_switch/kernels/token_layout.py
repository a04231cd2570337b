"""The elastic low-latency *token* layout: ``ElasticBuffer.dispatch(do_expand=False, do_cpu_sync=False)`` rows
expanded into the legacy ``[E_local, R*N, H]`` layout by deepep-switch, and folded back with the top-k weighting.

Non-expand dispatch returns one row per (source token, this rank), ``R*M`` rows allocated, of which only the first
``valid = handle.psum_num_recv_tokens_per_scaleup_rank[-1]`` (known on the device only) are initialised; rows are
grouped by source rank. Each valid row ``i`` carries ``recv_topk_idx[i, j]``: a local expert id or -1.

* **slots**: each valid ``(i, j)`` with a local id ``l`` gets the slot ``dest[i, j] = l * C + pos`` in the flat
  ``[E_local * C]`` rows of ``expert_x`` (``C = R*N``), where ``pos`` is the number of entries with id ``l``
  before ``(i, j)`` in row-major order. Positions are therefore deterministic and grouped by source rank inside
  each expert (legacy's order); ``dest`` is -1 elsewhere and ``counts[l]`` is the number of entries with id ``l``
  (an entry whose position would reach ``C``, possible only with repeated ids in a row, is dropped).
* **pack** (prepare): ``expert_x.view(-1, H)[dest[i, j]] = rows[i]`` (and the FP8 scales likewise);
* **fold** (finalize): ``out[i] = bf16(sum_j w[i, j] * f32(y.view(-1, H)[dest[i, j]]))`` over the slots of row
  ``i`` whose ``dest >= 0``, in fp32, so that ``ElasticBuffer.combine`` (non-expand: it sums one row per rank)
  moves one row per (token, rank) and the weighting costs no pass of its own.

Nothing reads the valid count on the host: graph-capturable. The torch versions here are the reference the Triton
kernels (:mod:`.triton_token_layout`) are tested against, and what runs off CUDA. They gather worst-case shapes
(fine on CPU, too slow for decode).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional

import torch

from .select import triton_on_cuda

logger = logging.getLogger("deepep_switch.kernels")


def _valid_rows(rows: int, valid: torch.Tensor, device: torch.device) -> torch.Tensor:
    """bool ``[rows]``: row ``i < valid`` (``valid`` a 1-element int tensor on the device; no host sync)."""
    return torch.arange(rows, device=device) < valid.reshape(()).to(torch.int64)


def token_slots_torch(ids: torch.Tensor, valid: torch.Tensor, num_local_experts: int,
                      capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dest int32 [rows, K], counts int32 [E_local])`` for non-expand ``ids`` (see the module docstring).

    Args:
        ids: int ``[rows, K]`` received local ids (-1 = another rank's expert); rows ``>= valid`` are garbage.
        valid: int ``[1]`` (or 0-d) on ``ids.device``: how many rows are initialised.
        num_local_experts: ``E_local``. capacity: ``C``, rows per expert in ``expert_x`` (``R*N``).
    """
    rows, topk = ids.shape
    device = ids.device
    ids64 = ids.to(torch.int64)
    local = (ids64 >= 0) & (ids64 < num_local_experts) & _valid_rows(rows, valid, device).unsqueeze(1)
    flat = torch.where(local, ids64, torch.full_like(ids64, num_local_experts)).reshape(-1)
    onehot = torch.nn.functional.one_hot(flat, num_local_experts + 1)[:, :num_local_experts].to(torch.int32)
    before = torch.cumsum(onehot, dim=0) - onehot  # entries with the same id earlier in row-major order
    pos = (before * onehot).sum(dim=1).reshape(rows, topk)
    local &= pos < capacity  # only repeated ids (validation off) can overflow an expert: such entries are dropped
    dest = torch.where(local, ids64 * capacity + pos, torch.full_like(ids64, -1)).to(torch.int32)
    kept = torch.where(local, ids64, torch.full_like(ids64, num_local_experts)).reshape(-1)
    counts = torch.bincount(kept, minlength=num_local_experts + 1)[:num_local_experts]
    return dest, counts.to(torch.int32)


def pack_tokens_torch(rows: torch.Tensor, scales: Optional[torch.Tensor], ids: torch.Tensor, valid: torch.Tensor,
                      num_local_experts: int, capacity: int
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Expand non-expand rows into the legacy low-latency layout.

    Args:
        rows: ``[rows, H]`` bf16 or float8_e4m3fn, as dispatched. scales: float32 ``[rows, H/128]`` with FP8.
        ids / valid / num_local_experts / capacity: as :func:`token_slots_torch`.

    Returns:
        ``(expert_x [E_local, C, H], expert_scales [E_local, C, H/128] (token dimension contiguous) or None,
        dest int32 [rows, K], counts int32 [E_local])``; ``expert_x[l, counts[l]:]`` is unspecified.
    """
    dest, counts = token_slots_torch(ids, valid, num_local_experts, capacity)
    slots = num_local_experts * capacity
    topk = ids.shape[1]
    target = torch.where(dest >= 0, dest.to(torch.int64), torch.full_like(dest, slots, dtype=torch.int64))
    source = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1).expand(-1, topk)
    hidden = rows.shape[1]
    flat = torch.empty((slots + 1, hidden), dtype=rows.dtype, device=rows.device)  # one spare row for the rest
    # index_copy_ has no float8 kernel on every device: move the bytes.
    flat.view(torch.uint8).index_copy_(0, target.reshape(-1), rows.view(torch.uint8)[source.reshape(-1)])
    expert_x = flat[:slots].view(num_local_experts, capacity, hidden)
    expert_scales = None
    if scales is not None:
        groups = scales.shape[1]
        flat_sf = torch.empty((slots + 1, groups), dtype=scales.dtype, device=scales.device)
        flat_sf.index_copy_(0, target.reshape(-1), scales[source.reshape(-1)])
        expert_scales = torch.empty((num_local_experts, groups, capacity), dtype=scales.dtype,
                                    device=scales.device).transpose(1, 2)
        expert_scales.copy_(flat_sf[:slots].view(num_local_experts, capacity, groups))
    return expert_x, expert_scales, dest, counts


def fold_tokens_torch(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The executor's ``y [E_local, C, H]`` bf16 back to one weighted row per received token.

    Args:
        y: bf16 ``[E_local, C, H]``; slots no ``dest`` names are never read (NaN there cannot leak).
        dest: int32 ``[rows, K]`` from the pack. weights: float32 ``[rows, K]`` received with the rows.

    Returns:
        bf16 ``[rows, H]``: ``out[i] = bf16(sum_j w[i, j] * y_flat[dest[i, j]])`` over ``dest >= 0``, summed in
        fp32 in ``j`` order; rows without a slot (past the valid count) are 0.
    """
    hidden = y.shape[-1]
    flat = y.reshape(-1, hidden)
    taken = dest >= 0
    safe = torch.where(taken, dest, torch.zeros_like(dest)).to(torch.int64)
    acc = torch.zeros((dest.shape[0], hidden), dtype=torch.float32, device=y.device)
    for j in range(dest.shape[1]):
        values = torch.where(taken[:, j:j + 1], flat[safe[:, j]].float(), torch.zeros((), device=y.device))
        w = torch.where(taken[:, j], weights[:, j].float(), torch.zeros((), device=y.device))
        acc += values * w.unsqueeze(1)
    return acc.to(torch.bfloat16)


class TokenLayoutOps(NamedTuple):
    """The pack/fold pair a token-layout path binds at construction: ``pack(rows, scales, ids, valid, E_local, C)``
    and ``fold(y, dest, weights, valid)``."""

    name: str
    pack: Callable[..., tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]]
    fold: Callable[..., torch.Tensor]


def _fold_torch(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    del valid  # dest is already -1 past the valid rows
    return fold_tokens_torch(y, dest, weights)


TORCH_TOKEN_OPS = TokenLayoutOps("torch", pack_tokens_torch, _fold_torch)


def token_ops_for(device: torch.device) -> TokenLayoutOps:
    """Triton kernels on CUDA when Triton imports, else the torch versions."""
    def build() -> TokenLayoutOps:
        from .triton_token_layout import fold_tokens_triton, pack_tokens_triton

        return TokenLayoutOps("triton", pack_tokens_triton, fold_tokens_triton)
    return triton_on_cuda(device, build, TORCH_TOKEN_OPS, "token-layout kernels",
                          "the elastic low-latency path uses the slower torch versions", logger)
