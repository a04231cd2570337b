"""Worker side of ``tests/test_reference_providers.py``.

Every rank regenerates its own inputs from the case's seed (:func:`make_inputs`), drives the reference providers
through every call the tests check, and returns the raw outputs (plain tensors, lists and ints, no handles) to the
parent process. The parent regenerates *all* ranks' inputs with the same function and computes the expectations
independently, in plain Python, so nothing here decides whether a result is right.

Kept in its own module (not the test module) so the spawned children import only torch and the providers.
"""

from __future__ import annotations

from typing import Any

import torch

FP8 = torch.float8_e4m3fn


def make_inputs(case: dict, s: int) -> dict[str, torch.Tensor]:
    """Rank ``s``'s tokens, routing and extra payloads for ``case``; identical in every process."""
    tokens, hidden, experts, topk = case["tokens"][s], case["hidden"], case["experts"], case["topk"]
    gen = torch.Generator().manual_seed(case["seed"] * 7919 + s * 104729 + 17)
    x = torch.randn((tokens, hidden), generator=gen).to(torch.bfloat16)
    # Distinct experts per token (as torch.topk gives), then some slots dropped to -1.
    ids = torch.rand((tokens, experts), generator=gen).argsort(dim=1)[:, :topk].to(torch.int64)
    ids[torch.rand((tokens, topk), generator=gen) < case["drop"]] = -1
    if tokens >= 2:
        ids[tokens // 2] = -1  # a token routed nowhere
    # Weights stay non-zero where the id is -1, so masking (or the lack of it) is visible.
    weights = torch.rand((tokens, topk), generator=gen) + 0.05
    x2 = torch.randn((tokens, hidden), generator=gen).to(torch.bfloat16)
    x_fp8 = (torch.randn((tokens, hidden), generator=gen) * 8).to(FP8)
    scales = torch.rand((tokens, hidden // 128), generator=gen) + 0.25
    bias0 = torch.randn((tokens, hidden), generator=gen).to(torch.bfloat16)
    bias1 = torch.randn((tokens, hidden), generator=gen).to(torch.bfloat16)
    return dict(x=x, ids=ids, w=weights, x2=x2, x_fp8=x_fp8, scales=scales, bias0=bias0, bias1=bias1)


def u8(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors travel back to the parent as raw bytes."""
    return t.contiguous().view(torch.uint8).clone()


def _elastic_fields(h: Any) -> dict[str, Any]:
    return dict(
        psum_rank=h.psum_num_recv_tokens_per_scaleup_rank.clone(),
        psum_expert=h.psum_num_recv_tokens_per_expert.clone(),
        unaligned=h.num_unaligned_recv_tokens_per_expert.clone(),
        counts_list=list(h.num_recv_tokens_per_expert_list),
        meta=h.recv_src_metadata.clone(),
        num_recv_tokens=int(h.num_recv_tokens),
        do_expand=bool(h.do_expand),
    )


def _legacy(rank: int, case: dict, group: Any, inp: dict) -> dict[str, Any]:
    from deepep_switch.providers.reference import ReferenceBuffer

    experts, align = case["experts"], case["align"]
    x, ids, w = inp["x"], inp["ids"], inp["w"]
    buf = ReferenceBuffer(group, num_nvl_bytes=0, num_rdma_bytes=0)
    out: dict[str, Any] = {}

    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(ids, experts)
    out["layout"] = dict(per_rank=per_rank, per_rdma=per_rdma, per_expert=per_expert, in_rank=in_rank)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)

    rx, ridx, rw, counts, handle, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, expert_alignment=align, **layout)
    out["dispatch"] = dict(x=rx, idx=ridx, w=rw, counts=counts, rpm=handle[0], src_idx=handle[3],
                           handle_len=len(handle))

    nx, nidx, nw, ncounts, nhandle, _ = buf.dispatch(x, expert_alignment=align, **layout)  # without top-k
    ncomb, ncomb_w, _ = buf.combine(nx, nhandle)
    out["no_topk"] = dict(x=nx, none=(nidx is None, nw is None, ncomb_w is None), counts=ncounts, rpm=nhandle[0],
                          comb=ncomb)

    cached = buf.dispatch(x, handle=handle)
    cached2 = buf.dispatch(inp["x2"], handle=handle)
    out["cached"] = dict(x=cached[0], x2=cached2[0], rest_none=[v is None for v in cached[1:5]])

    (fq, fs), fidx, fw, fcounts, fhandle, _ = buf.dispatch((inp["x_fp8"], inp["scales"]), topk_idx=ids,
                                                          topk_weights=w, expert_alignment=align, **layout)
    (cq, cs), *_ = buf.dispatch((inp["x_fp8"], inp["scales"]), handle=fhandle)
    out["fp8"] = dict(q=u8(fq), s=fs, idx=fidx, counts=fcounts, cached_q=u8(cq), cached_s=cs)

    worst = sum(case["tokens"]) + 3
    wx, widx, ww, wcounts, whandle, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, expert_alignment=align,
                                                     num_worst_tokens=worst, **layout)
    wcomb, wcomb_w, _ = buf.combine(wx, whandle, topk_weights=ww)
    out["worst"] = dict(num=worst, x=wx, idx=widx, w=ww, counts=wcounts, comb=wcomb, comb_w=wcomb_w)

    comb, comb_w, _ = buf.combine(rx, handle, topk_weights=rw)
    comb_nw, comb_w_none, _ = buf.combine(rx, handle)
    comb_b, _, _ = buf.combine(rx, handle, bias=(inp["bias0"], inp["bias1"]))
    out["combine"] = dict(x=comb, w=comb_w, x_nw=comb_nw, w_none=comb_w_none is None, x_bias=comb_b)
    return out


def _low_latency(rank: int, case: dict, group: Any, inp: dict) -> dict[str, Any]:
    from deepep_switch.providers.reference import ReferenceBuffer

    world = case["world"]
    experts, n_max, hidden = case["experts"], case["ll_n"], case["hidden"]
    x, ids, w = inp["x"], inp["ids"], inp["w"]
    hint = ReferenceBuffer.get_low_latency_rdma_size_hint(n_max, hidden, world, experts)
    buf = ReferenceBuffer(group, 0, hint, low_latency_mode=True, num_qps_per_rank=experts // world)
    out: dict[str, Any] = {}

    stats = torch.zeros(experts // world, dtype=torch.int32)
    rx, count, handle, _, hook = buf.low_latency_dispatch(x, ids, n_max, experts, use_fp8=False,
                                                          cumulative_local_expert_recv_stats=stats,
                                                          return_recv_hook=True)
    hook()
    comb, _, _ = buf.low_latency_combine(rx, ids, w, handle)
    out["bf16"] = dict(x=rx, count=count, src_info=handle[0], layout_range=handle[1],
                       handle_tail=tuple(handle[2:5]), handle_len=len(handle), stats=stats, comb=comb)

    for name, round_scale in (("fp8", False), ("fp8_round", True)):
        (q, s), count8, handle8, _, _ = buf.low_latency_dispatch(x, ids, n_max, experts, use_fp8=True,
                                                                 round_scale=round_scale)
        # What an executor would do: dequantise and hand bf16 back to the weighted combine.
        y = (q.float().view(*q.shape[:2], hidden // 128, 128) * s.unsqueeze(-1)).view(q.shape).to(torch.bfloat16)
        comb8, _, _ = buf.low_latency_combine(y, ids, w, handle8)
        out[name] = dict(q=u8(q), q_dtype=str(q.dtype), s=s.contiguous(), s_shape=tuple(s.shape),
                         s_stride=tuple(s.stride()), s_dtype=str(s.dtype), count=count8,
                         src_info=handle8[0], layout_range=handle8[1], comb=comb8)

    # UE8M0 scales pack four 128-channel groups per int32: the same tokens widened to 512 channels.
    assert 512 % hidden == 0
    wide = x.repeat(1, 512 // hidden)
    (uq, us), ucount, _, _, _ = buf.low_latency_dispatch(wide, ids, n_max, experts, use_fp8=True, round_scale=True,
                                                         use_ue8m0=True)
    (rq, rs), _, _, _, _ = buf.low_latency_dispatch(wide, ids, n_max, experts, use_fp8=True, round_scale=True)
    out["ue8m0"] = dict(q=u8(uq), s=us.contiguous(), s_shape=tuple(us.shape), s_stride=tuple(us.stride()),
                        s_dtype=str(us.dtype), count=ucount, round_q=u8(rq), round_s=rs.contiguous())
    try:
        buf.low_latency_dispatch(wide, ids, n_max, experts, use_fp8=True, use_ue8m0=True)
        out["ue8m0"]["without_round_scale"] = "accepted"
    except AssertionError as exc:
        out["ue8m0"]["without_round_scale"] = str(exc)

    # zero_copy: the combine reads the tensor get_next_low_latency_combine_buffer handed out, not x.
    staging = buf.get_next_low_latency_combine_buffer(handle)
    out["zero_copy"] = dict(shape=tuple(staging.shape), dtype=str(staging.dtype),
                            uninitialised=bool(torch.isnan(staging).all()),
                            same=buf.get_next_low_latency_combine_buffer(handle) is staging)
    staging.copy_(rx)
    zcomb, _, _ = buf.low_latency_combine(torch.full_like(rx, float("nan")), ids, w, handle, zero_copy=True)
    out["zero_copy"]["comb"] = zcomb
    return out


def _nvl_capacity(rank: int, group: Any) -> dict[str, str]:
    """An intranode normal buffer sized as deepep-switch's legacy plan (the default dispatch/combine Config hints
    at Buffer.num_sms = 20, hidden 7168) against the Config rtp-llm's deepep_test passes (24 SMs)."""
    import torch.distributed as dist

    from deepep_switch.providers.reference import ReferenceBuffer, ReferenceConfig

    world, hidden, topk = dist.get_world_size(group), 7168, 8
    experts = 8 * world
    configs = (ReferenceBuffer.get_dispatch_config(world), ReferenceBuffer.get_combine_config(world))
    nvl = max(c.get_nvl_buffer_size_hint(hidden * 2, world) for c in configs)
    ids = torch.arange(topk, dtype=torch.int64).repeat(4, 1) * world  # every token on every rank
    w = torch.ones((4, topk), dtype=torch.float32)
    x = torch.ones((4, hidden), dtype=torch.bfloat16)
    x_fp8 = (x.to(FP8), torch.ones((4, hidden // 128), dtype=torch.float32))
    out: dict[str, str] = {"nvl": str(nvl)}
    for label, nvl_bytes in (("sized", nvl), ("zero", 0)):
        buf = ReferenceBuffer(group, nvl_bytes, 0)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(ids, experts)
        layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        for name, payload, config in (("default", x, None), ("cfg20_bf16", x, ReferenceConfig(20, 8, 256)),
                                      ("cfg24_fp8", x_fp8, ReferenceConfig(24, 8, 256)),
                                      ("cfg24_bf16", x, ReferenceConfig(24, 8, 256))):
            try:
                rx, _, rw, _, handle, _ = buf.dispatch(payload, topk_idx=ids, topk_weights=w, config=config, **layout)
                out[f"{label}/dispatch/{name}"] = "ok"
            except AssertionError as exc:
                out[f"{label}/dispatch/{name}"] = str(exc)
        rx, _, rw, _, handle, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, **layout)
        for name, config in (("default", None), ("cfg24_bf16", ReferenceConfig(24, 8, 256))):
            try:
                buf.combine(rx, handle, topk_weights=rw, config=config)
                out[f"{label}/combine/{name}"] = "ok"
            except AssertionError as exc:
                out[f"{label}/combine/{name}"] = str(exc)
    return out


def _elastic(rank: int, case: dict, group: Any, inp: dict, ep: bool = False) -> dict[str, Any]:
    """ElasticBuffer's calls; ``ep``: the same calls on DeepEP 2.5's EPBuffer (they all keep their meaning)."""
    from deepep_switch.providers.reference import ReferenceElasticBuffer, ReferenceEPBuffer

    cls = ReferenceEPBuffer if ep else ReferenceElasticBuffer
    experts, align, m = case["experts"], case["align"], case["elastic_m"]
    x, ids, w = inp["x"], inp["ids"], inp["w"]
    common = dict(num_experts=experts, expert_alignment=align)
    buf = cls(group, num_max_tokens_per_rank=m, hidden=case["hidden"], num_topk=case["topk"])
    det = cls(group, num_max_tokens_per_rank=m, hidden=case["hidden"], num_topk=case["topk"], deterministic=True)
    out: dict[str, Any] = {}

    stats = torch.zeros(experts // case["world"], dtype=torch.int32)
    rx, ridx, rw, h, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, do_cpu_sync=True,
                                      cumulative_local_expert_recv_stats=stats, **common)
    comb, comb_w, _ = buf.combine(rx, h, topk_weights=rw)
    comb_nw, comb_w_none, _ = buf.combine(rx, h)
    out["sync"] = dict(x=rx, idx=ridx, w=rw, stats=stats, comb=comb, comb_w=comb_w, comb_nw=comb_nw,
                       comb_w_none=comb_w_none is None, **_elastic_fields(h))

    cx, cidx, cw, ch, _ = buf.dispatch(x, handle=h)
    c2x, c2idx, c2w, _, _ = buf.dispatch(inp["x2"], handle=h, topk_weights=w)
    out["cached"] = dict(x=cx, idx=cidx, w_none=cw is None, same_handle=ch is h, x2=c2x, idx2=c2idx, w2=c2w)

    # FP8 tuple, and no topk_weights (the weights output must then be None).
    (fq, fs), fidx, fw, fh, _ = buf.dispatch((inp["x_fp8"], inp["scales"]), topk_idx=ids, **common)
    out["fp8"] = dict(q=u8(fq), s=fs, idx=fidx, w_none=fw is None, meta=fh.recv_src_metadata.clone())

    nx, nidx, nw, nh, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, do_cpu_sync=False, **common)
    ncomb, ncomb_w, _ = buf.combine(nx, nh, topk_weights=nw)
    ncx, ncidx, _, _, _ = buf.dispatch(x, handle=nh)
    out["nosync"] = dict(x=nx, idx=nidx, w=nw, comb=ncomb, comb_w=ncomb_w, cached_x=ncx, cached_idx=ncidx,
                         **_elastic_fields(nh))

    dx, didx, dw, dh, _ = det.dispatch(x, topk_idx=ids, topk_weights=w, **common)
    ex, _, ew, eh, _ = det.dispatch(x, topk_idx=ids, topk_weights=w, do_expand=True, **common)
    out["det"] = dict(x=dx, idx=didx, w=dw, meta=dh.recv_src_metadata.clone(), ex=ex, ew=ew,
                      emeta=eh.recv_src_metadata.clone(), epsum=eh.psum_num_recv_tokens_per_expert.clone())

    expand = {}
    for a in (1, 4):
        for sync in (True, False):
            ex, eidx, ew, eh, _ = buf.dispatch(x, topk_idx=ids, topk_weights=w, num_experts=experts,
                                               expert_alignment=a, do_cpu_sync=sync, do_expand=True)
            ecomb, ecomb_w, _ = buf.combine(ex, eh, topk_weights=ew)
            zx, _, zw, _, _ = buf.dispatch(x, handle=eh, topk_weights=w, do_expand=True, do_zero_padding=True)
            expand[(a, sync)] = dict(x=ex, idx_none=eidx is None, w=ew, comb=ecomb, comb_w=ecomb_w,
                                     zero_x=zx, zero_w=zw, **_elastic_fields(eh))
    out["expand"] = expand

    single = cls(group, num_max_tokens_per_rank=m, hidden=case["hidden"], num_topk=case["topk"],
                 allow_multiple_reduction=False)
    sx, _, _, sh, _ = single.dispatch(x, topk_idx=ids, topk_weights=w, do_expand=True, **common)
    out["expand_single_reduction"] = dict(comb=single.combine(sx, sh)[0])

    (eq, es), _, _, efh, _ = buf.dispatch((inp["x_fp8"], inp["scales"]), topk_idx=ids, topk_weights=w,
                                          do_expand=True, use_tma_aligned_col_major_sf=True, **common)
    out["expand_fp8"] = dict(q=u8(eq), s=es.contiguous(), s_stride=tuple(es.stride()),
                             meta=efh.recv_src_metadata.clone(),
                             psum_expert=efh.psum_num_recv_tokens_per_expert.clone())
    return out


def run_cases(rank: int, world: int, cases: list[dict]) -> dict[str, dict[str, Any]]:
    """Spawned on every rank: run every case's legacy, low-latency, elastic and ep calls, return raw outputs."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # tiny tensors; several ranks share few cores
    group = dist.group.WORLD
    assert dist.get_world_size(group) == world
    results: dict[str, Any] = {"nvl_capacity": _nvl_capacity(rank, group)}
    for case in cases:
        inp = make_inputs(case, rank)
        results[case["name"]] = dict(legacy=_legacy(rank, case, group, inp),
                                     ll=_low_latency(rank, case, group, inp),
                                     elastic=_elastic(rank, case, group, inp),
                                     ep=_elastic(rank, case, group, inp, ep=True))
    return results
