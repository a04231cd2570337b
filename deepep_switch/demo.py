"""``deepep-switch demo``: a small MoE exchange on N ranks through the wrapper and both routers.

By default it runs 2 CPU processes over gloo with the reference providers, so it works on any machine; on a GPU
node ``--provider deep_ep`` runs the same on real DeepEP over NCCL. Each rank resolves the backend from
``RTP_LLM_DEEPEP_BACKEND``, builds the buffer, sends a random batch through prepare -> toy experts -> finalize
and compares the result with the dense single-process float32 MoE. A rank given 0 tokens checks that an empty
batch round-trips (its output is ``[0, H]``); it has no error to report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import DeepepWrapperConfig
from .settings import ProviderChoice

logger = logging.getLogger("deepep_switch.demo")

# The demo's default hidden size per provider: the reference providers take any multiple of 128, real DeepEP's
# legacy low-latency kernels are compiled for a fixed list of sizes (routers.low_latency.LEGACY_LL_HIDDEN).
DEFAULT_HIDDEN = {ProviderChoice.REFERENCE: 256, ProviderChoice.DEEP_EP: 2048}


def default_tokens(ranks: int) -> tuple[int, ...]:
    """Tokens per rank when none are given: uneven on purpose, and every rank sends some (``8 + 5*r``)."""
    return tuple(8 + 5 * r for r in range(ranks))


@dataclass(frozen=True)
class DemoSpec:
    """The demo's layer: tokens per rank (uneven on purpose; 0 = an empty rank), hidden, experts, top-k."""

    tokens_per_rank: tuple[int, ...]
    hidden: int = 256
    num_experts: int = 8
    topk: int = 2
    seed: int = 0

    @property
    def capacity(self) -> int:
        """Tokens per rank per dispatch the buffers are sized for: the largest batch, rounded up to a multiple
        of 4 (DeepEP's legacy low-latency kernels need ranks * capacity % 4 == 0)."""
        return -(-max(max(self.tokens_per_rank), 1) // 4) * 4

    def layer_config(self, rank: int, world: int, low_latency: bool) -> DeepepWrapperConfig:
        """The wrapper config rank ``rank`` of ``world`` builds for one router (the CLI validates the same)."""
        from .testing import layer_config

        return layer_config(rank, world, hidden=self.hidden, experts=self.num_experts, topk=self.topk,
                            capacity=self.capacity, low_latency=low_latency)


def run_rank(rank: int, world: int, spec: DemoSpec, device_kind: str) -> dict[str, Any]:
    """One rank of the demo (called by :func:`deepep_switch.launch.spawn`). Returns a printable summary.

    Per router (``normal``, ``low_latency``): the backend, the rows this rank's experts received, the relative
    error against the dense float32 MoE (None on an empty rank: nothing to compare) and whether the output has
    the input's shape (``round_trip_ok``; on an empty rank, that the empty batch came back as ``[0, H]``).
    """
    from routers import LowLatencyRouter, NormalRouter, RouterOptions

    from .testing import ToyExperts, dense_reference, make_problem, relative_error, run_moe_layer
    from .wrapper import DeepEPWrapper

    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    problem = make_problem(spec.seed, list(spec.tokens_per_rank), spec.hidden, spec.num_experts, spec.topk)
    experts = ToyExperts(spec.seed, spec.num_experts, spec.hidden, device)
    reference = dense_reference(problem, experts)[problem.rank_slice(rank)]
    x, ids, weights = problem.local(rank, device)
    summary: dict[str, Any] = {"rank": rank, "tokens": x.shape[0]}
    for low_latency in (False, True):
        wrapper = DeepEPWrapper.create(spec.layer_config(rank, world, low_latency))
        try:
            router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper, RouterOptions())
            stats: dict[str, int] = {}
            out = run_moe_layer(router, x, ids, weights, experts, rank, stats)
            name = "low_latency" if low_latency else "normal"
            error: Optional[float] = relative_error(out, reference) if x.shape[0] else None
            summary[name] = {
                "backend": wrapper.backend.value, "received_rows": stats["received_rows"],
                "relative_error": error, "round_trip_ok": tuple(out.shape) == tuple(x.shape),
                "buffer_bytes": wrapper.buffer_bytes, "decision": wrapper.decision.describe(),
            }
            logger.debug("demo rank %d/%d %s: %s", rank, world, name, summary[name])
        finally:
            DeepEPWrapper.reset()
    return summary
