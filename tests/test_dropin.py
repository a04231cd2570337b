"""rtp-llm drop-in behaviour on the reference providers: the handle as rtp-llm reads it on every backend,
destroy_buffer / rebuild_buffer with routers that follow, the guarded buffer, init_deepep_wrapper's token budget,
and install() binding rtp-llm's own symbols to ours."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from _helpers import settings_from_env
from deepep_switch import DeepEPWrapper
from deepep_switch.launch import spawn
from deepep_switch.testing import (ToyExperts, dense_reference, layer_config, make_problem, relative_error,
                                   run_moe_layer)
from routers import CombineForwardPayload, LowLatencyRouter, NormalRouter

ENV = {"DEEPEP_SWITCH_PROVIDER": "reference"}


def _views_worker(rank: int, world: int, deterministic: str) -> dict:
    tokens = [9, 6, 0, 4][:world]
    problem = make_problem(11, tokens, 256, 8, 3, drop_prob=0.2)
    x, ids, w = problem.local(rank)
    out: dict = {}
    for backend in ("legacy", "elastic"):
        settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND=backend, RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC=deterministic)
        for low_latency in (False, True):
            config = layer_config(rank, world, hidden=256, experts=8, topk=3, capacity=max(tokens), low_latency=low_latency)
            wrapper = DeepEPWrapper.create(config, settings=settings)
            try:
                router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper)
                payload = router.prepare(x, None, None, w, ids)
                if low_latency:
                    counts = payload.expert_tokens_meta.expert_num_tokens.tolist()
                    src_info, layout = router.handle[0], router.handle[1]
                    out[(backend, "ll")] = dict(
                        counts=counts, layout=layout.tolist(), shape=tuple(src_info.shape), dtypes=(src_info.dtype, layout.dtype),
                        tail=(router.handle[2], router.handle[3], router.handle[4]),
                        src=[src_info[e, :c].tolist() for e, c in enumerate(counts)],
                        rows=[payload.expert_x[e, :c, 0].float().tolist() for e, c in enumerate(counts)])
                    y = CombineForwardPayload(payload.expert_x)
                else:
                    out[(backend, "normal")] = router.handle[0].tolist()
                    y = CombineForwardPayload(payload.expert_x)
                router.finalize(y, payload.expert_topk_weights, payload.expert_topk_ids, False, None)
            finally:
                DeepEPWrapper.reset()
    out["x0"] = x[:, 0].float().tolist()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,deterministic", [(2, "0"), (4, "1")])
def test_elastic_handle_reads_like_legacy(world, deterministic):
    results = spawn(_views_worker, world, args=(deterministic,), env=ENV, timeout_s=200)
    problem = make_problem(11, [9, 6, 0, 4][:world], 256, 8, 3, drop_prob=0.2)
    for rank, r in enumerate(results):
        # normal: the rank prefix matrix, identical (legacy's [i, j] = rows j received from ranks 0..i)
        assert r[("elastic", "normal")] == r[("legacy", "normal")], rank
        legacy, elastic = r[("legacy", "ll")], r[("elastic", "ll")]
        assert elastic["counts"] == legacy["counts"] and elastic["layout"] == legacy["layout"]
        assert elastic["shape"] == legacy["shape"] and elastic["dtypes"] == (torch.int32, torch.int64)
        assert elastic["tail"] == legacy["tail"]
        for e, count in enumerate(legacy["counts"]):
            for s, packed in enumerate(legacy["layout"][e]):
                begin, n = packed >> 32, packed & 0xFFFFFFFF
                lo, le = legacy["src"][e][begin:begin + n], elastic["src"][e][begin:begin + n]
                assert sorted(lo) == sorted(le)  # the same tokens of source s, in any order (V2's order)
                if deterministic == "1":
                    assert lo == le
                # src_info is the token's index in its source rank: the row really is that token
                first = sum([9, 6, 0, 4][:s])
                for slot, t in enumerate(le):
                    assert elastic["rows"][e][begin + slot] == problem.x[first + t, 0].float().item()


def _lifecycle_worker(rank: int, world: int, backend: str, open_on_rank: int) -> dict:
    settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND=backend)
    tokens = [7, 5]
    problem = make_problem(2, tokens, 256, 8, 2)
    experts = ToyExperts(2, 8, 256)
    reference = dense_reference(problem, experts)[problem.rank_slice(rank)]
    x, ids, w = problem.local(rank)
    out: dict = {}
    wrapper = DeepEPWrapper.create(layer_config(rank, world, hidden=256, experts=8, topk=2, capacity=8,
                                                low_latency=True), settings=settings)
    router = LowLatencyRouter(wrapper)
    try:
        out["before"] = relative_error(run_moe_layer(router, x, ids, w, experts, rank), reference)
        buffer_before = wrapper.native_buffer
        if rank == open_on_rank:
            # A dispatch left open on this rank only (e.g. its executor raised between prepare and finalize);
            # a real prepare would need the peer, so the state is set directly.
            router._handle = types.SimpleNamespace(handle=object())
        try:
            DeepEPWrapper.destroy_buffer()
            out["destroy"] = "ok"
        except RuntimeError as exc:
            out["destroy"] = str(exc)
            out["buffer_kept"] = wrapper.native_buffer is buffer_before
            return out
        out["initialized_while_suspended"] = DeepEPWrapper.is_initialized()
        for name, call in (("prepare", lambda: router.prepare(x, None, None, w, ids)),
                           ("buffer", lambda: wrapper.buffer)):
            try:
                call()
                out[name] = "no error"
            except RuntimeError as exc:
                out[name] = str(exc)
        DeepEPWrapper.rebuild_buffer()
        out["same_wrapper"] = DeepEPWrapper.get_instance(wrapper.config) is wrapper
        out["new_buffer"] = wrapper.native_buffer is not buffer_before
        out["after"] = relative_error(run_moe_layer(router, x, ids, w, experts, rank), reference)
    finally:
        DeepEPWrapper.reset()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["legacy", "elastic"])
def test_destroy_and_rebuild_keep_the_wrapper_and_routers_follow(backend):
    for r in spawn(_lifecycle_worker, 2, args=(backend, -1), env=ENV, timeout_s=200):
        assert r["before"] <= 1e-2 and r["after"] <= 1e-2, r
        assert r["destroy"] == "ok" and r["initialized_while_suspended"] is False
        assert "suspended" in r["prepare"] and "rebuild_buffer" in r["prepare"], r
        assert "suspended" in r["buffer"], r
        assert r["same_wrapper"] and r["new_buffer"], r


@pytest.mark.timeout(120)
def test_destroy_with_a_dispatch_open_on_one_rank_is_refused_on_every_rank():
    for r in spawn(_lifecycle_worker, 2, args=("elastic", 1), env=ENV, timeout_s=100):
        assert "refused on every rank: ranks [1] have a dispatch open" in r["destroy"], r
        assert r["buffer_kept"], r


def _guard_worker(rank: int, world: int) -> dict:
    settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND="elastic")
    wrapper = DeepEPWrapper.create(layer_config(rank, world, hidden=256, experts=8, topk=2, capacity=8),
                                   settings=settings)
    try:
        out = {"attr": wrapper.buffer.num_max_tokens_per_rank}
        try:
            wrapper.buffer.get_dispatch_layout(torch.zeros((1, 2), dtype=torch.int64), 8)
        except AttributeError as exc:
            out["error"] = str(exc)
        return out
    finally:
        DeepEPWrapper.reset()


@pytest.mark.timeout(120)
def test_v1_calls_on_an_elastic_buffer_name_the_backend():
    for r in spawn(_guard_worker, 2, env=ENV, timeout_s=100):
        assert r["attr"] == 8
        assert "RTP_LLM_DEEPEP_BACKEND=elastic" in r["error"] and "'get_dispatch_layout'" in r["error"]
        assert "RTP_LLM_DEEPEP_BACKEND=legacy" in r["error"]


# ---------------------------------------------------------------------------------------------- rtp-llm names
def _engine_config(tp: int = 1, low_latency: bool = True, mgbs: int = 32, sp: str = "NONE", gen: int = 4):
    ns = types.SimpleNamespace
    return ns(parallelism_config=ns(ep_rank=0, ep_size=2, tp_size=tp, local_rank=0, world_size=2,
                                    ffn_disaggregate_config=None),
              moe_config=ns(deep_ep_num_sm=0, use_deepep_low_latency=low_latency, use_deepep_internode=False,
                            ll_num_max_token=mgbs),
              runtime_config=ns(max_generate_batch_size=mgbs),
              sp_config=ns(type=types.SimpleNamespace(name=sp), gen_num_per_cycle=gen))


@pytest.mark.parametrize("sp,mgbs,expected", [("NONE", 64, 64), ("EAGLE", 32, 160), ("NONE", 200, 200)])
def test_low_latency_token_budget_follows_rtp_llm(sp, mgbs, expected):
    from routers.rtp_llm import low_latency_token_budget

    assert low_latency_token_budget(_engine_config(mgbs=mgbs, sp=sp)) == expected


def test_speculative_budget_gives_rtp_llms_per_rank_capacity():
    from deepep_switch.config import DeepepWrapperConfig
    from routers.rtp_llm import low_latency_token_budget

    # rtp-llm's deepep_test: concurrency 32 x (GEN_NUM_PER_CIRCLE 4 + 1) = 160 tokens -> 256 per rank.
    budget = low_latency_token_budget(_engine_config(mgbs=32, sp="EAGLE", gen=4))
    assert DeepepWrapperConfig.calc_low_latency_max_token_per_rank(budget, 1, None) == 256


def test_install_binds_rtp_llms_symbols_to_ours(monkeypatch, restore_adapter):
    import test_rtp_llm_adapter as standin

    standin.install_standin(monkeypatch)
    module_names = ["rtp_llm.models_py.distributed.deepep_wrapper",
                    "rtp_llm.models_py.modules.factory.fused_moe.impl.cuda.routers.deepep_normal_router",
                    "rtp_llm.models_py.modules.factory.fused_moe.impl.cuda.routers.deepep_low_latency_router"]
    for name in module_names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    adapter = standin.load_adapter()
    replaced = adapter.install()
    assert sorted(replaced) == sorted(module_names)
    wrapper_module = sys.modules[module_names[0]]
    assert wrapper_module.DeepEPWrapper is DeepEPWrapper and wrapper_module.init_deepep_wrapper is adapter.init_deepep_wrapper
    normal = sys.modules[module_names[1]]
    assert normal.DeepepNormalRouterBase is adapter.SwitchDeepepNormalRouterBase
    assert normal.DeepepNormalRouterFp8PerBlock is adapter.SwitchDeepepNormalRouterFp8PerBlock
    assert sys.modules[module_names[2]].DeepEpLowLatencyRouter is adapter.SwitchDeepEpLowLatencyRouter


def test_install_without_rtp_llm_raises(monkeypatch, restore_adapter):
    import test_rtp_llm_adapter as standin

    monkeypatch.setitem(sys.modules, "rtp_llm", None)
    with pytest.raises(ImportError, match="needs rtp-llm"):
        standin.load_adapter().install()


@pytest.fixture
def restore_adapter():
    import test_rtp_llm_adapter as standin

    yield from standin.restore_adapter.__wrapped__()
