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
        assert ep_buffer_size_hint(2, 4096, 7168, 8, fp8) == 114 * MiB == elastic_buffer_size_hint(2, 4096, 7168, 8, fp8)
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
