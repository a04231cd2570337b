"""GPU (real DeepEP 2.1.0): buffer sizes equal the library's hints, the reference providers agree with DeepEP,
create/reset cycles return memory, and a failing ElasticBuffer constructor falls back on every rank.

Run on a machine with >= 2 GPUs and sgl-deep-ep installed (see docs/gpu-validation.md). One process group per
test module keeps the JIT and NCCL start-up cost to a minimum.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from _helpers import record_gpu_results, settings_from_env as _settings
from deepep_switch.launch import spawn
from deepep_switch.testing import layer_config

pytestmark = pytest.mark.gpu

H, E, K, TOKENS = 7168, 64, 8, 128  # the shapes of the bench and of docs/performance.md
WORLD = 2


def _config(rank: int, world: int, low_latency: bool):
    return layer_config(rank, world, hidden=H, experts=E, topk=K, capacity=TOKENS, low_latency=low_latency)


def _inputs(rank: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn((tokens, H), generator=gen).to(torch.bfloat16)
    ids = torch.rand((tokens, E), generator=gen).argsort(dim=1)[:, :K]
    ids = torch.where(torch.rand((tokens, K), generator=gen) < 0.1, torch.full_like(ids, -1), ids)
    w = torch.rand((tokens, K), generator=gen).float()
    return x.cuda(), ids.cuda(), w.cuda()


def _by_rows(x: torch.Tensor) -> torch.Tensor:
    """A row order that depends only on row content (rows are random, so it is a canonical order)."""
    from deepep_switch.testing import canonical_row_order

    return canonical_row_order(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _sizes(rank: int, world: int) -> dict[str, Any]:
    import deep_ep
    import torch.distributed as dist

    from deepep_switch import DeepEPWrapper
    from deepep_switch.providers.reference import ReferenceBuffer
    from deepep_switch.providers.reference.hints import elastic_buffer_size_hint, low_latency_rdma_size_hint

    out: dict[str, Any] = {}
    group = dist.group.WORLD
    nvl_hint = max(deep_ep.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(H * 2, world),
                   deep_ep.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(H * 2, world))
    nvl_ref = max(ReferenceBuffer.get_dispatch_config(world).get_nvl_buffer_size_hint(H * 2, world),
                  ReferenceBuffer.get_combine_config(world).get_nvl_buffer_size_hint(H * 2, world))
    ll_hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, H, world, E)
    el_hint = deep_ep.ElasticBuffer.get_buffer_size_hint(group, TOKENS, H, num_topk=K)
    out["hints"] = (nvl_hint, ll_hint, el_hint)
    out["reference_hints"] = (nvl_ref, low_latency_rdma_size_hint(TOKENS, H, world, E),
                              elastic_buffer_size_hint(world, TOKENS, H, K))
    for name, backend, low_latency in (("legacy_normal", "legacy", False), ("legacy_ll", "legacy", True),
                                       ("elastic_normal", "elastic", False), ("elastic_ll", "elastic", True)):
        w = DeepEPWrapper.create(_config(rank, world, low_latency), settings=_settings(RTP_LLM_DEEPEP_BACKEND=backend))
        buf = w.native_buffer
        actual = ({"elastic": buf.num_bytes} if backend == "elastic"
                  else {"nvl": buf.num_nvl_bytes, "rdma": buf.num_rdma_bytes})
        out[name] = (w.backend.value, type(buf).__module__ + "." + type(buf).__name__, w.buffer_bytes, actual,
                     w.decision.describe())
        DeepEPWrapper.reset()
    return out


def _agreement(rank: int, world: int) -> dict[str, Any]:
    """Same inputs through real DeepEP and the reference providers over the same NCCL group."""
    import deep_ep
    import torch.distributed as dist

    from deepep_switch.providers.reference import ReferenceBuffer, ReferenceElasticBuffer

    group = dist.group.WORLD
    tokens = [TOKENS, 0, 77, 5][rank] if world == 4 else [TOKENS, 61][rank]
    x, ids, w = _inputs(rank, tokens)
    out: dict[str, Any] = {}
    nvl = max(deep_ep.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(H * 2, world),
              deep_ep.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(H * 2, world))

    # Legacy normal mode: rows, order, ids, weights, counts, combine.
    real, ref = deep_ep.Buffer(group, num_nvl_bytes=nvl, explicitly_destroy=True), ReferenceBuffer(group)
    results = []
    for buf in (real, ref):
        a, b, c, d, _ = buf.get_dispatch_layout(ids, E)
        rx, ri, rw, counts, handle, _ = buf.dispatch(x, None, a, b, d, c, ids, w, expert_alignment=4)
        combined, combined_w, _ = buf.combine(rx, handle, topk_weights=rw)
        results.append((a, c, d, rx, ri, rw, counts, combined, combined_w))
    out["legacy_layout_equal"] = all(torch.equal(p, q) for p, q in zip(results[0][:3], results[1][:3]))
    out["legacy_rows_equal"] = all(torch.equal(p, q) for p, q in zip(results[0][3:6], results[1][3:6]))
    out["legacy_counts"] = (results[0][6], results[1][6])
    out["legacy_combine_maxdiff"] = (results[0][7].float() - results[1][7].float()).abs().max().item() if tokens else 0.0
    out["legacy_combine_w_maxdiff"] = (results[0][8] - results[1][8]).abs().max().item() if tokens else 0.0
    legacy_rows = results[0][3]
    real.destroy()

    # Elastic: same row set as legacy, order shuffled, weights unmasked; no-sync and expand layouts.
    real = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=TOKENS, hidden=H, num_topk=K, explicitly_destroy=True)
    ref = ReferenceElasticBuffer(group, num_max_tokens_per_rank=TOKENS, hidden=H, num_topk=K)
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
    s_real, s_ref = per["sync"]
    out["elastic_rows_equal"] = all(torch.equal(p, q) for p, q in zip(s_real[:3], s_ref[:3]))
    out["elastic_rows_equal_legacy"] = torch.equal(s_real[0], legacy_rows)
    out["elastic_order_is_legacy"] = bool(torch.equal(s_real[6], torch.arange(s_real[6].numel(), device=s_real[6].device)))
    out["elastic_weights_unmasked"] = bool((s_real[2][s_real[1] < 0] != 0).any()) if s_real[1].numel() else None
    out["elastic_counts"] = (s_real[3], s_ref[3], results[0][6])
    out["elastic_combine_rel"] = _rel(s_real[4], s_ref[4]) if tokens else 0.0
    out["elastic_combine_w_maxdiff"] = (s_real[5] - s_ref[5]).abs().max().item() if tokens else 0.0
    n_real, n_ref = per["nosync"]
    out["nosync"] = (n_real[0], n_real[1], n_ref[1], world * TOKENS)
    out["nosync_combine_rel"] = _rel(n_real[2], n_ref[2]) if tokens else 0.0
    e_real, e_ref = per["expand"]
    out["expand_counts_equal"] = torch.equal(e_real[0], e_ref[0]) and torch.equal(e_real[1], e_ref[1])
    out["expand_rows_equal"] = all(torch.equal(p, q) for p, q in zip(e_real[2], e_ref[2]))
    out["expand_shapes"] = (e_real[3], e_ref[3], len(e_real[4]), len(e_ref[4]))
    out["expand_combine_rel"] = _rel(e_real[5], e_ref[5]) if tokens else 0.0
    real.destroy()

    # Legacy low-latency: per-expert counts and row multisets, weighted combine.
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, H, world, E)
    real = deep_ep.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, num_qps_per_rank=E // world,
                          allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)
    ref = ReferenceBuffer(group, low_latency_mode=True)
    ll = []
    for buf in (real, ref):
        rx, count, handle, _, _ = buf.low_latency_dispatch(x, ids, TOKENS, E, use_fp8=False)
        rows = [rx[e, :n][_by_rows(rx[e, :n])] for e, n in enumerate(count.tolist())]
        combined, _, _ = buf.low_latency_combine(rx, ids, w, handle)
        ll.append((count.cpu(), rows, combined))
    out["ll_counts_equal"] = torch.equal(ll[0][0], ll[1][0])
    out["ll_rows_equal"] = all(torch.equal(p, q) for p, q in zip(ll[0][1], ll[1][1]))
    out["ll_combine_rel"] = _rel(ll[0][2], ll[1][2]) if tokens else 0.0
    real.destroy()
    dist.barrier()
    return out


def _settled() -> tuple[int, int]:
    """(memory_reserved, free device bytes) once finished collectives have released their tensors."""
    import gc
    import time

    torch.cuda.synchronize()
    time.sleep(0.5)  # the NCCL watchdog drops completed works (and the tensors they hold) asynchronously
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0]


def _memory(rank: int, world: int, cycles: int) -> dict[str, Any]:
    from deepep_switch import DeepEPWrapper

    kinds = [("legacy", False), ("elastic", False), ("legacy", True), ("elastic", True)]
    for backend, low_latency in kinds:  # warm up every kind once (JIT, NVSHMEM, NCCL windows)
        DeepEPWrapper.create(_config(rank, world, low_latency), settings=_settings(RTP_LLM_DEEPEP_BACKEND=backend))
        DeepEPWrapper.reset()
    base_reserved, base_free = _settled()
    samples = []
    for i in range(cycles):
        backend, low_latency = kinds[i % len(kinds)]
        w = DeepEPWrapper.create(_config(rank, world, low_latency), settings=_settings(RTP_LLM_DEEPEP_BACKEND=backend))
        peak_free = torch.cuda.mem_get_info()[0]
        nbytes = sum(w.buffer_bytes.values())
        DeepEPWrapper.reset()
        reserved, free = _settled()
        samples.append((backend, low_latency, nbytes, base_free - peak_free, reserved, free))
    return {"base_reserved": base_reserved, "base_free": base_free,
            "total": torch.cuda.get_device_properties(rank).total_memory, "samples": samples}


def _core_worker(rank: int, world: int) -> dict[str, Any]:
    return {"sizes": _sizes(rank, world), "agreement": _agreement(rank, world), "memory": _memory(rank, world, 20)}


@pytest.fixture(scope="module")
def core_results() -> list[dict[str, Any]]:
    results = spawn(_core_worker, WORLD, backend="nccl", timeout_s=540)
    record_gpu_results("gpu_core", results)
    return results


def test_wrapper_builds_real_buffers_sized_by_the_hints(core_results):
    for rank, r in enumerate(core_results):
        s = r["sizes"]
        nvl_hint, ll_hint, el_hint = s["hints"]
        assert s["reference_hints"] == s["hints"], ("reference hint formulas drifted from deep_ep", s)
        assert s["legacy_normal"][:4] == ("legacy", "deep_ep.buffers.legacy.Buffer", {"nvl": nvl_hint, "rdma": 0},
                                          {"nvl": nvl_hint, "rdma": 0}), s["legacy_normal"]
        assert s["legacy_ll"][:4] == ("legacy", "deep_ep.buffers.legacy.Buffer", {"rdma": ll_hint},
                                      {"nvl": 0, "rdma": ll_hint}), s["legacy_ll"]
        for name in ("elastic_normal", "elastic_ll"):
            assert s[name][:4] == ("elastic", "deep_ep.buffers.elastic.ElasticBuffer", {"elastic": el_hint},
                                   {"elastic": el_hint}), s[name]


def test_reference_providers_agree_with_deep_ep(core_results):
    for rank, r in enumerate(core_results):
        a = r["agreement"]
        assert a["legacy_layout_equal"] and a["legacy_rows_equal"], (rank, a)
        assert a["legacy_counts"][0] == a["legacy_counts"][1]
        assert a["legacy_combine_maxdiff"] == 0.0 and a["legacy_combine_w_maxdiff"] < 1e-6, (rank, a)
        assert a["elastic_rows_equal"] and a["elastic_rows_equal_legacy"], (rank, a)
        assert a["elastic_counts"][0] == a["elastic_counts"][1] == a["elastic_counts"][2]
        assert a["elastic_weights_unmasked"] in (True, None), "DeepEP V2 keeps weights where the id is -1"
        assert a["elastic_combine_rel"] <= 1e-2 and a["elastic_combine_w_maxdiff"] < 1e-6, (rank, a)
        rows, valid_real, valid_ref, worst = a["nosync"]
        assert rows == worst and valid_real == valid_ref, (rank, a["nosync"])
        assert a["nosync_combine_rel"] <= 1e-2
        assert a["expand_counts_equal"] and a["expand_rows_equal"], (rank, a)
        assert a["expand_shapes"][:2] == (True, True) and a["expand_shapes"][2] == a["expand_shapes"][3]
        assert a["expand_combine_rel"] <= 1e-2
        assert a["ll_counts_equal"] and a["ll_rows_equal"] and a["ll_combine_rel"] < 1e-2, (rank, a)


def test_create_reset_cycles_return_memory(core_results):
    for rank, r in enumerate(core_results):
        m = r["memory"]
        assert len(m["samples"]) == 20
        for backend, low_latency, nbytes, taken, reserved, free in m["samples"]:
            # "Within 1% of the baseline"; the caching allocator reserves whole 2 MiB segments, so a near-zero
            # baseline is allowed one segment of slack.
            assert reserved <= m["base_reserved"] * 1.01 + (2 << 20), (rank, backend, low_latency, reserved)
            assert abs(free - m["base_free"]) <= 0.01 * m["total"], (rank, backend, low_latency, free, m["base_free"])


def _gin_worker(rank: int, world: int) -> dict[str, Any]:
    """No EP_DISABLE_GIN on a host without an RDMA NIC: what an operator who forgot it would see."""
    from deepep_switch import DeepEPWrapper
    from deepep_switch.testing import ToyExperts
    from routers import CombineForwardPayload, NormalRouter

    out: dict[str, Any] = {}
    settings = _settings(RTP_LLM_DEEPEP_BACKEND="elastic")
    w = DeepEPWrapper.create(_config(rank, world, False), settings=settings)
    out["preflight"] = (w.backend.value, w.decision.reasons, w.decision.fallback)
    DeepEPWrapper.reset()

    # Now force past preflight so the ElasticBuffer constructor itself fails: every rank must fall back together.
    import deepep_switch.wrapper as wrapper_module
    from deepep_switch.preflight import PreflightReport

    real_resolve = wrapper_module.resolve_backend
    wrapper_module.resolve_backend = lambda group, **kw: real_resolve(
        group, **{**kw, "preflight": PreflightReport(provider=settings.settings.provider, has_buffer=True,
                                                     has_elastic_buffer=True)})
    try:
        w = DeepEPWrapper.create(_config(rank, world, False), settings=settings)
    finally:
        wrapper_module.resolve_backend = real_resolve
    out["constructor"] = (w.backend.value, w.decision.fallback)
    x, ids, wts = _inputs(rank, 32)
    router = NormalRouter(w)
    payload = router.prepare(x, None, None, wts, ids)
    y = CombineForwardPayload(payload.expert_x)
    combined = router.finalize(y, payload.expert_topk_weights, payload.expert_topk_ids, False, None)
    hit = torch.zeros((32, world + 1), dtype=torch.bool, device=ids.device)
    hit.scatter_(1, torch.where(ids >= 0, ids // (E // world), world), True)
    expected = (x.float() * hit[:, :world].sum(1, keepdim=True)).to(torch.bfloat16)
    out["legacy_works_after_fallback"] = bool(torch.equal(combined, expected))
    DeepEPWrapper.reset()
    return out


def test_missing_gin_falls_back_to_legacy_on_every_rank():
    results = spawn(_gin_worker, WORLD, backend="nccl", env={"EP_DISABLE_GIN": None}, timeout_s=240)
    record_gpu_results("gpu_gin_fallback", results)
    for rank, r in enumerate(results):
        backend, reasons, fallback = r["preflight"]
        assert backend == "legacy" and fallback is None and any("gin" in reason for reason in reasons), r
        backend, fallback = r["constructor"]
        assert backend == "legacy" and fallback and "ranks [0, 1]" in fallback, r
        assert r["legacy_works_after_fallback"], r
