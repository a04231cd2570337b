"""``deepep-switch demo``: a small MoE exchange on N ranks through the wrapper and both routers.

By default it runs 2 CPU processes over gloo with the reference providers, so it works on any machine; on a GPU
node ``--provider deep_ep`` runs the same on real DeepEP over NCCL. Each rank resolves the backend from
``RTP_LLM_DEEPEP_BACKEND``, builds the buffer, sends a random batch through prepare -> toy experts -> finalize
and compares the result with the dense single-process float32 MoE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DemoSpec:
    """The demo's layer: tokens per rank (uneven on purpose, one rank may have 0), hidden, experts, top-k."""

    tokens_per_rank: tuple[int, ...]
    hidden: int = 256
    num_experts: int = 8
    topk: int = 2
    seed: int = 0


def run_rank(rank: int, world: int, spec: DemoSpec, device_kind: str) -> dict[str, Any]:
    """One rank of the demo (called by :func:`deepep_switch.launch.spawn`). Returns a printable summary."""
    from routers import LowLatencyRouter, NormalRouter, RouterOptions

    from .testing import ToyExperts, dense_reference, layer_config, make_problem, relative_error, run_moe_layer
    from .wrapper import DeepEPWrapper

    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    problem = make_problem(spec.seed, list(spec.tokens_per_rank), spec.hidden, spec.num_experts, spec.topk)
    experts = ToyExperts(spec.seed, spec.num_experts, spec.hidden, device)
    reference = dense_reference(problem, experts)[problem.rank_slice(rank)]
    x, ids, weights = problem.local(rank, device)
    max_tokens = max(max(spec.tokens_per_rank), 1)
    summary: dict[str, Any] = {"rank": rank, "tokens": x.shape[0]}
    for low_latency in (False, True):
        config = layer_config(rank, world, hidden=spec.hidden, experts=spec.num_experts, topk=spec.topk,
                              capacity=max_tokens, low_latency=low_latency)
        wrapper = DeepEPWrapper.create(config)
        try:
            router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper, RouterOptions())
            stats: dict[str, int] = {}
            out = run_moe_layer(router, x, ids, weights, experts, rank, stats)
            rows = stats["received_rows"]
            name = "low_latency" if low_latency else "normal"
            summary[name] = {
                "backend": wrapper.backend.value, "received_rows": rows,
                "relative_error": relative_error(out, reference) if x.shape[0] else 0.0,
                "buffer_bytes": wrapper.buffer_bytes, "decision": wrapper.decision.describe(),
            }
        finally:
            DeepEPWrapper.reset()
    return summary
