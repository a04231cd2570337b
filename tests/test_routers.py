"""Both routers on every generation (legacy, elastic, ep; reference providers, 2 and 4 gloo processes) against a
dense float32 MoE."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import pytest
import torch
import torch.distributed as dist

from deepep_switch import DeepEPWrapper, DeepepWrapperConfig
from _helpers import settings_from_env
from deepep_switch.launch import spawn
from deepep_switch.quant import Quant
from deepep_switch.testing import (ToyExperts, canonical_row_order, dense_reference, layer_config, make_problem,
                                   relative_error, run_moe_layer)
from routers import CombineForwardPayload, LowLatencyRouter, NormalRouter, RouterOptions

TOL = 1e-2  # bf16 end to end
BACKENDS = ("legacy", "elastic", "ep")
# Low-latency only: the elastic path's other layout (the default, token, runs as "elastic" and "ep").
LL_VARIANTS = {"elastic-expand": ("elastic", {"RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT": "expand"})}


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: tuple[int, ...]     # per TP group (== per rank when tp == 1)
    hidden: int
    experts: int
    topk: int
    fp8: bool = False
    alignment: int = 1
    global_ids: bool = False
    tp: int = 1
    seed: int = 0


def _settings(backend: str, **extra: str):
    return settings_from_env(RTP_LLM_DEEPEP_BACKEND=backend, **extra)


def _wrapper_config(rank: int, world: int, case: Case, low_latency: bool) -> DeepepWrapperConfig:
    return layer_config(rank, world, hidden=case.hidden, experts=case.experts, topk=case.topk,
                        capacity=max(max(case.tokens), 1), low_latency=low_latency, tp_size=case.tp,
                        quant=Quant.FP8_BLOCK if case.fp8 else Quant.NONE)


def _tp_groups(world: int, tp: int) -> list[Any]:
    return [dist.new_group(list(range(g * tp, (g + 1) * tp))) for g in range(world // tp)]


def run_layer(router: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, experts: ToyExperts,
              rank: int, low_latency: bool) -> torch.Tensor:
    out = run_moe_layer(router, x, ids, w, experts, rank)
    assert router.handle is None
    return out


def _layer_worker(rank: int, world: int, cases: list[Case]) -> list[dict]:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    groups = {tp: _tp_groups(world, tp) for tp in {c.tp for c in cases} if tp > 1}
    results = []
    for case in cases:
        group_index, tp_rank = rank // case.tp, rank % case.tp
        problem = make_problem(case.seed, list(case.tokens), case.hidden, case.experts, case.topk)
        experts = ToyExperts(case.seed, case.experts, case.hidden)
        reference = dense_reference(problem, experts, fp8=case.fp8)[problem.rank_slice(group_index)]
        x, ids, w = problem.local(group_index)
        ids = ids.to(torch.int32) if case.seed % 2 else ids  # rtp-llm's Triton executor uses int32 ids
        options = RouterOptions(quant=Quant.FP8_BLOCK if case.fp8 else Quant.NONE, expert_alignment=case.alignment, global_expert_ids=case.global_ids,
                                tp_rank=tp_rank, tp_size=case.tp,
                                tp_group=groups[case.tp][group_index] if case.tp > 1 else None)
        row: dict = {"case": case, "tokens": x.shape[0]}
        for low_latency in (False, True):
            for name in BACKENDS + (tuple(LL_VARIANTS) if low_latency else ()):
                backend, extra = LL_VARIANTS.get(name, (name, {}))
                wrapper = DeepEPWrapper.create(_wrapper_config(rank, world, case, low_latency),
                                               settings=_settings(backend, **extra))
                try:
                    router = (LowLatencyRouter if low_latency else NormalRouter)(
                        wrapper, dataclasses.replace(options, expert_alignment=1) if low_latency else options)
                    assert router.backend.value == backend
                    out = run_layer(router, x, ids, w, experts, rank, low_latency)
                finally:
                    DeepEPWrapper.reset()
                assert out.shape == x.shape and out.dtype == torch.bfloat16
                key = ("ll" if low_latency else "normal", name)
                row[key] = (relative_error(out, reference) if x.shape[0] else 0.0, out)
        results.append(row)
    return results


def _random_cases(world: int, count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        experts = rng.choice([e for e in (8, 16, 32, 64) if e % world == 0])
        tokens = tuple(rng.choice([0, 1, 3, 7, 12, 20]) for _ in range(world))
        cases.append(Case(tokens=tokens, hidden=rng.choice([128, 256, 384]), experts=experts,
                          topk=rng.choice([1, 2, 4, min(8, experts)]), fp8=rng.random() < 0.4,
                          alignment=rng.choice([1, 1, 4, 128]), global_ids=rng.random() < 0.3, seed=seed + i))
    return cases


def _check(results: list[list[dict]]) -> None:
    for rank, rows in enumerate(results):
        for row in rows:
            for mode in ("normal", "ll"):
                err_l, out_l = row[(mode, "legacy")]
                for backend in BACKENDS[1:] + (tuple(LL_VARIANTS) if mode == "ll" else ()):
                    err, out = row[(mode, backend)]
                    label = f"rank {rank} {mode} {backend} {row['case']}"
                    assert err_l <= TOL and err <= TOL, (label, err_l, err)
                    if row["tokens"]:
                        assert relative_error(out, out_l) <= TOL, label


CASES_2 = _random_cases(2, 10, seed=100) + [
    Case(tokens=(0, 0), hidden=128, experts=8, topk=2),                       # nobody sends anything
    Case(tokens=(16, 0), hidden=256, experts=8, topk=8, fp8=True, alignment=128),
    Case(tokens=(9, 4), hidden=128, experts=64, topk=1, global_ids=True),
]
CASES_4 = _random_cases(4, 6, seed=200) + [
    Case(tokens=(5, 0, 9, 1), hidden=256, experts=16, topk=4, fp8=True),
    Case(tokens=(11, 4), hidden=128, experts=32, topk=4, tp=2, seed=7),       # TP=2: 2 groups of 2 ranks
    Case(tokens=(0, 3), hidden=256, experts=8, topk=2, tp=2, fp8=True, seed=9),
    Case(tokens=(6, 6), hidden=128, experts=16, topk=2, tp=4, seed=11),        # one TP group spanning EP
]
CASES_4 = [dataclasses.replace(c, tokens=c.tokens[:4 // c.tp]) if c.tp > 1 else c for c in CASES_4]


@pytest.mark.timeout(240)
def test_moe_layer_two_ranks_matches_dense_reference_on_every_backend():
    _check(spawn(_layer_worker, 2, args=(CASES_2,), timeout_s=200))


@pytest.mark.timeout(240)
def test_moe_layer_four_ranks_matches_dense_reference_on_every_backend():
    _check(spawn(_layer_worker, 4, args=(CASES_4,), timeout_s=200))


# ------------------------------------------------------------------------------- the payload itself

def _payload_worker(rank: int, world: int) -> dict:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    case = Case(tokens=(13, 9), hidden=256, experts=16, topk=4, alignment=4)
    problem = make_problem(5, list(case.tokens), case.hidden, case.experts, case.topk, drop_prob=0.2)
    x, ids, w = problem.local(rank)
    out: dict = {}
    deterministic = {"RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC": "1"}  # the knob applies to ep too
    for name, backend, extra in (("legacy", "legacy", {}), ("elastic", "elastic", {}), ("ep", "ep", {}),
                                 ("elastic_det", "elastic", deterministic), ("ep_det", "ep", deterministic),
                                 ("elastic_expand", "elastic", {"RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT": "expand"})):
        for low_latency in (False, True):
            wrapper = DeepEPWrapper.create(_wrapper_config(rank, world, case, low_latency),
                                           settings=_settings(backend, **extra))
            router = (LowLatencyRouter if low_latency else NormalRouter)(
                wrapper, RouterOptions(expert_alignment=1 if low_latency else 4))
            p = router.prepare(x, None, None, w, ids)
            meta = p.expert_tokens_meta
            out[(name, low_latency)] = dict(
                x=p.expert_x, ids=p.expert_topk_ids, w=p.expert_topk_weights, scale=p.expert_x_scale,
                counts=meta.expert_num_tokens, counts_cpu=meta.expert_num_tokens_cpu, expected_m=meta.expected_m,
                local=p.expert_ids_are_local, origin=p.expert_x_origin_dtype)
            router._handle = None  # drop the open dispatch without a combine (the buffer is reset next)
            DeepEPWrapper.reset()
    return out


def _sorted_rows(p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = canonical_row_order(p["x"])
    return p["x"][order], p["ids"][order], p["w"][order]


@pytest.mark.timeout(120)
def test_same_payload_on_every_backend_row_order_aside():
    for rank, out in enumerate(spawn(_payload_worker, 2, timeout_s=90)):
        legacy, elastic, det = out[("legacy", False)], out[("elastic", False)], out[("elastic_det", False)]
        ep, ep_det = out[("ep", False)], out[("ep_det", False)]
        for other in (elastic, det, ep, ep_det):
            assert other["counts_cpu"] == legacy["counts_cpu"]
            assert torch.equal(other["counts"], legacy["counts"]) and other["counts"].dtype == torch.int32
            assert other["local"] is legacy["local"] is True and other["origin"] == torch.bfloat16
            for a, b in zip(_sorted_rows(other), _sorted_rows(legacy)):
                assert torch.equal(a, b), rank
        assert bool((legacy["w"][legacy["ids"] < 0] == 0).all()) and bool((elastic["w"][elastic["ids"] < 0] == 0).all())
        # Unspecified order by default (the reference shuffles like DeepEP V2), legacy order when deterministic.
        assert not torch.equal(elastic["x"], legacy["x"]), "expected a shuffled elastic row order"
        assert not torch.equal(ep["x"], legacy["x"]), "expected a shuffled ep row order"
        for key in ("x", "ids", "w"):
            assert torch.equal(det[key], legacy[key]) and torch.equal(ep_det[key], legacy[key]), key

        ll_legacy = out[("legacy", True)]
        for name in ("elastic", "ep", "elastic_expand"):
            ll_other = out[(name, True)]
            assert torch.equal(ll_legacy["counts"], ll_other["counts"]) and ll_other["counts"].dtype == torch.int32
            assert ll_legacy["x"].shape == ll_other["x"].shape and ll_legacy["expected_m"] == ll_other["expected_m"]
            assert ll_other["counts_cpu"] is None and ll_other["local"] is False
            for e, n in enumerate(ll_legacy["counts"].tolist()):
                rows_l = ll_legacy["x"][e, :n]
                rows_o = ll_other["x"][e, :n]
                key = canonical_row_order
                assert torch.equal(rows_l[key(rows_l)], rows_o[key(rows_o)]), (rank, name, e)


# ------------------------------------------------------------------------------- errors and lifecycle

def _errors_worker(rank: int, world: int) -> dict:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    case = Case(tokens=(8, 8), hidden=128, experts=8, topk=2)
    problem = make_problem(1, list(case.tokens), case.hidden, case.experts, case.topk)
    x, ids, w = problem.local(rank)
    out: dict = {}

    def capture(name: str, fn) -> None:
        try:
            fn()
            out[name] = "ok"
        except Exception as exc:  # record the type and message for the parent to check
            out[name] = f"{type(exc).__name__}: {exc}"

    for backend in BACKENDS:
        wrapper = DeepEPWrapper.create(_wrapper_config(rank, world, case, True), settings=_settings(backend))
        router = LowLatencyRouter(wrapper, RouterOptions(), opt_level=1, pertoken_quant=False)
        # Rank 0 alone makes every bad call: each must fail before any collective, or it would hang.
        if rank == 0:
            capture(f"{backend}.scale", lambda: router.prepare(x, x, None, w, ids))
            capture(f"{backend}.over_capacity", lambda: router.prepare(torch.cat([x, x]), None, None,
                                                                       torch.cat([w, w]), torch.cat([ids, ids])))
            capture(f"{backend}.fp16", lambda: router.prepare(x.half(), None, None, w, ids))
            capture(f"{backend}.topk_width", lambda: router.prepare(x, None, None, w[:, :1], ids[:, :1]))
            capture(f"{backend}.weights_dtype", lambda: router.prepare(x, None, None, w.double(), ids))
            capture(f"{backend}.finalize_first", lambda: router.finalize(
                CombineForwardPayload(x), w, ids, False, {"original_num_tokens": x.shape[0]}))
            capture(f"{backend}.unknown_kwarg", lambda: router.prepare(x, None, None, w, ids, zero_copy=True))
        dist.barrier()
        capture(f"{backend}.normal_router_on_ll_wrapper", lambda: NormalRouter(wrapper))
        payload = router.prepare(x, None, None, w, ids, pertoken_quant=True)
        capture(f"{backend}.prepare_twice", lambda: router.prepare(x, None, None, w, ids))
        capture(f"{backend}.skip_allreduce", lambda: router.finalize(
            CombineForwardPayload(payload.expert_x), w, ids, False, {}, skip_allreduce=True))
        out[f"{backend}.handle_kept_after_argument_error"] = router.handle is not None
        real_combine = router.path.combine

        def broken_combine(*args):
            raise RuntimeError("combine failed (injected)")

        router.path.combine = broken_combine
        capture(f"{backend}.combine_error", lambda: router.finalize(
            CombineForwardPayload(payload.expert_x), w, ids, False, {}))
        out[f"{backend}.handle_cleared_after_error"] = router.handle is None
        router.path.combine = real_combine
        payload = router.prepare(x, None, None, w, ids)
        y = CombineForwardPayload(payload.expert_x)
        router.finalize(y, payload.expert_topk_weights, payload.expert_topk_ids, False, None, opt_level=0)
        out[f"{backend}.handle_cleared"] = router.handle is None
        DeepEPWrapper.reset()
    return out


@pytest.mark.timeout(120)
def test_router_errors_come_before_communication():
    results = spawn(_errors_worker, 2, timeout_s=90)
    for backend in BACKENDS:
        r0 = results[0]
        assert r0[f"{backend}.scale"].startswith("ValueError") and "a1_scale" in r0[f"{backend}.scale"]
        assert r0[f"{backend}.over_capacity"].startswith("ValueError") and "capacity of 8" in r0[f"{backend}.over_capacity"]
        assert r0[f"{backend}.fp16"].startswith("ValueError")
        assert r0[f"{backend}.topk_width"].startswith("ValueError")
        assert r0[f"{backend}.weights_dtype"].startswith("ValueError")
        assert r0[f"{backend}.finalize_first"].startswith("RuntimeError")
        assert r0[f"{backend}.unknown_kwarg"].startswith("TypeError")
        for r in results:
            assert r[f"{backend}.normal_router_on_ll_wrapper"].startswith("ValueError")
            assert r[f"{backend}.prepare_twice"].startswith("RuntimeError")
            assert r[f"{backend}.skip_allreduce"].startswith("ValueError")
            assert r[f"{backend}.handle_kept_after_argument_error"] is True
            assert "injected" in r[f"{backend}.combine_error"]
            assert r[f"{backend}.handle_cleared_after_error"] is True
            assert r[f"{backend}.handle_cleared"] is True


@pytest.mark.gpu
def test_pinned_counts_uploader_reuses_its_staging_rows():
    from routers.normal import PinnedCountsUploader

    device = torch.device("cuda", 0)
    upload = PinnedCountsUploader(4, device)
    outs = [upload([i, i + 1, i + 2, i + 3], device) for i in range(2 * PinnedCountsUploader.SLOTS + 1)]
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        assert out.dtype == torch.int32 and out.device == device
        assert out.tolist() == [i, i + 1, i + 2, i + 3]


def test_global_ids_table_matches_the_where_formula():
    ids = torch.tensor([[-1, 0, 3], [2, -1, -1], [1, 1, 0]])
    for rank in (0, 1, 3):
        router = object.__new__(NormalRouter)  # only the fields the table reads
        router.ep_rank, router.num_local_experts, router.num_experts = rank, 4, 16
        router._global_ids = router._global_id_table(torch.device("cpu"))
        offset, dummy = rank * 4, 15 if rank == 0 else 0
        want = torch.where(ids < 0, torch.full_like(ids, dummy), ids + offset)
        got = router._to_global(ids)
        assert torch.equal(got, want) and got.dtype == torch.int64, rank
        assert router._to_global(ids[:0]).shape == (0, 3)
