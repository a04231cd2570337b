"""Diagnose the 2 H200 finding of 2026-11-22 20:07 UTC: a legacy low-latency CUDA graph replays wrong numbers after
``wrapper.switch("elastic", keep_previous=True)``, although the legacy buffer is kept.

One 2-rank spawn (real DeepEP, ``EP_DISABLE_GIN=1``). A legacy low-latency wrapper, one router, one graph of
prepare -> masked executor -> finalize captured on fixed inputs; then the graph is replayed and compared with the
dense float32 MoE after each step, to find the step that breaks it:

1. eager round trips through the same router (the control);
2. an ``ElasticBuffer`` built beside it, outside the wrapper (nothing rebinds), one eager elastic round trip;
3. that ``ElasticBuffer`` destroyed;
4. ``wrapper.switch("elastic", keep_previous=True)`` (the router rebinds);
5. ``wrapper.switch("legacy")`` back onto the kept buffer.

Usage (GPU machine): ``PYTHONPATH=$PWD python3 scripts/diag_switch_graph.py [OUT.json [VARIANT,...]]`` with
variants plain, metrics (``RTP_LLM_DEEPEP_METRICS=1``), create_both (both modes, both switched), create_both+metrics.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

H, E, K, N = 7168, 64, 8, 128


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def worker(rank: int, world: int, metrics: bool = False, both: bool = False) -> dict[str, Any]:
    """``metrics``: RTP_LLM_DEEPEP_METRICS=1; ``both``: a ``create_both`` wrapper, both modes switched."""
    import torch.distributed as dist

    from deepep_switch import DeepEPMode

    from deepep_switch import DeepEPWrapper
    from deepep_switch.backend import Backend
    from deepep_switch.backends import get_spec
    from deepep_switch.cuda_graph import capture
    from deepep_switch.settings import load_settings
    from deepep_switch.testing import ToyExperts, dense_reference, layer_config, make_problem, masked_executor
    from routers import LowLatencyRouter

    device = torch.device("cuda", torch.cuda.current_device())
    experts = ToyExperts(0, E, H, device)
    problem = make_problem(12, [64, 100][:world] + [N] * (world - 2), H, E, K)
    ref = dense_reference(problem, experts)[problem.rank_slice(rank)]
    x, ids, w = problem.local(rank, device)
    config = layer_config(rank, world, hidden=H, experts=E, topk=K, capacity=N, low_latency=True)
    settings = load_settings(backend_raw="legacy", **({"metrics": True} if metrics else {}))
    if both:
        config = layer_config(rank, world, hidden=H, experts=E, topk=K, capacity=N, ll_num_max_token_per_rank=N,
                              max_tokens_per_rank=N)
        wrapper = DeepEPWrapper.create_both(config, settings=settings)
    else:
        wrapper = DeepEPWrapper.create(config, settings=settings)
    router = LowLatencyRouter(wrapper)

    def step() -> torch.Tensor:
        p = router.prepare(x, None, None, w, ids)
        y = masked_executor(p, experts, rank)
        return router.finalize(y, p.expert_topk_weights, p.expert_topk_ids, False, {"original_num_tokens": x.shape[0]})

    graph, out = capture(step)
    errors: dict[str, Any] = {}

    def replay(tag: str) -> None:
        out.zero_()
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize()
        errors[tag] = round(_rel(out, ref), 5)

    replay("0 right after capture")
    for _ in range(3):
        eager = step()
    torch.cuda.synchronize()
    errors["1 eager router"] = round(_rel(eager, ref), 5)
    replay("1 after eager round trips")
    spec = get_spec(Backend("elastic"))
    try:
        if both:
            raise RuntimeError("skipped with create_both")
        cls = spec.buffer_class(settings.settings.provider)
        plan = spec.plan(cls, wrapper.group, config, settings.settings)
        elastic = cls(wrapper.group, **plan.kwargs)
        replay("2 an ElasticBuffer built beside it")
        recv, _, _, handle, _ = elastic.dispatch(x, topk_idx=ids, topk_weights=w, num_experts=E, do_cpu_sync=True)
        elastic.combine(recv, handle)
        torch.cuda.synchronize()
        replay("2 after one elastic round trip")
        dist.barrier()
        elastic.destroy()
        replay("3 after the ElasticBuffer's destroy")
    except Exception as exc:  # record and go on to the switch
        errors["2 elastic beside"] = f"{type(exc).__name__}: {exc}"
    modes = (DeepEPMode.NORMAL, DeepEPMode.LOW_LATENCY) if both else (DeepEPMode.LOW_LATENCY,)
    wrapper.switch_modes({m: "elastic" for m in modes}, keep_previous=True)
    errors["4 router backend"] = router.backend.value
    replay("4 after switch to elastic, legacy kept")
    wrapper.switch_modes({m: "legacy" for m in modes}, keep_previous=True)
    replay("5 after switch back onto the kept legacy buffer")
    del graph
    DeepEPWrapper.reset()
    return errors


if __name__ == "__main__":
    from deepep_switch.launch import spawn

    variants = {"plain": (False, False), "metrics": (True, False), "create_both": (False, True),
                "create_both+metrics": (True, True)}
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(variants)
    results = {}
    for name in chosen:
        results[name] = spawn(worker, 2, args=variants[name], backend="nccl", env={"EP_DISABLE_GIN": "1"},
                              timeout_s=240)
        for rank, r in enumerate(results[name]):
            for key, value in r.items():
                print(f"{name} rank {rank} {key}: {value}")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=2)
