"""DeepEP 2.5's EPBuffer as the ``ep`` generation: the reference provider's 2.5 API (what changed from 2.1's
ElasticBuffer; the token movement itself is checked in test_reference_providers.py for both)."""

from __future__ import annotations

import pytest
import torch

from deepep_switch.launch import spawn
from deepep_switch.providers.reference.hints import elastic_buffer_size_hint, ep_buffer_size_hint

MiB = 1 << 20


def test_ep_hint_matches_deep_ep_25_measurements_and_its_own_formula():
    # deepep_v25.md: 4 MiB at T=128 and 114 MiB at T=4096 for EP2, H=7168, K=8 (2.1's formula gives the same there).
    for fp8 in (False, True):
        assert ep_buffer_size_hint(2, 128, 7168, 8, fp8) == 4 * MiB == elastic_buffer_size_hint(2, 128, 7168, 8, fp8)
        assert ep_buffer_size_hint(2, 4096, 7168, 8, fp8) == 114 * MiB
        assert elastic_buffer_size_hint(2, 4096, 7168, 8, fp8) == 114 * MiB
    # 2.5 rounds each token slot to 64 bytes: a 544-byte slot (H=256, K=2, bf16) becomes 576.
    assert (elastic_buffer_size_hint(2, 7680, 256, 2), ep_buffer_size_hint(2, 7680, 256, 2)) == (8 * MiB, 10 * MiB)
    assert ep_buffer_size_hint(8, 4096, 7168, 0) == ep_buffer_size_hint(8, 4096, 7168, 32)  # top-k 0 sizes for 32
    for bad in ((2, 0, 7168, 8), (2, 128, 0, 8)):
        with pytest.raises(ValueError):
            ep_buffer_size_hint(*bad)


def _capture(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _api_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from deepep_switch.providers.reference import ReferenceEPBuffer, ReferenceEPBufferHandle

    group = dist.group.WORLD
    out: dict = {}
    sized = ReferenceEPBuffer(group, num_max_tokens_per_rank=4096, hidden=7168, num_topk=8)  # num_bytes=None
    out["sized"] = (sized.num_bytes, ReferenceEPBuffer.get_buffer_size_hint(group, 128, 7168, num_topk=8))
    positional = ReferenceEPBuffer(group, None, 64, 256, 2)  # 2.5's order: no num_cpu_bytes after num_bytes
    out["positional"] = (positional.num_max_tokens_per_rank, positional.num_bytes)
    out["num_cpu_bytes"] = _capture(lambda: ReferenceEPBuffer(group, num_cpu_bytes=0, num_max_tokens_per_rank=8,
                                                              hidden=256))
    timeouts = ReferenceEPBuffer(group, num_max_tokens_per_rank=8, hidden=256, num_cpu_timeout_secs=7,
                                 num_gpu_timeout_secs=5, lb_allocation_plan_or_num_bytes=2 * MiB, sl_idx=None)
    out["timeouts"] = (timeouts.num_cpu_timeout_secs, timeouts.num_gpu_timeout_secs, timeouts.num_lb_bytes)
    out["lb_unaligned"] = _capture(lambda: ReferenceEPBuffer(group, num_max_tokens_per_rank=8, hidden=256,
                                                             lb_allocation_plan_or_num_bytes=3))

    buf = ReferenceEPBuffer(group, num_max_tokens_per_rank=16, hidden=256, num_topk=2, deterministic=True,
                            explicitly_destroy=True)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn((6, 256), generator=gen).to(torch.bfloat16)
    ids = torch.tensor([[0, 5], [1, -1], [7, 2], [-1, -1], [3, 4], [6, 0]], dtype=torch.int64)
    w = torch.rand((6, 2), generator=gen)
    common = dict(topk_idx=ids, topk_weights=w, num_experts=8)
    out["handle_copy"] = _capture(lambda: buf.dispatch(x, do_handle_copy=True, **common))
    out["old_dispatch_kwarg"] = _capture(lambda: buf.dispatch(x, previous_event_before_epilogue=None, **common))
    out["defer_needs_async"] = _capture(lambda: buf.dispatch(x, defer_epilogue=True, **common))

    rx, ridx, rw, h, _ = buf.dispatch(x, **common)
    out["handle"] = (type(h) is ReferenceEPBufferHandle, h.topk_idx is ids)  # kept by reference, not copied
    comb, comb_w, _ = buf.combine(rx, h, topk_weights=rw)
    out["old_combine_kwarg"] = _capture(lambda: buf.combine(rx, h, previous_event_before_epilogue=None))

    event = buf.dispatch(x, defer_epilogue=True, async_with_compute_stream=True, **common)
    drx, dridx, drw, dh = event.current_stream_wait()
    out["deferred_dispatch"] = (torch.equal(drx, rx), torch.equal(dridx, ridx), torch.equal(drw, rw),
                                event.current_stream_wait() is None)
    event = buf.combine(drx, dh, topk_weights=drw, defer_epilogue=True, async_with_compute_stream=True)
    dcomb, dcomb_w = event.current_stream_wait()
    out["deferred_combine"] = (torch.equal(dcomb, comb), torch.equal(dcomb_w, comb_w))

    ids.add_(0)  # an in-place change while the handle lives: 2.5 asserts when the handle reads topk_idx
    out["changed_topk_idx"] = _capture(lambda: buf.combine(rx, h))
    with torch.inference_mode():  # no version counter: nothing to check, as in 2.5
        frozen = ids.clone()
        fx, _, _, fh, _ = buf.dispatch(x, topk_idx=frozen, topk_weights=w, num_experts=8)
        frozen.add_(0)
        out["inference_mode"] = _capture(lambda: buf.combine(fx, fh))
    buf.destroy()
    out["destroyed"] = _capture(lambda: buf.dispatch(x, **common))
    return out


@pytest.mark.timeout(120)
def test_reference_ep_buffer_has_deep_ep_25_api():
    for out in spawn(_api_worker, 2, env={"OMP_NUM_THREADS": "1"}, timeout_s=90):
        assert out["sized"] == (114 * MiB, 4 * MiB)
        assert out["positional"] == (64, ep_buffer_size_hint(2, 64, 256, 2))
        assert out["num_cpu_bytes"].startswith("TypeError") and "num_cpu_bytes" in out["num_cpu_bytes"]
        assert out["timeouts"] == (7, 5, 2 * MiB)
        assert out["lb_unaligned"].startswith("ValueError")
        assert out["handle_copy"].startswith("AssertionError") and "do_handle_copy" in out["handle_copy"]
        for key in ("old_dispatch_kwarg", "old_combine_kwarg"):
            assert out[key].startswith("TypeError") and "previous_event_before_epilogue" in out[key], out[key]
        assert out["defer_needs_async"].startswith("AssertionError")
        assert out["handle"] == (True, True)
        assert out["deferred_dispatch"] == (True, True, True, True)
        assert out["deferred_combine"] == (True, True)
        assert out["changed_topk_idx"].startswith("AssertionError") and "topk_idx" in out["changed_topk_idx"]
        assert out["inference_mode"] == "ok"
        assert out["destroyed"].startswith("RuntimeError") and "ReferenceEPBuffer" in out["destroyed"]


# ------------------------------------------------------------------------------------- the ep generation, end to end
def _layer(rank: int, world: int, backend: str, fp8: bool = True, scribble: bool = False, strict: bool = False) -> dict:
    """Both routers through ``backend`` on a 3-expert-per-rank layer with an empty last rank; ``scribble``: the
    caller overwrites its top-k ids between prepare and finalize (its tensor is its own again after prepare)."""
    from _helpers import settings_from_env
    from deepep_switch import DeepEPWrapper
    from deepep_switch.quant import Quant
    from deepep_switch.testing import (ToyExperts, dense_reference, layer_config, make_problem, relative_error,
                                       run_moe_layer)
    from routers import LowLatencyRouter, NormalRouter, RouterOptions

    settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND=backend, RTP_LLM_DEEPEP_STRICT=str(int(strict)))
    tokens = [7 + 5 * r for r in range(world)]
    tokens[-1] = 0
    problem = make_problem(4, tokens, 256, 4 * world, 2)
    experts = ToyExperts(4, 4 * world, 256)
    reference = dense_reference(problem, experts, fp8=fp8)[problem.rank_slice(rank)]
    out: dict = {"rank": rank}
    for low_latency in (False, True):
        config = layer_config(rank, world, hidden=256, experts=4 * world, topk=2, capacity=max(tokens),
                              low_latency=low_latency, quant=Quant.FP8_BLOCK if fp8 else Quant.NONE)
        wrapper = DeepEPWrapper.create(config, settings=settings)
        try:
            router = (LowLatencyRouter if low_latency else NormalRouter)(
                wrapper, RouterOptions(quant=Quant.FP8_BLOCK if fp8 else Quant.NONE))
            x, ids, w = problem.local(rank)
            ids = ids.to(torch.int64).clone()
            prepare = router.prepare

            def scribbling_prepare(*args, **kwargs):
                payload = prepare(*args, **kwargs)
                ids.fill_(-1)  # the caller's tensor: 2.5 would assert (or, in inference mode, combine wrongly)
                return payload

            if scribble:
                router.prepare = scribbling_prepare
            result = run_moe_layer(router, x, ids, w, experts, rank)
            out["low_latency" if low_latency else "normal"] = dict(
                backend=wrapper.backend.value, buffer=type(wrapper.native_buffer).__name__,
                path=type(router.path).__name__, bytes=wrapper.buffer_bytes, fallback=wrapper.decision.fallback,
                error=relative_error(result, reference) if x.shape[0] else 0.0, shape=tuple(result.shape),
                tokens=x.shape[0])
        finally:
            DeepEPWrapper.reset()
    return out


def _check_ep_layer(results: list[dict], backend: str = "ep") -> None:
    for r in results:
        for mode, path in (("normal", "EPNormalPath"), ("low_latency", "EPLowLatencyPath")):
            m = r[mode]
            assert (m["backend"], m["buffer"], m["path"], m["fallback"]) == \
                ("ep", "ReferenceEPBuffer", path, None), r
            assert set(m["bytes"]) == {"ep"} and m["error"] <= 1e-2 and m["shape"] == (m["tokens"], 256), r


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,backend", [(2, "ep"), (4, "auto")])
def test_both_routers_run_on_ep_and_auto_picks_it(world, backend):
    _check_ep_layer(spawn(_layer, world, args=(backend,), env={"DEEPEP_SWITCH_PROVIDER": "reference"},
                          timeout_s=200))


@pytest.mark.timeout(240)
def test_the_caller_may_reuse_its_ids_tensor_before_finalize_on_ep():
    _check_ep_layer(spawn(_layer, 2, args=("ep", False, True), env={"DEEPEP_SWITCH_PROVIDER": "reference"},
                          timeout_s=200))


def _construction_failure(rank: int, world: int, backend: str, strict: bool) -> dict:
    """EPBuffer's constructor raises on rank 1 only (a JIT or NCCL failure preflight cannot foresee)."""
    from deepep_switch.decision import BackendUnavailableError
    from deepep_switch.providers.reference import ReferenceEPBuffer

    original = ReferenceEPBuffer.__init__

    def failing(self, *args, **kwargs):
        if rank == 1:
            raise RuntimeError("EPBuffer JIT compilation failed (injected)")
        original(self, *args, **kwargs)

    ReferenceEPBuffer.__init__ = failing
    try:
        return _layer(rank, world, backend, strict=strict)
    except BackendUnavailableError as exc:
        return {"raised": str(exc)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["ep", "auto"])
def test_ep_construction_failure_on_one_rank_falls_back_to_legacy_everywhere(backend):
    results = spawn(_construction_failure, 2, args=(backend, False), env={"DEEPEP_SWITCH_PROVIDER": "reference"},
                    timeout_s=200)
    for r in results:
        for mode in ("normal", "low_latency"):
            m = r[mode]
            assert (m["backend"], m["buffer"]) == ("legacy", "ReferenceBuffer"), r
            assert "ep buffer construction failed on ranks [1]" in m["fallback"] and m["error"] <= 1e-2, r
    assert "injected" in results[1]["normal"]["fallback"] and "injected" not in results[0]["normal"]["fallback"]


@pytest.mark.timeout(120)
def test_ep_construction_failure_in_strict_mode_raises_on_every_rank():
    results = spawn(_construction_failure, 2, args=("ep", True), env={"DEEPEP_SWITCH_PROVIDER": "reference"},
                    timeout_s=90)
    assert all("ranks [1]" in r.get("raised", "") for r in results), results


def test_ep_plan_passes_only_keywords_deep_ep_25_takes():
    import dataclasses
    import inspect

    from deepep_switch.backends import ep
    from deepep_switch.config import DeepepWrapperConfig
    from deepep_switch.providers.reference import ReferenceEPBuffer
    from deepep_switch.quant import Quant
    from deepep_switch.settings import SwitchSettings

    calls = []

    class Recording:
        @staticmethod
        def get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk=0, use_fp8_dispatch=False,
                                 allow_hybrid_mode=True, allow_multiple_reduction=True):
            calls.append((num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch, allow_hybrid_mode,
                          allow_multiple_reduction))
            return 6 << 20

    config = DeepepWrapperConfig(ep_rank=0, ep_size=2, tp_size=1, local_rank=0, world_size=2, hidden_size=7168,
                                 expert_num=64, moe_k=8, deep_ep_num_sm=0, use_deepep_low_latency=False,
                                 use_deepep_internode=False, ll_num_max_token=128, ll_num_max_token_per_rank=0)
    config = dataclasses.replace(config, quant=Quant.FP8_BLOCK)
    settings = SwitchSettings(elastic_allow_hybrid=False, elastic_deterministic=True,
                              elastic_allow_multiple_reduction=False, elastic_prefer_overlap=False,
                              max_tokens_per_rank=512)
    plan = ep.plan(Recording, None, config, settings)
    assert calls == [(512, 7168, 8, True, False, False)]
    assert plan.backend.value == "ep" and plan.bytes == {"ep": 6 << 20} and plan.capacity == 512
    assert plan.kwargs == dict(num_bytes=6 << 20, num_max_tokens_per_rank=512, hidden=7168, num_topk=8,
                               use_fp8_dispatch=True, deterministic=True, allow_hybrid_mode=False,
                               allow_multiple_reduction=False, prefer_overlap_with_compute=False,
                               explicitly_destroy=True)
    # ep.EP_BUFFER_KWARGS is deep_ep_v25.EPBuffer's signature; the reference provider has the same one, plus
    # timeout_s (the deadline of its torch.distributed collectives, which real DeepEP has no use for).
    assert set(inspect.signature(ReferenceEPBuffer).parameters) - {"group", "timeout_s"} == ep.EP_BUFFER_KWARGS


def test_ep_paths_refuse_what_real_deep_ep_25_cannot_serve():
    from deepep_switch.backends import PathContext, get_spec
    from deepep_switch.deadline import Deadline
    from deepep_switch.quant import Quant

    spec = get_spec("ep")
    ctx = PathContext(buffer=None, real_deep_ep=True, num_experts=8, num_local_experts=4, num_ranks=2, num_topk=2,
                      hidden=384, capacity=8, expert_alignment=1, quant=Quant.NONE, quantize=lambda x: x, num_sms=0,
                      device=torch.device("cpu"), group=None, deadline=Deadline(1.0, 0, 1))
    for path in (spec.normal_path, spec.low_latency_path):
        with pytest.raises(ValueError, match="EPBuffer combine needs hidden % 256"):
            path.build(ctx)
