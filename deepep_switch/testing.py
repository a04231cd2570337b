"""A kit for testing MoE routers without a model: random routing problems, toy experts, executors that follow
rtp-llm's conventions, and the dense single-process float32 MoE they must agree with.

Used by deepep-switch's own tests, ``deepep-switch demo`` and ``deepep-switch bench``, and meant for engine
engineers' unit tests on the reference providers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from routers.payloads import CombineForwardPayload, ExpertForwardPayload

from .config import DeepepWrapperConfig
from .quant.fp8 import dequantize_fp8, quantize_fp8


def layer_config(rank: int, world: int, *, hidden: int, experts: int, topk: int, capacity: int,
                 low_latency: bool = False, **overrides: Any) -> DeepepWrapperConfig:
    """A single-node ``DeepepWrapperConfig`` for one MoE layer: ``capacity`` tokens per rank per dispatch serves
    as the low-latency budget and the elastic normal-mode capacity. ``overrides`` replace any other field."""
    fields = dict(
        ep_rank=rank, ep_size=world, tp_size=1, local_rank=rank, world_size=world, hidden_size=hidden,
        expert_num=experts, moe_k=topk, deep_ep_num_sm=0, use_deepep_low_latency=low_latency,
        use_deepep_internode=False, ll_num_max_token=capacity,
        ll_num_max_token_per_rank=capacity if low_latency else 0, max_tokens_per_rank=capacity)
    fields.update(overrides)
    return DeepepWrapperConfig(**fields)


@dataclass
class MoEProblem:
    """Every rank's tokens and routing, generated identically on every rank from one seed.

    Attributes:
        x: bf16 ``[sum(tokens_per_rank), H]`` all ranks' tokens, rank-major.
        topk_ids: int64 ``[sum, K]`` distinct experts per token, some -1.
        topk_weights: float32 ``[sum, K]``.
        tokens_per_rank: how many rows of the above each rank owns.
    """

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    tokens_per_rank: list[int]

    def rank_slice(self, rank: int) -> slice:
        start = sum(self.tokens_per_rank[:rank])
        return slice(start, start + self.tokens_per_rank[rank])

    def local(self, rank: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.rank_slice(rank)
        return self.x[s].to(device), self.topk_ids[s].to(device), self.topk_weights[s].to(device)


def make_problem(seed: int, tokens_per_rank: list[int], hidden: int, num_experts: int, topk: int,
                 drop_prob: float = 0.1) -> MoEProblem:
    """Random tokens and routing; ``drop_prob`` of the top-k slots are -1 (no expert)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(tokens_per_rank)
    x = torch.randn((total, hidden), generator=gen).to(torch.bfloat16)
    ids = torch.rand((total, num_experts), generator=gen).argsort(dim=1)[:, :topk].to(torch.int64)
    ids = torch.where(torch.rand((total, topk), generator=gen) < drop_prob, torch.full_like(ids, -1), ids)
    weights = torch.rand((total, topk), generator=gen).float() + 0.05
    return MoEProblem(x, ids, weights, list(tokens_per_rank))


class ToyExperts:
    """``E`` small float32 MLPs ``f_e(x) = gelu(x @ A_e) @ B_e`` (rank ``r``), distinct per expert so any
    mix-up of rows, experts or weights shows, and small enough for hidden 7168 with 64 experts on a GPU."""

    def __init__(self, seed: int, num_experts: int, hidden: int, device: torch.device | str = "cpu",
                 rank: int = 64) -> None:
        gen = torch.Generator().manual_seed(seed + 7919)
        self.a = (torch.randn((num_experts, hidden, rank), generator=gen) / hidden ** 0.5).to(device)
        self.b = (torch.randn((num_experts, rank, hidden), generator=gen) / rank ** 0.5).to(device)

    @property
    def num_experts(self) -> int:
        return self.a.shape[0]

    @property
    def device(self) -> torch.device:
        return self.a.device

    def __call__(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x.float() @ self.a[expert]) @ self.b[expert]


def dense_reference(problem: MoEProblem, experts: ToyExperts, fp8: bool = False) -> torch.Tensor:
    """The single-process float32 MoE: ``out[t] = Σ_j w[t,j] · f_{ids[t,j]}(x[t])`` over ids >= 0.

    With ``fp8`` the experts see ``x`` after DeepEP's FP8 round trip (quantise, dequantise), as the executor does.
    """
    x = problem.x.float().to(experts.device)
    if fp8:
        x = dequantize_fp8(*quantize_fp8(x))
    ids, weights = problem.topk_ids.to(x.device), problem.topk_weights.to(x.device)
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        rows, k = torch.nonzero(ids == e, as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, weights[rows, k].unsqueeze(1) * experts(e, x[rows]))
    return out


def _expert_input(payload: ExpertForwardPayload) -> torch.Tensor:
    if payload.expert_x_scale is not None:
        return dequantize_fp8(payload.expert_x, payload.expert_x_scale)
    return payload.expert_x.float()


def normal_executor(payload: ExpertForwardPayload, experts: ToyExperts, ep_rank: int,
                    num_local_experts: int) -> CombineForwardPayload:
    """What rtp-llm's contiguous executors do: per row, ``Σ_j w[row,j] · f(expert)`` over this rank's experts."""
    x = _expert_input(payload)
    ids, weights = payload.expert_topk_ids, payload.expert_topk_weights
    assert ids is not None and weights is not None
    offset = ep_rank * num_local_experts
    local = ids if payload.expert_ids_are_local else ids - offset
    out = torch.zeros_like(x)
    for e in range(num_local_experts):
        rows, k = torch.nonzero(local == e, as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, weights[rows, k].float().unsqueeze(1) * experts(offset + e, x[rows]))
    return CombineForwardPayload(out.to(torch.bfloat16))


def low_latency_executor(payload: ExpertForwardPayload, experts: ToyExperts, ep_rank: int,
                         garbage: Optional[float] = float("nan")) -> CombineForwardPayload:
    """What rtp-llm's masked executors do: ``y[e, :n_e] = f_e(x[e, :n_e])``; rows past ``n_e`` are ``garbage``
    (NaN by default, so a combine that reads them would poison its output). Unweighted: combine weights."""
    x = _expert_input(payload)
    meta = payload.expert_tokens_meta
    assert meta is not None and meta.expert_num_tokens is not None
    counts = meta.expert_num_tokens.tolist()
    local_experts = x.shape[0]
    y = torch.full(x.shape, garbage if garbage is not None else 0.0, dtype=torch.float32, device=x.device)
    for e in range(local_experts):
        n = counts[e]
        if n:
            y[e, :n] = experts(ep_rank * local_experts + e, x[e, :n])
    return CombineForwardPayload(y.to(torch.bfloat16))


def masked_executor(payload: ExpertForwardPayload, experts: ToyExperts, ep_rank: int) -> CombineForwardPayload:
    """A CUDA-graph-safe low-latency executor: like a masked GEMM it computes every row of ``[E_local, R*N, H]``
    without reading the counts on the host; rows past ``expert_num_tokens`` hold whatever they hold."""
    x = _expert_input(payload)
    local_experts = x.shape[0]
    y = torch.stack([experts(ep_rank * local_experts + e, x[e]) for e in range(local_experts)])
    return CombineForwardPayload(y.to(torch.bfloat16))


def run_moe_layer(router: Any, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  experts: ToyExperts, ep_rank: int, stats: Optional[dict[str, int]] = None,
                  **prepare_kwargs: Any) -> torch.Tensor:
    """One MoE layer as rtp-llm's ``FusedMoe.forward`` runs it: prepare -> executor -> finalize.

    The executor is skipped when nothing arrived (normal mode), exactly as rtp-llm does, so combine sees 0 rows.
    Low-latency routers get :func:`low_latency_executor`, normal routers :func:`normal_executor`. When ``stats``
    is given, ``stats["received_rows"]`` is set to the rows this rank's experts received. ``prepare_kwargs`` go to
    ``prepare`` (e.g. an :class:`~routers.AutoRouter`'s ``is_prefill``).
    """
    payload = router.prepare(x, None, None, topk_weights, topk_ids, **prepare_kwargs)
    if stats is not None:
        meta = payload.expert_tokens_meta
        three_d = payload.expert_x.dim() == 3
        stats["received_rows"] = int(meta.expert_num_tokens.sum()) if three_d and meta else payload.expert_x.shape[0]
    if payload.expert_x.dim() == 3:
        result = low_latency_executor(payload, experts, ep_rank)
    elif payload.expert_x.numel() == 0:
        result = CombineForwardPayload(torch.empty_like(payload.expert_x, dtype=torch.bfloat16))
    else:
        result = normal_executor(payload, experts, ep_rank, router.num_local_experts)
    return router.finalize(result, payload.expert_topk_weights, payload.expert_topk_ids, False,
                           {"original_num_tokens": x.shape[0]})


def canonical_row_order(rows: torch.Tensor, columns: int = 4) -> torch.Tensor:
    """A permutation sorting ``rows`` ([N, H]) lexicographically by their first ``columns`` values: two tensors
    holding the same random rows in different orders become equal once both are indexed with their own order."""
    order = torch.arange(rows.shape[0], device=rows.device)
    values = rows[:, :columns].float()
    for c in reversed(range(min(columns, rows.shape[1]))):
        order = order[torch.argsort(values[order, c], stable=True)]
    return order


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_F / max(||ref||_F, tiny)`` in float64."""
    out64, ref64 = out.double(), ref.double().to(out.device)
    return float((out64 - ref64).norm() / ref64.norm().clamp(min=1e-12))
