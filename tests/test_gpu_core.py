"""GPU (real DeepEP): buffer sizes equal the library's hints, the reference providers agree with DeepEP,
create/reset cycles return memory, and a failing constructor (a missing ``EP_DISABLE_GIN``, or one refusing its
arguments on every rank) falls back to legacy on every rank, for every generation this process can run: legacy
and elastic on DeepEP 2.1's stack, legacy and ep on 2.5's (``tests/_generations``; the others skip with the reason).

Run on a machine with >= 2 GPUs and real DeepEP (see docs/gpu-validation.md). One process group per test module
keeps the JIT and NCCL start-up cost to a minimum; DeepEP 2.5 compiles each new dispatch/combine shape on first use
(4-6 s), which nothing here times. The same workers run on 2 CPU ranks with the reference providers as both sides
(small shapes, no memory measurements), so their logic is checked on every run of the suite.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest
import torch

from _generations import GENERATIONS, GPU_ENV, V2_GENERATIONS, generation_params, runnable
from _helpers import record_gpu_results, settings_from_env as _settings
from deepep_switch.launch import spawn
from deepep_switch.testing import layer_config

WORLD = 2


@dataclasses.dataclass(frozen=True)
class Shape:
    """Hidden ``H``, ``E`` experts, top-``K``, ``N`` tokens per rank (low-latency and V2 capacity)."""

    H: int
    E: int
    K: int
    N: int


GPU_SHAPE = Shape(H=7168, E=64, K=8, N=128)  # the shapes of the bench and of docs/performance.md
CPU_SHAPE = Shape(H=256, E=8, K=4, N=16)
GPU = [pytest.mark.gpu, pytest.mark.timeout(600)]


def _device(cuda: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _config(rank: int, world: int, shape: Shape, low_latency: bool):
    return layer_config(rank, world, hidden=shape.H, experts=shape.E, topk=shape.K, capacity=shape.N,
                        low_latency=low_latency)


def _inputs(rank: int, tokens: int, shape: Shape, device: torch.device,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn((tokens, shape.H), generator=gen).to(torch.bfloat16)
    ids = torch.rand((tokens, shape.E), generator=gen).argsort(dim=1)[:, :shape.K]
    ids = torch.where(torch.rand((tokens, shape.K), generator=gen) < 0.1, torch.full_like(ids, -1), ids)
    w = torch.rand((tokens, shape.K), generator=gen).float()
    return x.to(device), ids.to(device), w.to(device)


def _by_rows(x: torch.Tensor) -> torch.Tensor:
    """A row order that depends only on row content (rows are random, so it is a canonical order)."""
    from deepep_switch.testing import canonical_row_order

    return canonical_row_order(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _classes(backend: str) -> tuple[Any, Any]:
    """(the class the configured provider gives, the reference provider's): real DeepEP's on GPUs, the reference
    one twice on CPU."""
    from deepep_switch.backends import get_spec
    from deepep_switch.settings import load_settings

    spec = get_spec(backend)
    return spec.buffer_class(load_settings().settings.provider), spec.reference()


# ---------------------------------------------------------------------------------------------- sizes
def _sizes(rank: int, world: int, backends: tuple[str, ...], shape: Shape) -> dict[str, Any]:
    """Each generation's hints from its class and from the reference formulas, and what the wrapper built."""
    import torch.distributed as dist

    from deepep_switch import DeepEPWrapper
    from deepep_switch.providers.reference.hints import (elastic_buffer_size_hint, ep_buffer_size_hint,
                                                         low_latency_rdma_size_hint)

    group, H, E, K, N = dist.group.WORLD, shape.H, shape.E, shape.K, shape.N
    out: dict[str, Any] = {}
    for backend in backends:
        cls, ref = _classes(backend)
        if backend == "legacy":
            def nvl(c: Any) -> int:
                return max(int(c.get_dispatch_config(world).get_nvl_buffer_size_hint(H * 2, world)),
                           int(c.get_combine_config(world).get_nvl_buffer_size_hint(H * 2, world)))
            hints = {"nvl": nvl(cls), "ll": int(cls.get_low_latency_rdma_size_hint(N, H, world, E))}
            reference = {"nvl": nvl(ref), "ll": low_latency_rdma_size_hint(N, H, world, E)}
        else:
            formula = {"elastic": elastic_buffer_size_hint, "ep": ep_buffer_size_hint}[backend]
            hints = {"v2": int(cls.get_buffer_size_hint(group, N, H, num_topk=K))}
            reference = {"v2": formula(world, N, H, K)}
        built = {}
        for low_latency in (False, True):
            w = DeepEPWrapper.create(_config(rank, world, shape, low_latency),
                                     settings=_settings(RTP_LLM_DEEPEP_BACKEND=backend))
            buf = w.native_buffer
            actual = ({"nvl": int(buf.num_nvl_bytes), "rdma": int(buf.num_rdma_bytes)} if backend == "legacy"
                      else {backend: int(buf.num_bytes)})
            built["ll" if low_latency else "normal"] = dict(
                backend=w.backend.value, cls=f"{type(buf).__module__}.{type(buf).__name__}",
                is_the_class=type(buf) is cls, planned=dict(w.buffer_bytes), actual=actual,
                decision=w.decision.describe())
            DeepEPWrapper.reset()
        out[backend] = {"hints": hints, "reference_hints": reference, "built": built}
    return out


def check_sizes(per_rank: list[dict[str, Any]], backend: str) -> None:
    for rank, r in enumerate(per_rank):
        s = r["sizes"][backend]
        hints, built = s["hints"], s["built"]
        assert s["reference_hints"] == hints, ("reference hint formulas drifted from deep_ep", rank, backend, s)
        for mode in ("normal", "ll"):
            assert built[mode]["backend"] == backend and built[mode]["is_the_class"], (rank, mode, built[mode])
        if backend == "legacy":
            assert built["normal"]["planned"] == {"nvl": hints["nvl"], "rdma": 0}, built["normal"]
            assert built["normal"]["actual"] == {"nvl": hints["nvl"], "rdma": 0}, built["normal"]
            assert built["ll"]["planned"] == {"rdma": hints["ll"]}, built["ll"]
            assert built["ll"]["actual"] == {"nvl": 0, "rdma": hints["ll"]}, built["ll"]
        else:
            for mode in ("normal", "ll"):
                assert built[mode]["planned"] == built[mode]["actual"] == {backend: hints["v2"]}, built[mode]


# ---------------------------------------------------------------------------------------------- agreement
def _legacy_agreement(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, tokens: int, world: int,
                      shape: Shape) -> dict[str, Any]:
    """Legacy normal mode (rows, order, ids, weights, counts, combine) and low-latency mode (per-expert counts
    and row multisets, weighted combine): the real ``Buffer`` against ``ReferenceBuffer`` on the same inputs."""
    import torch.distributed as dist

    group, H, E, N = dist.group.WORLD, shape.H, shape.E, shape.N
    cls, ref_cls = _classes("legacy")
    out: dict[str, Any] = {}
    nvl = max(cls.get_dispatch_config(world).get_nvl_buffer_size_hint(H * 2, world),
              cls.get_combine_config(world).get_nvl_buffer_size_hint(H * 2, world))
    real, ref = cls(group, num_nvl_bytes=nvl, explicitly_destroy=True), ref_cls(group)
    results = []
    for buf in (real, ref):
        a, b, c, d, _ = buf.get_dispatch_layout(ids, E)
        rx, ri, rw, counts, handle, _ = buf.dispatch(x, None, a, b, d, c, ids, w, expert_alignment=4)
        combined, combined_w, _ = buf.combine(rx, handle, topk_weights=rw)
        results.append((a, c, d, rx, ri, rw, counts, combined, combined_w))
    out["layout_equal"] = all(torch.equal(p, q) for p, q in zip(results[0][:3], results[1][:3]))
    out["rows_equal"] = all(torch.equal(p, q) for p, q in zip(results[0][3:6], results[1][3:6]))
    out["counts"] = (list(results[0][6]), list(results[1][6]))
    out["combine_maxdiff"] = (results[0][7].float() - results[1][7].float()).abs().max().item() if tokens else 0.0
    out["combine_w_maxdiff"] = (results[0][8] - results[1][8]).abs().max().item() if tokens else 0.0
    out["rows"] = results[0][3]
    real.destroy()

    rdma = cls.get_low_latency_rdma_size_hint(N, H, world, E)
    real = cls(group, num_rdma_bytes=rdma, low_latency_mode=True, num_qps_per_rank=E // world,
               allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)
    ref = ref_cls(group, low_latency_mode=True)
    ll = []
    for buf in (real, ref):
        rx, count, handle, _, _ = buf.low_latency_dispatch(x, ids, N, E, use_fp8=False)
        rows = [rx[e, :n][_by_rows(rx[e, :n])] for e, n in enumerate(count.tolist())]
        combined, _, _ = buf.low_latency_combine(rx, ids, w, handle)
        ll.append((count.cpu(), rows, combined))
    out["ll_counts_equal"] = torch.equal(ll[0][0], ll[1][0])
    out["ll_rows_equal"] = all(torch.equal(p, q) for p, q in zip(ll[0][1], ll[1][1]))
    out["ll_combine_rel"] = _rel(ll[0][2], ll[1][2]) if tokens else 0.0
    real.destroy()
    return out


def _v2_agreement(backend: str, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, tokens: int, world: int,
                  shape: Shape, legacy: Optional[dict[str, Any]]) -> dict[str, Any]:
    """ElasticBuffer or EPBuffer against its reference: same row set as legacy (order free, weights unmasked),
    the no-sync and expand layouts, combines."""
    import torch.distributed as dist

    group, H, E, K, N = dist.group.WORLD, shape.H, shape.E, shape.K, shape.N
    cls, ref_cls = _classes(backend)
    real = cls(group, num_max_tokens_per_rank=N, hidden=H, num_topk=K, explicitly_destroy=True)
    ref = ref_cls(group, num_max_tokens_per_rank=N, hidden=H, num_topk=K, explicitly_destroy=True)
    per: dict[str, list[Any]] = {"sync": [], "nosync": [], "expand": []}
    for buf in (real, ref):
        rx, ri, rw, h, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, num_experts=E, expert_alignment=4)
        order = torch.argsort(h.recv_src_metadata[:, 0])
        combined, combined_w, _ = buf.combine(rx, h, topk_weights=rw)
        per["sync"].append((rx[order], ri[order], rw[order], list(h.num_recv_tokens_per_expert_list), combined,
                            combined_w, order))
        rx, ri, rw, h, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, num_experts=E, do_cpu_sync=False)
        valid = int(h.psum_num_recv_tokens_per_scaleup_rank[-1])
        combined, _, _ = buf.combine(rx, h)
        per["nosync"].append((rx.shape[0], valid, combined))
        rx, ri, rw, h, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, num_experts=E, do_cpu_sync=False,
                                        do_expand=True)
        counts = h.num_unaligned_recv_tokens_per_expert
        psum = h.psum_num_recv_tokens_per_expert
        starts = (psum - counts).tolist()
        experts_rows = [rx[s:s + n][_by_rows(rx[s:s + n])] for s, n in zip(starts, counts.tolist())]
        combined, _, _ = buf.combine(rx, h)
        per["expand"].append((counts.cpu(), psum.cpu(), experts_rows, ri is None, tuple(rw.shape), combined))
    out: dict[str, Any] = {}
    s_real, s_ref = per["sync"]
    out["rows_equal"] = all(torch.equal(p, q) for p, q in zip(s_real[:3], s_ref[:3]))
    out["rows_equal_legacy"] = torch.equal(s_real[0], legacy["rows"]) if legacy is not None else None
    out["order_is_legacy"] = bool(torch.equal(s_real[6], torch.arange(s_real[6].numel(), device=s_real[6].device)))
    out["weights_unmasked"] = bool((s_real[2][s_real[1] < 0] != 0).any()) if s_real[1].numel() else None
    out["counts"] = (s_real[3], s_ref[3], legacy["counts"][0] if legacy is not None else s_ref[3])
    out["combine_rel"] = _rel(s_real[4], s_ref[4]) if tokens else 0.0
    out["combine_w_maxdiff"] = (s_real[5] - s_ref[5]).abs().max().item() if tokens else 0.0
    n_real, n_ref = per["nosync"]
    out["nosync"] = (n_real[0], n_real[1], n_ref[1], world * N)
    out["nosync_combine_rel"] = _rel(n_real[2], n_ref[2]) if tokens else 0.0
    e_real, e_ref = per["expand"]
    out["expand_counts_equal"] = torch.equal(e_real[0], e_ref[0]) and torch.equal(e_real[1], e_ref[1])
    out["expand_rows_equal"] = all(torch.equal(p, q) for p, q in zip(e_real[2], e_ref[2]))
    out["expand_shapes"] = (e_real[3], e_ref[3], len(e_real[4]), len(e_ref[4]))
    out["expand_combine_rel"] = _rel(e_real[5], e_ref[5]) if tokens else 0.0
    real.destroy()
    ref.destroy()
    return out


def _agreement(rank: int, world: int, backends: tuple[str, ...], shape: Shape, cuda: bool) -> dict[str, Any]:
    """Same inputs through the configured provider and the reference providers over the same group (10% of
    top-k slots -1, uneven ranks)."""
    import torch.distributed as dist

    tokens = ([shape.N, 0, shape.N * 3 // 5, 5][rank] if world == 4 else [shape.N, shape.N // 2 - 3][rank])
    x, ids, w = _inputs(rank, tokens, shape, _device(cuda))
    out: dict[str, Any] = {}
    legacy = _legacy_agreement(x, ids, w, tokens, world, shape) if "legacy" in backends else None
    if legacy is not None:
        out["legacy"] = {k: v for k, v in legacy.items() if k != "rows"}
    for backend in backends:
        if backend in V2_GENERATIONS:
            out[backend] = _v2_agreement(backend, x, ids, w, tokens, world, shape, legacy)
    dist.barrier()
    return out


def check_agreement(per_rank: list[dict[str, Any]], backend: str) -> None:
    for rank, r in enumerate(per_rank):
        a = r["agreement"][backend]
        if backend == "legacy":
            assert a["layout_equal"] and a["rows_equal"], (rank, a)
            assert a["counts"][0] == a["counts"][1]
            assert a["combine_maxdiff"] == 0.0 and a["combine_w_maxdiff"] < 1e-6, (rank, a)
            assert a["ll_counts_equal"] and a["ll_rows_equal"] and a["ll_combine_rel"] < 1e-2, (rank, a)
            continue
        assert a["rows_equal"] and a["rows_equal_legacy"] in (True, None), (rank, a)
        assert a["counts"][0] == a["counts"][1] == a["counts"][2], (rank, a["counts"])
        assert a["weights_unmasked"] in (True, None), "DeepEP V2 keeps weights where the id is -1"
        assert a["combine_rel"] <= 1e-2 and a["combine_w_maxdiff"] < 1e-6, (rank, a)
        rows, valid_real, valid_ref, worst = a["nosync"]
        assert rows == worst and valid_real == valid_ref, (rank, a["nosync"])
        assert a["nosync_combine_rel"] <= 1e-2
        assert a["expand_counts_equal"] and a["expand_rows_equal"], (rank, a)
        assert a["expand_shapes"][:2] == (True, True) and a["expand_shapes"][2] == a["expand_shapes"][3]
        assert a["expand_combine_rel"] <= 1e-2


# ---------------------------------------------------------------------------------------------- memory
def _settled() -> tuple[int, int]:
    """(memory_reserved, free device bytes) once finished collectives have released their tensors."""
    import gc
    import time

    torch.cuda.synchronize()
    time.sleep(0.5)  # the NCCL watchdog drops completed works (and the tensors they hold) asynchronously
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0]


def _memory(rank: int, world: int, backends: tuple[str, ...], shape: Shape, cycles: int) -> dict[str, Any]:
    from deepep_switch import DeepEPWrapper

    kinds = [(backend, low_latency) for low_latency in (False, True) for backend in backends]
    for backend, low_latency in kinds:  # warm up every kind once (JIT, NVSHMEM, NCCL windows)
        DeepEPWrapper.create(_config(rank, world, shape, low_latency),
                             settings=_settings(RTP_LLM_DEEPEP_BACKEND=backend))
        DeepEPWrapper.reset()
    base_reserved, base_free = _settled()
    samples = []
    for i in range(cycles):
        backend, low_latency = kinds[i % len(kinds)]
        w = DeepEPWrapper.create(_config(rank, world, shape, low_latency),
                                 settings=_settings(RTP_LLM_DEEPEP_BACKEND=backend))
        peak_free = torch.cuda.mem_get_info()[0]
        nbytes = sum(w.buffer_bytes.values())
        resolved = w.backend.value
        DeepEPWrapper.reset()
        reserved, free = _settled()
        samples.append((backend, resolved, low_latency, nbytes, base_free - peak_free, reserved, free))
    return {"base_reserved": base_reserved, "base_free": base_free,
            "total": torch.cuda.get_device_properties(rank).total_memory, "samples": samples}


def _core_worker(rank: int, world: int, backends: tuple[str, ...], shape: Shape, cuda: bool = True) -> dict[str, Any]:
    return {"backends": list(backends), "sizes": _sizes(rank, world, backends, shape),
            "agreement": _agreement(rank, world, backends, shape, cuda),
            "memory": _memory(rank, world, backends, shape, 20) if cuda else None}


# ---------------------------------------------------------------------------------------------- fallback
def _closed_form_round_trip(wrapper: Any, rank: int, world: int, shape: Shape, cuda: bool) -> bool:
    """A normal-router round trip whose executor returns its rows: bitwise ``x * (number of destination ranks)``."""
    from routers import CombineForwardPayload, NormalRouter

    tokens = min(32, shape.N)  # within the V2 buffers' capacity
    x, ids, wts = _inputs(rank, tokens, shape, _device(cuda))
    router = NormalRouter(wrapper)
    payload = router.prepare(x, None, None, wts, ids)
    combined = router.finalize(CombineForwardPayload(payload.expert_x), payload.expert_topk_weights,
                               payload.expert_topk_ids, False, None)
    hit = torch.zeros((tokens, world + 1), dtype=torch.bool, device=ids.device)
    hit.scatter_(1, torch.where(ids >= 0, ids // (shape.E // world), world), True)
    expected = (x.float() * hit[:, :world].sum(1, keepdim=True)).to(torch.bfloat16)
    return bool(torch.equal(combined, expected))


def _gin_worker(rank: int, world: int, backend: str, shape: Shape) -> dict[str, Any]:
    """No EP_DISABLE_GIN on a host without an RDMA NIC: what an operator who forgot it would see."""
    from deepep_switch import DeepEPWrapper

    out: dict[str, Any] = {}
    settings = _settings(RTP_LLM_DEEPEP_BACKEND=backend)
    w = DeepEPWrapper.create(_config(rank, world, shape, False), settings=settings)
    out["preflight"] = (w.backend.value, w.decision.reasons, w.decision.fallback)
    out["legacy_works_after_preflight_fallback"] = _closed_form_round_trip(w, rank, world, shape, True)
    DeepEPWrapper.reset()
    if backend != "elastic":
        return out

    # Force past preflight so that 2.1's ElasticBuffer constructor itself fails ("NCCL GIN is unavailable", seen
    # on these hosts): every rank must fall back together. (2.5's EPBuffer without GIN has not been seen here; the
    # constructor path is checked for it by test_a_failing_constructor_falls_back_to_legacy_on_every_rank.)
    import deepep_switch.wrapper as wrapper_module
    from deepep_switch.preflight import PreflightReport

    real_resolve = wrapper_module.resolve_backend
    wrapper_module.resolve_backend = lambda group, **kw: real_resolve(
        group, **{**kw, "preflight": PreflightReport(provider=settings.settings.provider, has_buffer=True,
                                                     has_elastic_buffer=True)})
    try:
        w = DeepEPWrapper.create(_config(rank, world, shape, False), settings=settings)
    finally:
        wrapper_module.resolve_backend = real_resolve
    out["constructor"] = (w.backend.value, w.decision.fallback)
    out["legacy_works_after_fallback"] = _closed_form_round_trip(w, rank, world, shape, True)
    DeepEPWrapper.reset()
    return out


REFUSED_ARGUMENT = "not_a_deep_ep_argument"


def _failing_constructor_worker(rank: int, world: int, backend: str, shape: Shape, cuda: bool = True
                                ) -> dict[str, Any]:
    """Every rank's ``backend`` constructor raises (its plan hands the real class a keyword it does not take:
    Python's TypeError, before DeepEP starts anything collective); every rank must build legacy instead, run on
    it, and build ``backend`` again once the plan is sound."""
    from deepep_switch import DeepEPWrapper
    from deepep_switch.backends import registry

    spec = registry.get_spec(backend)

    def refused_plan(buffer_cls: Any, group: Any, config: Any, settings: Any) -> Any:
        plan = spec.plan(buffer_cls, group, config, settings)
        return dataclasses.replace(plan, kwargs={**plan.kwargs, REFUSED_ARGUMENT: True})

    out: dict[str, Any] = {}
    settings = _settings(RTP_LLM_DEEPEP_BACKEND=backend)
    registry._SPECS[backend] = dataclasses.replace(spec, plan=refused_plan)
    try:
        w = DeepEPWrapper.create(_config(rank, world, shape, False), settings=settings)
    finally:
        registry._SPECS[backend] = spec
    out["fallback"] = (w.backend.value, w.decision.fallback)
    out["legacy_works_after_fallback"] = _closed_form_round_trip(w, rank, world, shape, cuda)
    DeepEPWrapper.reset()
    w = DeepEPWrapper.create(_config(rank, world, shape, False), settings=settings)
    out["rebuilt"] = (w.backend.value, w.decision.fallback)
    out["works_after_rebuild"] = _closed_form_round_trip(w, rank, world, shape, cuda)
    DeepEPWrapper.reset()
    return out


def check_failing_constructor(per_rank: list[dict[str, Any]], backend: str) -> None:
    for r in per_rank:
        resolved, fallback = r["fallback"]
        assert resolved == "legacy" and fallback, r
        assert f"{backend} buffer construction failed on ranks [0, 1]" in fallback and REFUSED_ARGUMENT in fallback, r
        assert r["legacy_works_after_fallback"], r
        assert r["rebuilt"] == (backend, None) and r["works_after_rebuild"], r


# ---------------------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module")
def cpu_core_results() -> list[dict[str, Any]]:
    return spawn(_core_worker, WORLD, args=(GENERATIONS, CPU_SHAPE, False),
                 env={"DEEPEP_SWITCH_PROVIDER": "reference", "OMP_NUM_THREADS": "1"}, timeout_s=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", GENERATIONS)
def test_the_gpu_workers_on_the_reference_providers(cpu_core_results, backend):
    """The GPU workers and checks on 2 CPU ranks, the reference providers on both sides (no memory figures)."""
    check_sizes(cpu_core_results, backend)
    check_agreement(cpu_core_results, backend)
    if backend in V2_GENERATIONS:
        check_failing_constructor(spawn(_failing_constructor_worker, WORLD, args=(backend, CPU_SHAPE, False),
                                        env={"DEEPEP_SWITCH_PROVIDER": "reference", "OMP_NUM_THREADS": "1"},
                                        timeout_s=120), backend)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def core_results() -> list[dict[str, Any]]:
    backends = runnable()
    if not backends:
        pytest.skip("no DeepEP generation can run in this process")
    results = spawn(_core_worker, WORLD, args=(backends, GPU_SHAPE), backend="nccl", env=GPU_ENV, timeout_s=540)
    record_gpu_results("gpu_core", results)
    return results


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_wrapper_builds_real_buffers_sized_by_the_hints(core_results, backend):
    check_sizes(core_results, backend)


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_reference_providers_agree_with_deep_ep(core_results, backend):
    check_agreement(core_results, backend)


@pytest.mark.parametrize("backend", generation_params(GENERATIONS, marks=GPU))
def test_create_reset_cycles_return_memory(core_results, backend):
    for rank, r in enumerate(core_results):
        m = r["memory"]
        assert len(m["samples"]) == 20
        mine = [s for s in m["samples"] if s[0] == backend]
        assert mine, (rank, backend, m["samples"])
        for requested, resolved, low_latency, nbytes, taken, reserved, free in mine:
            assert resolved == requested, (rank, requested, resolved)
            # "Within 1% of the baseline"; the caching allocator reserves whole 2 MiB segments, so a near-zero
            # baseline is allowed one segment of slack.
            assert reserved <= m["base_reserved"] * 1.01 + (2 << 20), (rank, backend, low_latency, reserved)
            assert abs(free - m["base_free"]) <= 0.01 * m["total"], (rank, backend, low_latency, free, m["base_free"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", generation_params(V2_GENERATIONS, marks=GPU))
def test_missing_gin_falls_back_to_legacy_on_every_rank(backend):
    if "legacy" not in runnable():
        pytest.skip("legacy cannot run in this process")
    results = spawn(_gin_worker, WORLD, args=(backend, GPU_SHAPE), backend="nccl", env={"EP_DISABLE_GIN": None},
                    timeout_s=240)
    record_gpu_results(f"gpu_gin_fallback_{backend}", results)
    for r in results:
        resolved, reasons, fallback = r["preflight"]
        assert resolved == "legacy" and fallback is None and any("gin" in reason for reason in reasons), r
        assert r["legacy_works_after_preflight_fallback"], r
        if backend == "elastic":
            resolved, fallback = r["constructor"]
            assert resolved == "legacy" and fallback and "ranks [0, 1]" in fallback, r
            assert r["legacy_works_after_fallback"], r


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", generation_params(V2_GENERATIONS, marks=GPU))
def test_a_failing_constructor_falls_back_to_legacy_on_every_rank(backend):
    if "legacy" not in runnable():
        pytest.skip("legacy cannot run in this process")
    results = spawn(_failing_constructor_worker, WORLD, args=(backend, GPU_SHAPE), backend="nccl", env=GPU_ENV,
                    timeout_s=240)
    record_gpu_results(f"gpu_failing_constructor_{backend}", results)
    check_failing_constructor(results, backend)
