"""GPU (real DeepEP, 2 and 4 GPUs): both routers on every generation this process can run (legacy and elastic on
DeepEP 2.1's stack, legacy and ep on 2.5's; ``tests/_generations``) against the dense float32 MoE, FP8 dispatch,
attention TP, agreement with legacy, the row-order contract, ``expert_alignment=128`` counts, and the
low-latency router inside a CUDA graph (replays bitwise equal to eager).

Every rank of one spawn runs all cases on every runnable generation, so DeepEP's JIT (2.1's, and 2.5's run-time
compiler: 4-6 s per new shape) compiles each kernel once per world size, before anything is compared; nothing
here is timed. The same worker runs on 2 CPU ranks with the reference providers (small shapes, no CUDA graph), so
its logic is checked on every run of the suite.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from _generations import GENERATIONS, GPU_ENV, V2_GENERATIONS, generation_params, runnable
from _helpers import record_gpu_results, settings_from_env as _settings
from deepep_switch.launch import spawn
from deepep_switch.quant import Quant
from deepep_switch.testing import layer_config

TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class Shape:
    """The layer: hidden ``H``, ``E`` experts, top-``K``, ``N`` tokens per rank (the low-latency and V2 capacity),
    and the normal router's ``alignment`` in the expert-alignment check."""

    H: int
    E: int
    K: int
    N: int
    alignment: int


GPU_SHAPE = Shape(H=7168, E=64, K=8, N=128, alignment=128)  # rtp-llm's FP8 per-block router aligns to 128
CPU_SHAPE = Shape(H=256, E=8, K=4, N=16, alignment=8)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple[int, ...]  # per TP group
    fp8: bool = False
    tp: int = 1
    seed: int = 0


def cases(world: int, n: int) -> list[Case]:
    """The cases for ``world`` ranks with capacity ``n``: an empty rank, uneven ranks, FP8, attention TP 2."""
    if world == 2:
        return [Case("bf16_empty_rank", (n, 0)), Case("bf16_uneven", (n * 3 // 4, n), seed=1),
                Case("fp8", (n // 2, n * 3 // 4), fp8=True, seed=2)]
    return [Case("bf16_empty_rank", (n, 0, n * 3 // 5, 5)), Case("fp8", (n // 2, n * 3 // 4, 3, n), fp8=True, seed=2),
            Case("tp2", (n * 3 // 4, n // 2), tp=2, seed=3)]


def _device(cuda: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _config(rank: int, world: int, shape: Shape, low_latency: bool):
    return layer_config(rank, world, hidden=shape.H, experts=shape.E, topk=shape.K, capacity=shape.N,
                        low_latency=low_latency)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _graph_replay(router: Any, experts: Any, rank: int, world: int, shape: Shape,
                  device: torch.device) -> dict[str, Any]:
    """Capture prepare -> masked executor -> finalize once, replay it on new inputs, compare with eager."""
    import torch.distributed as dist

    from deepep_switch.cuda_graph import capture
    from deepep_switch.testing import make_problem, masked_executor

    def inputs(seed: int):
        return make_problem(seed, [shape.N] * world, shape.H, shape.E, shape.K).local(rank, device)

    static_x, static_ids, static_w = inputs(40)

    def step(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        p = router.prepare(x, None, None, w, ids)
        y = masked_executor(p, experts, rank)
        return router.finalize(y, p.expert_topk_weights, p.expert_topk_ids, False, {"original_num_tokens": shape.N})

    graph, static_out = capture(lambda: step(static_x, static_ids, static_w))
    results = []
    for seed in (41, 42):
        x, ids, w = inputs(seed)
        static_x.copy_(x)
        static_ids.copy_(ids)
        static_w.copy_(w)
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize()
        replayed = static_out.clone()
        eager = step(x, ids, w)
        torch.cuda.synchronize()
        results.append((_rel(replayed, eager), bool(torch.equal(replayed, eager))))
    del graph
    torch.cuda.synchronize()
    dist.barrier()
    return {"replays": results}


def alignment_problem(world: int, shape: Shape) -> Any:
    """``N`` tokens per rank with expert 0 in every token's first slot (so its count, ``world * N``, exceeds the
    alignment on the GPU shape), the other slots random: aligned counts of 0, one and several blocks."""
    from deepep_switch.testing import make_problem

    p = make_problem(5, [shape.N] * world, shape.H, shape.E, shape.K)
    p.topk_ids[p.topk_ids == 0] = -1
    p.topk_ids[:, 0] = 0
    return p


def _expert_alignment(wrapper: Any, rank: int, world: int, shape: Shape, experts: Any,
                      device: torch.device) -> dict[str, Any]:
    """``NormalRouter(FP8 per block, expert_alignment)``: the counts the executor gets are each local expert's
    true count rounded up to the alignment; the rows and ids are the true ones; the layer still matches the dense
    MoE."""
    from deepep_switch.testing import dense_reference, normal_executor
    from routers import NormalRouter, RouterOptions

    p = alignment_problem(world, shape)
    x, ids, w = p.local(rank, device)
    local = shape.E // world
    true = [int((p.topk_ids == rank * local + e).sum()) for e in range(local)]
    router = NormalRouter(wrapper, RouterOptions(quant=Quant.FP8_BLOCK, expert_alignment=shape.alignment))
    payload = router.prepare(x, None, None, w, ids)
    counts = [int(c) for c in payload.expert_tokens_meta.expert_num_tokens_cpu]
    received = payload.expert_topk_ids if payload.expert_ids_are_local else payload.expert_topk_ids - rank * local
    rows = [int(received.eq(e).sum()) for e in range(local)]
    y = normal_executor(payload, experts, rank, local)
    result = router.finalize(y, payload.expert_topk_weights, payload.expert_topk_ids, False,
                             {"original_num_tokens": x.shape[0]})
    ref = dense_reference(p, experts, fp8=True)[p.rank_slice(rank)]
    return {"counts": counts, "true": true, "rows_per_expert": rows, "alignment": shape.alignment,
            "error": _rel(result, ref)}


def _router_worker(rank: int, world: int, cases: list[Case], backends: tuple[str, ...], shape: Shape,
                   cuda: bool = True) -> dict[str, Any]:
    import torch.distributed as dist

    from deepep_switch import DeepEPWrapper
    from deepep_switch.testing import ToyExperts, canonical_row_order, dense_reference, make_problem, run_moe_layer
    from routers import CombineForwardPayload, LowLatencyRouter, NormalRouter, RouterOptions

    device = _device(cuda)
    groups = {tp: [dist.new_group(list(range(g * tp, (g + 1) * tp))) for g in range(world // tp)]
              for tp in {c.tp for c in cases} if tp > 1}
    experts = ToyExperts(0, shape.E, shape.H, device)
    prepared = {}
    for case in cases:
        problem = make_problem(case.seed, list(case.tokens), shape.H, shape.E, shape.K)
        index = rank // case.tp
        x, ids, w = problem.local(index, device)
        ref = dense_reference(problem, experts, fp8=case.fp8)[problem.rank_slice(index)]
        options = RouterOptions(quant=Quant.FP8_BLOCK if case.fp8 else Quant.NONE, tp_rank=rank % case.tp,
                                tp_size=case.tp, tp_group=groups[case.tp][index] if case.tp > 1 else None)
        prepared[case.name] = (x, ids, w, ref, options)

    out: dict[str, Any] = {"backends": list(backends), "errors": {}, "cross": {}, "graph": {}, "layout_ops": {},
                           "alignment": {}, "resolved": {}, "row_order": {}}
    payloads: dict[str, Any] = {}
    for low_latency in (False, True):
        mode = "low_latency" if low_latency else "normal"
        outputs: dict[tuple[str, str], torch.Tensor] = {}
        variants = [(b, b, {}) for b in backends]
        if low_latency:  # the V2 low-latency path's other layout (RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT; token is default)
            variants += [(f"{b}-expand", b, {"RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT": "expand"})
                         for b in backends if b in V2_GENERATIONS]
        for backend, generation, extra in variants:
            wrapper = DeepEPWrapper.create(_config(rank, world, shape, low_latency),
                                           settings=_settings(RTP_LLM_DEEPEP_BACKEND=generation, **extra))
            try:
                out["resolved"][f"{mode}/{backend}"] = wrapper.backend.value
                cls = LowLatencyRouter if low_latency else NormalRouter
                for case in cases:
                    x, ids, w, ref, options = prepared[case.name]
                    router = cls(wrapper, options)
                    result = run_moe_layer(router, x, ids, w, experts, rank)
                    _sync(cuda)
                    assert router.handle is None and result.shape == x.shape and result.dtype == torch.bfloat16
                    outputs[(case.name, backend)] = result
                    out["errors"][f"{mode}/{backend}/{case.name}"] = _rel(result, ref)
                if low_latency:
                    router = cls(wrapper, RouterOptions())
                    if cuda:
                        out["graph"][backend] = _graph_replay(router, experts, rank, world, shape, device)
                    out["layout_ops"][backend] = getattr(router, "layout_ops", None)
                else:
                    x, ids, w, _, _ = prepared[cases[0].name]
                    router = cls(wrapper, RouterOptions())
                    p = router.prepare(x, None, None, w, ids)
                    payloads[backend] = (p.expert_x.clone(), p.expert_topk_ids.clone(), p.expert_topk_weights.clone(),
                                         list(p.expert_tokens_meta.expert_num_tokens_cpu))
                    router.finalize(CombineForwardPayload(p.expert_x), p.expert_topk_weights, p.expert_topk_ids,
                                    False, None)
                    out["alignment"][backend] = _expert_alignment(wrapper, rank, world, shape, experts, device)
            finally:
                DeepEPWrapper.reset()
        if "legacy" in backends:
            for backend in backends:
                for case in cases:
                    if backend != "legacy":
                        out["cross"][f"{mode}/{backend}/{case.name}"] = _rel(outputs[(case.name, backend)],
                                                                             outputs[(case.name, "legacy")])

    # The row-order contract: V2 order is unspecified; deterministic=True reproduces legacy order exactly.
    for backend in [b for b in backends if b in V2_GENERATIONS and "legacy" in backends]:
        wrapper = DeepEPWrapper.create(_config(rank, world, shape, False), settings=_settings(
            RTP_LLM_DEEPEP_BACKEND=backend, RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC="1"))
        try:
            x, ids, w, _, _ = prepared[cases[0].name]
            router = NormalRouter(wrapper)
            p = router.prepare(x, None, None, w, ids)
            det = (p.expert_x, p.expert_topk_ids, p.expert_topk_weights,
                   list(p.expert_tokens_meta.expert_num_tokens_cpu))
            order = canonical_row_order
            default, legacy = payloads[backend], payloads["legacy"]
            out["row_order"][backend] = {
                "deterministic_equals_legacy": all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                                                   for a, b in zip(det, legacy)),
                "default_order_equals_legacy": bool(torch.equal(default[0], legacy[0])),
                "default_rows_equal_as_set": bool(torch.equal(default[0][order(default[0])],
                                                              legacy[0][order(legacy[0])])),
            }
            router.finalize(CombineForwardPayload(p.expert_x), p.expert_topk_weights, p.expert_topk_ids, False, None)
        finally:
            DeepEPWrapper.reset()
    return out


# ---------------------------------------------------------------------------------------------- checks
def check_dense(per_rank: list[dict[str, Any]], backend: str, world: int) -> None:
    """Both routers, every case: the generation asked for ran, and its output equals the dense float32 MoE."""
    for rank, r in enumerate(per_rank):
        mine = {k: v for k, v in r["errors"].items() if k.split("/")[1] == backend}
        assert len(mine) == 2 * len(cases(world, 8)), (rank, backend, sorted(r["errors"]))
        assert (r["resolved"][f"normal/{backend}"], r["resolved"][f"low_latency/{backend}"]) == (backend, backend)
        for key, err in mine.items():
            assert err <= TOL, (world, rank, key, err)


def check_cross(per_rank: list[dict[str, Any]], backend: str) -> None:
    """Same inputs through ``backend`` and legacy: the same outputs within bf16 accuracy."""
    for rank, r in enumerate(per_rank):
        mine = {k: v for k, v in r["cross"].items() if k.split("/")[1] == backend}
        assert mine, (rank, backend, r["cross"])
        for key, err in mine.items():
            assert err <= TOL, (rank, key, err)


def check_fp8(per_rank: list[dict[str, Any]], backend: str) -> None:
    for r in per_rank:
        fp8 = {k: v for k, v in r["errors"].items() if k.endswith("/fp8") and k.split("/")[1] == backend}
        assert len(fp8) == 2 and all(v <= TOL for v in fp8.values()), fp8


def check_alignment(per_rank: list[dict[str, Any]], backend: str) -> None:
    """Counts = each local expert's true count rounded up to the alignment; rows carry the true counts; the layer
    is right; and the hot expert really needed more than one block (the check can tell a wrong rounding)."""
    hot = 0
    for rank, r in enumerate(per_rank):
        a = r["alignment"][backend]
        step = a["alignment"]
        assert a["counts"] == [-(-c // step) * step for c in a["true"]], (rank, backend, a)
        assert a["rows_per_expert"] == a["true"], (rank, backend, a)
        assert a["error"] <= TOL, (rank, backend, a)
        hot = max(hot, max(a["true"]))
    assert hot > per_rank[0]["alignment"][backend]["alignment"], "the check needs an expert above one block"


def check_graph(per_rank: list[dict[str, Any]], backend: str, bitwise: bool) -> None:
    for rank, r in enumerate(per_rank):
        replays = r["graph"][backend]["replays"]
        assert len(replays) == 2, (rank, backend, replays)
        for rel, exact in replays:
            assert rel <= TOL, (rank, backend, replays)
            if bitwise:
                assert exact, (rank, backend, "graph replay differs from eager", replays)


def check_row_order(per_rank: list[dict[str, Any]], backend: str) -> None:
    for r in per_rank:
        order = r["row_order"][backend]
        assert order["deterministic_equals_legacy"] and order["default_rows_equal_as_set"], order


# ---------------------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module")
def cpu_results() -> list[dict[str, Any]]:
    return spawn(_router_worker, 2, args=(cases(2, CPU_SHAPE.N), GENERATIONS, CPU_SHAPE, False),
                 env={"DEEPEP_SWITCH_PROVIDER": "reference", "OMP_NUM_THREADS": "1"}, timeout_s=240)


@pytest.mark.timeout(300)
def test_the_gpu_worker_on_the_reference_providers(cpu_results):
    """The GPU worker and checks, on 2 CPU ranks with every generation's reference provider (no CUDA graph)."""
    for backend in GENERATIONS:
        check_dense(cpu_results, backend, 2)
        check_fp8(cpu_results, backend)
        check_alignment(cpu_results, backend)
        assert all(r["layout_ops"][backend] == (None if backend == "legacy" else "torch") for r in cpu_results)
    for backend in V2_GENERATIONS:
        check_cross(cpu_results, backend)
        check_row_order(cpu_results, backend)
    assert all(r["graph"] == {} for r in cpu_results)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module", params=[2, 4], ids=["2gpu", "4gpu"])
def results(request) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    backends = runnable()
    if not backends:
        pytest.skip("no DeepEP generation can run in this process")
    out = spawn(_router_worker, world, args=(cases(world, GPU_SHAPE.N), backends, GPU_SHAPE), backend="nccl",
                env=GPU_ENV, timeout_s=560)
    record_gpu_results(f"gpu_routers_{world}", out)
    return world, out


GPU = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_both_routers_match_the_dense_float32_moe(results, backend):
    world, per_rank = results
    check_dense(per_rank, backend, world)


@pytest.mark.parametrize("backend", generation_params(V2_GENERATIONS, marks=GPU))
def test_outputs_agree_with_legacy(results, backend):
    if "legacy" not in runnable():
        pytest.skip("legacy cannot run in this process")
    check_cross(results[1], backend)


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_fp8_dispatch(results, backend):
    check_fp8(results[1], backend)


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_expert_alignment_128_counts(results, backend):
    check_alignment(results[1], backend)


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_low_latency_router_replays_in_a_cuda_graph(results, backend):
    check_graph(results[1], backend, bitwise=False)
    if backend in V2_GENERATIONS:
        assert all(r["layout_ops"][backend] == "triton" for r in results[1])


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_cuda_graph_replay_is_bitwise_equal_to_eager(results, backend):
    check_graph(results[1], backend, bitwise=True)


@pytest.mark.parametrize("backend", generation_params(V2_GENERATIONS, marks=GPU))
def test_expand_low_latency_layout(results, backend):
    """RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT=expand: every case matches the dense MoE, replays are bitwise eager."""
    world, per_rank = results
    label = f"{backend}-expand"
    for rank, r in enumerate(per_rank):
        mine = {k: v for k, v in r["errors"].items() if k.split("/")[1] == label}
        assert len(mine) == len(cases(world, 8)) and r["resolved"][f"low_latency/{label}"] == backend, (rank, mine)
        assert all(err <= TOL for err in mine.values()), (world, rank, mine)
        assert r["layout_ops"][label] == "triton", (rank, r["layout_ops"])
    check_graph(per_rank, label, bitwise=True)


@pytest.mark.parametrize("backend", generation_params(V2_GENERATIONS, marks=GPU))
def test_row_order_contract(results, backend):
    if "legacy" not in runnable():
        pytest.skip("legacy cannot run in this process")
    check_row_order(results[1], backend)
