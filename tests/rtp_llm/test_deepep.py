"""Port of rtp-llm's ``rtp_llm/models_py/distributed/test/deepep_test.py`` at alibaba/rtp-llm @
4b8d39cd5cbe4eff0cf0661411e15be21ccc58b9, against the rtp-llm stand-in and deepep-switch.

rtp-llm's ``DeepEPTest`` (a ``unittest.TestCase``) builds the wrapper with ``init_deepep_wrapper(engine_config,
model_config)`` and then drives DeepEP's V1 API directly on ``DeepEPWrapper.get_instance(...).buffer``. Its tests,
here as pytest functions on both ``RTP_LLM_DEEPEP_BACKEND`` values, on CPU (reference providers, gloo) and, marked
``gpu``, on 2 GPUs (real DeepEP):

* ``test_deepep_normal``: ``get_dispatch_layout`` against a hand-computed layout; 24 ``dispatch`` cases
  (previous event x async x {random bf16, rank-valued bf16, FP8} x top-k or not) checking received rows per
  source rank (via ``handle[0]``, the rank prefix matrix), per-expert counts, local ids and weights, the
  ``num_worst_tokens`` padding, cached dispatch; ``combine`` back to the tokens (and their weights).
* ``test_deepep_low_latency``: 8 ``low_latency_dispatch`` cases (recv hook or not x bf16 / FP8 / FP8 power-of-two /
  FP8 UE8M0) checking per local expert the count (also against ``cumulative_local_expert_recv_stats``),
  ``handle[1]`` (layout_range), the rows' values and ``handle[0]`` (src_info); ``low_latency_combine`` with and
  without ``zero_copy`` has no NaN.
* ``test_deepep_normal_expert_alignment``: ``dispatch(expert_alignment=4)`` FP8 then bf16: aligned counts (at
  hidden 128 on legacy, as the original; at hidden 256 on elastic and ep, see ``ALIGNMENT_HIDDEN``).
* ``test_deepep_low_latency_m2n``, ``test_deepep_low_latency_per_token_quant``: ACCL-EP only (see each).
* ``test_init_sp_deepep_wrapper``: under speculative decoding the low-latency budget is 32 x (4 + 1) = 160
  tokens, 256 per rank, and ``get_instance`` finds the wrapper with it.

**On elastic and ep** (DeepEP 2.1's ``ElasticBuffer``, 2.5's ``EPBuffer``) the V1 calls on ``wrapper.buffer`` have
no meaning (neither buffer has a layout call, a ``Config`` or low-latency kernels). Each test then asserts that the
direct V1 call raises deepep-switch's guard ``AttributeError`` (naming ``RTP_LLM_DEEPEP_BACKEND=<the generation>``),
and runs the same data through deepep-switch's
routers on that wrapper instead, keeping every check that has a counterpart there: received rows and per-expert
counts (``NormalRouter`` payloads and ``router.handle[0]``), low-latency counts, rows and src_info/layout_range
(``LowLatencyRouter``'s handle view), combine. What has none is said next to it.

Replaced infrastructure: ``mp.spawn`` per test -> one ``deepep_switch.launch.spawn`` per (machine, backend) whose
ranks run every test's body in the original order (each with its own distributed environment and port, as the
original's separate spawns), reported per test; ``PortsContext`` -> free ports; ``cuda`` -> the rank's device;
``rtp_llm.*`` -> the stand-in. ``bench`` / ``bench_kineto`` loops (performance only, no assertions) -> one
untimed call each; the 1 s sleeps between them are dropped. CPU sizes, where smaller, are said at ``CPU_ARGS``.
"""

from __future__ import annotations

import os
import random
from functools import partial
from typing import Any, Dict, Tuple

import pytest
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from _ported import (CPU, GPU, assert_backend, check_subtest, free_ports, install_and_import, is_v2, run_subtests,
                     set_device, spawn_ranks, variants)

# The original file's imports (less server_args / server_config_setup / bench_util / PortsContext, see the
# tests using them), bound by install_and_import() in each rank after routers.rtp_llm.install().
IMPORTS = [
    ("rtp_llm.config.engine_config", ["EngineConfig"]),
    ("rtp_llm.config.model_config", ["ModelConfig"]),
    ("rtp_llm.config.py_config_modules", ["PyEnvConfigs"]),
    ("rtp_llm.models_py.distributed.collective_torch",
     ["destroy_distributed_environment", "init_distributed_environment"]),
    ("rtp_llm.models_py.distributed.deepep_wrapper",
     ["DeepEPBuffer", "DeepEPConfig", "DeepEPWrapper", "DeepepWrapperConfig", "init_deepep_wrapper"]),
    ("rtp_llm.models_py.modules.factory.fused_moe.defs.config_adapter", ["MoEConfigAdapter"]),
    ("rtp_llm.models_py.utils.math", ["align"]),
    ("rtp_llm.ops", ["FfnDisAggregateConfig", "MoeConfig", "NcclCommConfig", "ParallelismConfig"]),
    ("rtp_llm.test.utils.numeric_util", ["calc_diff", "hash_tensor", "per_token_cast_back", "per_token_cast_to_fp8"]),
]

# What the elastic and ep variants (and the per-token-quant check) use besides rtp-llm's names.
SWITCH_IMPORTS = [
    ("routers", ["CombineForwardPayload", "LowLatencyRouter", "NormalRouter", "RouterOptions"]),
    ("deepep_switch.quant", ["Quant"]),
    ("rtp_llm.models_py.modules.factory.fused_moe.defs.quant_config", ["FusedMoEQuantConfig"]),
    ("rtp_llm.models_py.modules.factory.fused_moe.impl.cuda.routers.deepep_low_latency_router",
     ["DeepEpLowLatencyRouter"]),
]

# Bound in each rank by install_and_import(), after routers.rtp_llm.install(); None in the pytest process.
EngineConfig = ModelConfig = PyEnvConfigs = destroy_distributed_environment = init_distributed_environment = \
    DeepEPBuffer = DeepEPConfig = DeepEPWrapper = DeepepWrapperConfig = init_deepep_wrapper = MoEConfigAdapter = \
    align = FfnDisAggregateConfig = MoeConfig = NcclCommConfig = ParallelismConfig = calc_diff = hash_tensor = \
    per_token_cast_back = per_token_cast_to_fp8 = CombineForwardPayload = LowLatencyRouter = NormalRouter = \
    RouterOptions = Quant = FusedMoEQuantConfig = DeepEpLowLatencyRouter = None

def _elastic() -> bool:
    """This rank runs an NCCL-based generation (elastic or ep): V1 calls on ``wrapper.buffer`` are refused and the
    tests go through the routers."""
    return is_v2(os.environ["RTP_LLM_DEEPEP_BACKEND"])


def _v1_call_is_refused(call, name: str) -> None:
    """On elastic and ep: ``wrapper.buffer.<V1 method>(...)`` raises the guard's AttributeError naming the backend."""
    guard = f"RTP_LLM_DEEPEP_BACKEND={os.environ['RTP_LLM_DEEPEP_BACKEND']}"  # in the guard's AttributeError
    with pytest.raises(AttributeError, match=guard) as info:
        call()
    assert repr(name) in str(info.value) and "RTP_LLM_DEEPEP_BACKEND=legacy" in str(info.value)


def inplace_unique(x: torch.Tensor, num_slots: int):
    assert x.dim() == 2
    mask = x < 0
    x_padded = x.masked_fill(mask, num_slots)
    bin_count = torch.zeros((x.size(0), num_slots + 1), dtype=x.dtype, device=x.device)
    bin_count.scatter_add_(1, x_padded, torch.ones_like(x_padded))
    bin_count = bin_count[:, :num_slots]
    sorted_bin_count, sorted_bin_idx = torch.sort(bin_count, dim=-1, descending=True)
    sorted_bin_idx.masked_fill_(sorted_bin_count == 0, -1)
    sorted_bin_idx = torch.sort(sorted_bin_idx, descending=True, dim=-1).values
    x[:, :].fill_(-1)
    valid_len = min(num_slots, x.size(1))
    x[:, :valid_len] = sorted_bin_idx[:, :valid_len]


def calc_ll_num_max_token_per_rank(max_generate_batch_size: int, tp_size: int) -> int:
    """ll_num_max_token_per_rank aligned to 8 (the original's M2N helper)."""
    ll_num_max_token_per_rank = (max_generate_batch_size + tp_size - 1) // tp_size
    return (ll_num_max_token_per_rank + 7) // 8 * 8


def _intranode_inputs(num_tokens, hidden, num_experts, num_topk, num_ranks, rank, group):
    """The original ``_test_intranode_main``'s data and reference layout (lines 115-168), unchanged."""
    x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16, device="cuda" if _gpu() else "cpu") * rank
    dev = x.device
    x_pure_rand = torch.randn((num_tokens, hidden), dtype=torch.bfloat16, device=dev)
    x_e4m3 = per_token_cast_to_fp8(x, False) if DeepEPBuffer.is_sm90_compiled() else None
    x_e4m3 = (x_e4m3[0], x_e4m3[1].T.contiguous().T) if x_e4m3 is not None else None
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32, device=dev).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=False)[1]
    topk_weights = torch.ones((num_tokens, num_topk), dtype=torch.float32, device=dev) * rank
    topk_weights_pure_rand = torch.randn((num_tokens, num_topk), dtype=torch.float32, device=dev)
    rank_idx = topk_idx // (num_experts // num_ranks)
    rank_idx.masked_fill_(topk_idx == -1, -1)
    inplace_unique(rank_idx, num_ranks)

    # Expert meta
    num_tokens_per_expert = torch.zeros((num_experts,), dtype=torch.int, device=dev)
    for i in range(num_experts):
        num_tokens_per_expert[i] = (topk_idx == i).sum()
    gbl_num_tokens_per_expert = num_tokens_per_expert.clone()
    dist.all_reduce(gbl_num_tokens_per_expert, group=group)

    # Rank layout meta
    num_tokens_per_rank = torch.empty((num_ranks,), dtype=torch.int, device=dev)
    token_idx_in_rank = torch.full((num_ranks, num_tokens), -1, dtype=torch.long, device=dev)
    for i in range(num_ranks):
        num_tokens_per_rank[i] = (rank_idx == i).sum()
        token_sel = (rank_idx == i).max(dim=-1)[0]
        count = token_sel.sum().item()
        tokens = torch.sort(token_sel.to(torch.int), descending=True)[1]
        tokens[:count] = torch.sort(tokens[:count])[0]
        token_idx_in_rank[i][tokens[:count]] = torch.arange(count, dtype=torch.long, device=dev)
    token_idx_in_rank = token_idx_in_rank.T.contiguous().to(torch.int)
    is_token_in_rank = token_idx_in_rank >= 0
    gbl_num_tokens_per_rank = num_tokens_per_rank.clone()
    dist.all_reduce(gbl_num_tokens_per_rank, group=group)
    return dict(x=x, x_pure_rand=x_pure_rand, x_e4m3=x_e4m3, topk_idx=topk_idx, topk_weights=topk_weights,
                topk_weights_pure_rand=topk_weights_pure_rand, num_tokens_per_expert=num_tokens_per_expert,
                gbl_num_tokens_per_expert=gbl_num_tokens_per_expert, num_tokens_per_rank=num_tokens_per_rank,
                is_token_in_rank=is_token_in_rank, gbl_num_tokens_per_rank=gbl_num_tokens_per_rank)


def _gpu() -> bool:
    from _ported import on_gpu

    return on_gpu()


class DeepEPTest:
    """rtp-llm's ``DeepEPTest`` (its ``test_*`` methods are the module-level tests at the bottom)."""

    NUM_PROCESSES = [2]
    MAX_SEQ_LEN = [1024]
    MAX_GENERATE_BATCH_SIZES = [128]
    HIDDEN_SIZES = [7168]
    NUM_EXPERT = [64]
    TOP_K = [8]
    # rtp-llm's large_gemm_with_hook overlaps an 8192^2 fp32 GEMM with the receive hook (performance only).
    OVERLAP_GEMM_SIZE = 8192

    @staticmethod
    def _test_intranode_main(num_tokens: int, hidden: int, num_experts: int, num_topk: int, num_sms: int,
                             local_rank: int, num_ranks: int, rank: int, buffer, group: dist.ProcessGroup):
        assert num_experts % num_ranks == 0
        if local_rank == 0:
            print(f"[config] num_tokens={num_tokens}, hidden={hidden}, num_topk={num_topk}", flush=True)

        # Random data, expert meta, rank layout meta
        d = _intranode_inputs(num_tokens, hidden, num_experts, num_topk, num_ranks, rank, group)
        x, x_pure_rand, x_e4m3 = d["x"], d["x_pure_rand"], d["x_e4m3"]
        topk_idx, topk_weights, topk_weights_pure_rand = d["topk_idx"], d["topk_weights"], d["topk_weights_pure_rand"]
        num_tokens_per_expert, gbl_num_tokens_per_expert = d["num_tokens_per_expert"], d["gbl_num_tokens_per_expert"]
        num_tokens_per_rank, gbl_num_tokens_per_rank = d["num_tokens_per_rank"], d["gbl_num_tokens_per_rank"]
        is_token_in_rank = d["is_token_in_rank"]

        (ref_num_tokens_per_rank, _, ref_num_tokens_per_expert, ref_is_token_in_rank, _) = \
            buffer.get_dispatch_layout(topk_idx, num_experts)
        assert torch.allclose(ref_num_tokens_per_rank, num_tokens_per_rank)
        assert torch.allclose(ref_num_tokens_per_expert, num_tokens_per_expert)
        assert torch.allclose(ref_is_token_in_rank, is_token_in_rank)
        buffer.get_dispatch_layout(topk_idx, num_experts)  # rtp-llm: bench(...) of this call (performance only)
        group.barrier()

        # Config
        nvl_buffer_size = 256
        config = DeepEPConfig(num_sms, 8, nvl_buffer_size)

        # Test dispatch
        # noinspection PyShadowingNames
        def check_data(check_x, rank_prefix_matrix):
            assert torch.allclose(check_x.amin(dim=1), check_x.amax(dim=1))
            check_start = 0
            for i in range(num_ranks):
                check_end = rank_prefix_matrix[i][rank].item()
                assert (check_x[check_start:check_end, :].int() - i).sum().item() == 0
                check_start = check_end

        for previous_mode in (False, True):
            for async_mode in (False, True):
                for current_x in filter(lambda elem: elem is not None, (x_pure_rand, x, x_e4m3)):
                    for with_topk in (False, True):
                        if local_rank == 0:
                            print(f'[testing] Running with {"FP8" if isinstance(current_x, tuple) else "BF16"}, '
                                  f'{"with" if with_topk else "without"} top-k (async={async_mode}, '
                                  f'previous={previous_mode}) ...', flush=True, end="")
                        dispatch_args = {
                            "x": current_x,
                            "num_tokens_per_rank": num_tokens_per_rank,
                            "is_token_in_rank": is_token_in_rank,
                            "num_tokens_per_expert": num_tokens_per_expert,
                            "config": config,
                            "async_finish": async_mode,
                        }
                        if with_topk:
                            dispatch_args.update({
                                "topk_idx": topk_idx,
                                "topk_weights": topk_weights_pure_rand if current_x is x_pure_rand else topk_weights,
                            })
                        if previous_mode:
                            dispatch_args.update({"previous_event": buffer.capture()})
                        (recv_x, recv_topk_idx, recv_topk_weights, recv_num_tokens_per_expert_list, handle,
                         event) = buffer.dispatch(**dispatch_args)
                        event.current_stream_wait() if async_mode else ()
                        recv_x = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x

                        # Checks
                        rank_prefix_matrix = handle[0]
                        assert gbl_num_tokens_per_rank[rank].item() == recv_x.size(0), \
                            f"{gbl_num_tokens_per_rank[rank].item()} != {recv_x.size(0)}"
                        assert gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist() == \
                            recv_num_tokens_per_expert_list
                        if current_x is not x_pure_rand:
                            check_data(recv_x, rank_prefix_matrix)
                        recv_topk_weights_clone = None
                        if with_topk:
                            # Check `topk_idx`
                            assert (recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (
                                recv_topk_idx < (num_experts // num_ranks)))).sum().item() == recv_topk_idx.numel()
                            for i, count in enumerate(recv_num_tokens_per_expert_list):
                                assert recv_topk_idx.eq(i).sum().item() == count

                            # Check `topk_weights`
                            recv_topk_weights_clone = recv_topk_weights.clone()
                            if current_x is not x_pure_rand:
                                recv_topk_weights[recv_topk_idx.eq(-1)] = recv_topk_weights.amax(
                                    dim=1, keepdim=True).expand_as(recv_topk_weights)[recv_topk_idx.eq(-1)]
                                check_data(recv_topk_weights, rank_prefix_matrix)

                        # Test `num_worst_tokens != 0`
                        if with_topk:
                            num_worst_tokens = num_tokens * num_ranks
                            dispatch_args.update({"num_worst_tokens": num_worst_tokens})
                            (recv_worst_x, recv_worst_topk_idx, recv_worst_topk_weights, empty_list, _,
                             event) = buffer.dispatch(**dispatch_args)
                            event.current_stream_wait() if async_mode else ()
                            recv_worst_x = per_token_cast_back(*recv_worst_x) if isinstance(recv_worst_x, tuple) \
                                else recv_worst_x
                            assert len(empty_list) == 0
                            assert num_worst_tokens == recv_worst_x.size(0)
                            assert num_worst_tokens == recv_worst_topk_idx.size(0)
                            assert num_worst_tokens == recv_worst_topk_weights.size(0)
                            assert torch.equal(recv_x, recv_worst_x[: recv_x.size(0)])
                            assert torch.equal(recv_topk_idx, recv_worst_topk_idx[: recv_x.size(0)])
                            assert torch.equal(recv_topk_weights_clone, recv_worst_topk_weights[: recv_x.size(0)])
                            assert torch.all(recv_worst_topk_idx[recv_x.size(0):] == -1).item()

                        # Test cached dispatch (must without top-k staffs)
                        if not with_topk:
                            dispatch_args = {"x": current_x, "handle": handle, "config": config,
                                             "async_finish": async_mode}
                            if previous_mode:
                                dispatch_args.update({"previous_event": buffer.capture()})
                            recv_x, _, _, _, _, event = buffer.dispatch(**dispatch_args)
                            event.current_stream_wait() if async_mode else ()
                            recv_x = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
                            if current_x is not x_pure_rand:
                                check_data(recv_x, rank_prefix_matrix)

                        # Test combine
                        combine_args = {"x": recv_x, "handle": handle, "config": config, "async_finish": async_mode}
                        if with_topk:
                            combine_args.update({"topk_weights": recv_topk_weights})
                        if previous_mode:
                            combine_args.update({"previous_event": buffer.capture()})
                        combined_x, combined_topk_weights, event = buffer.combine(**combine_args)
                        event.current_stream_wait() if async_mode else ()
                        check_x = combined_x.float() / is_token_in_rank.sum(dim=1).unsqueeze(1)
                        ref_x = x_pure_rand if current_x is x_pure_rand else x
                        assert calc_diff(check_x, ref_x) < 5e-6
                        if with_topk:
                            check_topk_weights = combined_topk_weights if (current_x is x_pure_rand) else (
                                combined_topk_weights / is_token_in_rank.sum(dim=1).unsqueeze(1))
                            ref_topk_weights = topk_weights_pure_rand if current_x is x_pure_rand else topk_weights
                            assert calc_diff(check_topk_weights, ref_topk_weights) < 1e-9

                        if local_rank == 0:
                            print(" passed", flush=True)

        # Tune dispatch performance. rtp-llm times nvl_chunk_size in range(4, 33, 2) and the default Config with
        # bench() and gathers the best from rank 0 (no assertion): here one untimed call each with the first chunk
        # size (4) and the default, and the "best" is that first chunk size.
        best_dispatch_results = None
        for current_x in filter(lambda elem: elem is not None, (x_e4m3, x)):
            best_results = None
            for nvl_chunk_size in (4, 0):
                if nvl_chunk_size > 0:
                    config = DeepEPConfig(num_sms, nvl_chunk_size, nvl_buffer_size)
                else:
                    DeepEPBuffer.set_num_sms(num_sms)
                    config = DeepEPBuffer.get_dispatch_config(num_ranks)
                tune_args = {"x": current_x, "handle": handle, "config": config}
                buffer.dispatch(**tune_args)
                if best_results is None and nvl_chunk_size > 0:
                    best_results = (num_sms, nvl_chunk_size)
            if best_dispatch_results is None:
                best_dispatch_results = torch.tensor([best_results[0], best_results[1]], dtype=torch.int32,
                                                     device=x.device)
                all_best_fp8_results_list = [torch.zeros_like(best_dispatch_results)
                                             for _ in range(torch.distributed.get_world_size())]
                dist.all_gather(all_best_fp8_results_list, best_dispatch_results, group=group)
                best_dispatch_results = all_best_fp8_results_list[0].tolist()
        dispatch_config = DeepEPConfig(best_dispatch_results[0], best_dispatch_results[1], nvl_buffer_size)

        dispatch_args = {"x": x, "num_tokens_per_rank": num_tokens_per_rank, "is_token_in_rank": is_token_in_rank,
                         "num_tokens_per_expert": num_tokens_per_expert,
                         "config": dispatch_config if dispatch_config is not None else config}
        recv_x, _, _, _, handle, _ = buffer.dispatch(**dispatch_args)

        # Tune combine performance: rtp-llm times nvl_chunk_size in range(1, 17) and the default; one call each.
        for nvl_chunk_size in (1, 0):
            if nvl_chunk_size > 0:
                config = DeepEPConfig(num_sms, nvl_chunk_size, nvl_buffer_size)
            else:
                DeepEPBuffer.set_num_sms(num_sms)
                config = DeepEPBuffer.get_combine_config(num_ranks)
            tune_args = {"x": recv_x, "handle": handle, "config": config}
            buffer.combine(**tune_args)

    @staticmethod
    def _test_intranode_router_main(num_tokens: int, hidden: int, num_experts: int, num_topk: int, num_sms: int,
                                    local_rank: int, num_ranks: int, rank: int, wrapper, group: dist.ProcessGroup):
        """Elastic and ep: ``_test_intranode_main``'s data and checks through deepep-switch's ``NormalRouter``."""
        buffer = wrapper.buffer
        d = _intranode_inputs(num_tokens, hidden, num_experts, num_topk, num_ranks, rank, group)
        x, x_pure_rand, x_e4m3 = d["x"], d["x_pure_rand"], d["x_e4m3"]
        topk_idx, topk_weights, topk_weights_pure_rand = d["topk_idx"], d["topk_weights"], d["topk_weights_pure_rand"]
        gbl_num_tokens_per_expert = d["gbl_num_tokens_per_expert"]
        gbl_num_tokens_per_rank = d["gbl_num_tokens_per_rank"]
        is_token_in_rank = d["is_token_in_rank"]

        # get_dispatch_layout is V1 (ElasticBuffer/EPBuffer compute the layout inside dispatch): refused clearly. The
        # layout it would return is what the dispatches below must realise (rows per rank, counts per expert).
        _v1_call_is_refused(lambda: buffer.get_dispatch_layout(topk_idx, num_experts), "get_dispatch_layout")

        def check_data(check_x, rank_prefix_matrix):
            assert torch.allclose(check_x.amin(dim=1), check_x.amax(dim=1))
            check_start = 0
            for i in range(num_ranks):
                check_end = rank_prefix_matrix[i][rank].item()
                assert (check_x[check_start:check_end, :].int() - i).sum().item() == 0
                check_start = check_end

        # No counterpart on the router: previous_event / async_finish (V1 stream options), dispatch without top-k
        # and cached dispatch (the router always routes by top-k), num_worst_tokens (the elastic normal path syncs
        # the host for exact row counts), a Config, and combine's top-k weights (finalize returns the tokens only).
        # So one dispatch + combine per payload kind: random bf16, rank-valued bf16, FP8 (the router quantises x
        # with DeepEP's recipe, as per_token_cast_to_fp8 made x_e4m3).
        for current_x in filter(lambda elem: elem is not None, (x_pure_rand, x, x_e4m3)):
            fp8 = isinstance(current_x, tuple)
            router = NormalRouter(wrapper, RouterOptions(quant=Quant.FP8_BLOCK if fp8 else Quant.NONE))
            weights = topk_weights_pure_rand if current_x is x_pure_rand else topk_weights
            payload = router.prepare(x if fp8 else current_x, None, None, weights, topk_idx)
            recv_x = per_token_cast_back(payload.expert_x, payload.expert_x_scale) if fp8 else payload.expert_x
            recv_topk_idx, recv_topk_weights = payload.expert_topk_ids, payload.expert_topk_weights
            recv_num_tokens_per_expert_list = payload.expert_tokens_meta.expert_num_tokens_cpu

            rank_prefix_matrix = router.handle[0]  # a collective on elastic and ep: every rank reads it
            assert gbl_num_tokens_per_rank[rank].item() == recv_x.size(0), \
                f"{gbl_num_tokens_per_rank[rank].item()} != {recv_x.size(0)}"
            assert gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist() == recv_num_tokens_per_expert_list
            if current_x is not x_pure_rand:
                check_data(recv_x, rank_prefix_matrix)
            assert (recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (
                recv_topk_idx < (num_experts // num_ranks)))).sum().item() == recv_topk_idx.numel()
            for i, count in enumerate(recv_num_tokens_per_expert_list):
                assert recv_topk_idx.eq(i).sum().item() == count
            if current_x is not x_pure_rand:
                recv_topk_weights = recv_topk_weights.clone()
                recv_topk_weights[recv_topk_idx.eq(-1)] = recv_topk_weights.amax(
                    dim=1, keepdim=True).expand_as(recv_topk_weights)[recv_topk_idx.eq(-1)]
                check_data(recv_topk_weights, rank_prefix_matrix)

            combined_x = router.finalize(CombineForwardPayload(recv_x), payload.expert_topk_weights,
                                         payload.expert_topk_ids, False, {"original_num_tokens": num_tokens})
            check_x = combined_x.float() / is_token_in_rank.sum(dim=1).unsqueeze(1)
            ref_x = x_pure_rand if current_x is x_pure_rand else x
            assert calc_diff(check_x, ref_x) < 5e-6
        # The Config tuning (performance only) has no meaning on an ElasticBuffer.

    @staticmethod
    def _test_low_latency_main(num_tokens: int, hidden: int, num_experts: int, num_topk: int, rank: int,
                               num_ranks: int, group: ProcessGroup, buffer, seed: int = 0):
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)

        assert num_experts % num_ranks == 0
        num_local_experts = num_experts // num_ranks

        # NOTES: the integers greater than 256 exceed the BF16 precision limit
        rank_offset = 128
        assert num_ranks - rank_offset < 257, "Too many ranks (exceeding test precision limit)"

        dev = "cuda" if _gpu() else "cpu"
        x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16, device=dev) * (rank - rank_offset)
        if os.getenv("ACCL_FP8_CAST_LEVEL", "1") == "2":
            x[:, -hidden:] = torch.arange(num_tokens, device=dev).to(torch.bfloat16).view(-1, 1)
        else:
            x[:, -128:] = torch.arange(num_tokens, device=dev).to(torch.bfloat16).view(-1, 1)
        scores = torch.randn((num_tokens, num_experts), dtype=torch.float32, device=dev).abs() + 1
        topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=True)[1]
        topk_weights = torch.randn((num_tokens, num_topk), dtype=torch.float32, device=dev).abs()

        # Randomly mask some positions
        for i in range(10):
            topk_idx[random.randint(0, num_tokens - 1), random.randint(0, num_topk - 1)] = -1

        # Check dispatch correctness
        do_check = True
        hash_value, num_times = 0, 0
        for return_recv_hook in (False, True):
            for dispatch_use_fp8 in (False, True):
                for round_scale in (False, True) if dispatch_use_fp8 else (False,):
                    for use_ue8m0 in (False, True) if round_scale else (False,):
                        num_times += 1
                        for i in range((num_times % 2) + 1):
                            cumulative_local_expert_recv_stats = torch.zeros((num_local_experts,), dtype=torch.int,
                                                                             device=dev)
                            packed_recv_x, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
                                x, topk_idx, num_tokens, num_experts, use_fp8=dispatch_use_fp8,
                                round_scale=round_scale, use_ue8m0=use_ue8m0,
                                cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
                                async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
                            hook() if return_recv_hook else event.current_stream_wait()
                        packed_recv_x = (packed_recv_x[0], packed_recv_x[1].contiguous()) if dispatch_use_fp8 \
                            else packed_recv_x
                        if os.getenv("ACCL_FP8_CAST_LEVEL", "1") == "2":
                            simulated_gemm_x = per_token_cast_back(
                                packed_recv_x[0].view(-1, hidden), packed_recv_x[1].view(-1, 1)
                            ).view(packed_recv_x[0].shape) if dispatch_use_fp8 else packed_recv_x.clone()
                        else:
                            simulated_gemm_x = per_token_cast_back(
                                packed_recv_x[0].view(-1, hidden), packed_recv_x[1].view(-1, hidden // 128)
                            ).view(packed_recv_x[0].shape) if dispatch_use_fp8 else packed_recv_x.clone()
                        all_topk_idx = torch.empty((num_ranks, num_tokens, num_topk), dtype=topk_idx.dtype,
                                                   device=dev)
                        # rtp-llm gathers into the [R, T, K] tensor; gloo only fills the concatenated [R*T, K]
                        # form, the same memory (NCCL accepts both).
                        dist.all_gather_into_tensor(all_topk_idx.view(-1, num_topk), topk_idx, group=group)
                        for i in range(num_local_experts if do_check else 0):
                            expert_id = rank * num_local_experts + i
                            recv_x = per_token_cast_back(packed_recv_x[0][i], packed_recv_x[1][i]) \
                                if dispatch_use_fp8 else packed_recv_x[i]
                            recv_count, recv_src_info, recv_layout_range = (packed_recv_count[i], handle[0][i],
                                                                           handle[1][i])

                            # Check expert indices
                            int_mask = (2**32) - 1
                            num_valid_tokens = recv_count.item()
                            assert cumulative_local_expert_recv_stats[i].item() == num_valid_tokens, \
                                f"{cumulative_local_expert_recv_stats[i].item()} != {num_valid_tokens}"
                            assert num_valid_tokens == (recv_layout_range & int_mask).sum().item(), \
                                f"{num_valid_tokens} != {recv_layout_range & int_mask}.sum().item()"
                            assert num_valid_tokens == (all_topk_idx == expert_id).sum().item(), \
                                f"{num_valid_tokens} != {(all_topk_idx == expert_id).sum().item()}"

                            # Check received data
                            recv_x = recv_x[:num_valid_tokens]
                            recv_x_amin = recv_x[:, :-128].amin(dim=-1)
                            recv_src_info = recv_src_info[:num_valid_tokens]
                            assert torch.equal(recv_x_amin, recv_x[:, :-128].amax(dim=-1))
                            if round_scale:
                                assert calc_diff(recv_x[:, -1], recv_src_info.view(-1)) < 0.007
                            else:
                                assert (recv_x[:, -128:] - recv_src_info.view(-1, 1) % num_tokens).sum().item() == 0
                            for j in range(num_ranks):
                                begin_idx, count = (recv_layout_range[j] >> 32).item(), \
                                    (recv_layout_range[j] & int_mask).item()
                                if not round_scale and os.getenv("ACCL_FP8_CAST_LEVEL", "1") != "2":
                                    assert (recv_x_amin == j - rank_offset).sum().item() == \
                                        (all_topk_idx[j] == expert_id).sum().item()
                                assert (recv_x[begin_idx: begin_idx + count][:-128] - j).sum().item() == 0
                            if dispatch_use_fp8:
                                hash_value ^= hash_tensor(packed_recv_x[0][i, :num_valid_tokens])
                                if os.getenv("ACCL_FP8_CAST_LEVEL", "1") != "2":
                                    hash_value ^= hash_tensor(packed_recv_x[1][i, :num_valid_tokens])
                            else:
                                hash_value ^= hash_tensor(packed_recv_x[i, :num_valid_tokens])

                        # Check combine correctness
                        for zero_copy in (False, True):
                            if zero_copy:
                                buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated_gemm_x
                            out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=dev)
                            combined_x, event, hook = buffer.low_latency_combine(
                                simulated_gemm_x, topk_idx, topk_weights, handle, async_finish=not return_recv_hook,
                                zero_copy=zero_copy, return_recv_hook=return_recv_hook, out=out)
                            hook() if return_recv_hook else event.current_stream_wait()
                            if do_check:
                                diff = calc_diff(
                                    x * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1),
                                    combined_x)
                                assert torch.isnan(combined_x).sum().item() == 0
                                if not diff < (7e-4 if round_scale else 1e-5):
                                    print(f"assert Error: diff < (7e-4 if round_scale else 1e-5) {diff=}, "
                                          f"{zero_copy=}", flush=True)
                                # when enable round_scale, this diff check may not be passed (commented out upstream)
                                # assert diff < (7e-4 if round_scale else 1e-5), f'Error: {diff=}, {zero_copy=}'
                                if os.getenv("ACCL_FP8_CAST_LEVEL", "1") != "2":
                                    hash_value ^= hash_tensor(combined_x)

        # noinspection PyShadowingNames
        def large_gemm_with_hook(hook):
            size = DeepEPTest.OVERLAP_GEMM_SIZE
            mat_0 = torch.randn((size, size), dtype=torch.float, device=dev)
            mat_1 = torch.randn((size, size), dtype=torch.float, device=dev)
            mat_0 @ mat_1
            hook()

        # noinspection PyShadowingNames
        def test_func(zero_copy: bool, return_recv_hook: bool):
            recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                x, topk_idx, num_tokens, num_experts,
                cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
                use_fp8=True, async_finish=False, return_recv_hook=return_recv_hook)
            large_gemm_with_hook(hook) if return_recv_hook else None
            if zero_copy:
                buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated_gemm_x
            combined_x, event, hook = buffer.low_latency_combine(
                simulated_gemm_x, topk_idx, topk_weights, handle, zero_copy=zero_copy,
                return_recv_hook=return_recv_hook)
            large_gemm_with_hook(hook) if return_recv_hook else None

        # Dispatch + combine testing: rtp-llm's bench(test_func) and bench_kineto(test_func, ...) for both hook
        # settings only time these (no assertion): one untimed call each.
        partial(test_func, zero_copy=False, return_recv_hook=False)()
        for return_recv_hook in (False, True):
            group.barrier()
            partial(test_func, zero_copy=True, return_recv_hook=return_recv_hook)()
        return hash_value

    @staticmethod
    def _test_low_latency_router_main(num_tokens: int, hidden: int, num_experts: int, num_topk: int, rank: int,
                                      num_ranks: int, group: ProcessGroup, wrapper, seed: int = 0):
        """Elastic and ep: ``_test_low_latency_main``'s data and checks through deepep-switch's
        ``LowLatencyRouter``."""
        buffer = wrapper.buffer
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)
        num_local_experts = num_experts // num_ranks
        rank_offset = 128
        dev = "cuda" if _gpu() else "cpu"
        x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16, device=dev) * (rank - rank_offset)
        x[:, -128:] = torch.arange(num_tokens, device=dev).to(torch.bfloat16).view(-1, 1)
        scores = torch.randn((num_tokens, num_experts), dtype=torch.float32, device=dev).abs() + 1
        topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=True)[1]
        topk_weights = torch.randn((num_tokens, num_topk), dtype=torch.float32, device=dev).abs()
        for i in range(10):
            topk_idx[random.randint(0, num_tokens - 1), random.randint(0, num_topk - 1)] = -1

        # The V1 low-latency kernels do not exist on an ElasticBuffer or EPBuffer: refused clearly.
        _v1_call_is_refused(lambda: buffer.low_latency_dispatch(x, topk_idx, num_tokens, num_experts),
                            "low_latency_dispatch")
        _v1_call_is_refused(lambda: buffer.get_next_low_latency_combine_buffer(None),
                            "get_next_low_latency_combine_buffer")
        _v1_call_is_refused(lambda: buffer.low_latency_combine(x, topk_idx, topk_weights, None),
                            "low_latency_combine")

        # No counterpart on the router: return_recv_hook / async_finish (its path never returns a hook),
        # cumulative_local_expert_recv_stats (not exposed), UE8M0-packed scales (the router's power-of-two scales
        # stay float32), zero_copy (V1 RDMA buffer), and the never-asserted XOR hash. So bf16, FP8, FP8 with
        # power-of-two scales, each dispatched as often as the original does for that case.
        num_times, payload = 0, None
        for dispatch_use_fp8 in (False, True):
            for round_scale in (False, True) if dispatch_use_fp8 else (False,):
                num_times += 1
                router = LowLatencyRouter(wrapper, RouterOptions(quant=Quant.from_flags(dispatch_use_fp8, round_scale)))
                for i in range((num_times % 2) + 1):
                    if router.handle is not None:  # a repeated dispatch: close the previous one first
                        router.finalize(CombineForwardPayload(payload.expert_x.to(torch.bfloat16)),
                                        topk_weights, topk_idx, False, {"original_num_tokens": num_tokens})
                    payload = router.prepare(x, None, None, topk_weights, topk_idx)
                packed_recv_x = (payload.expert_x, payload.expert_x_scale.contiguous()) if dispatch_use_fp8 \
                    else payload.expert_x
                packed_recv_count, handle = payload.expert_tokens_meta.expert_num_tokens, router.handle
                simulated_gemm_x = per_token_cast_back(
                    packed_recv_x[0].view(-1, hidden), packed_recv_x[1].view(-1, hidden // 128)
                ).view(packed_recv_x[0].shape) if dispatch_use_fp8 else packed_recv_x.clone()
                all_topk_idx = torch.empty((num_ranks, num_tokens, num_topk), dtype=topk_idx.dtype, device=dev)
                dist.all_gather_into_tensor(all_topk_idx.view(-1, num_topk), topk_idx, group=group)
                for i in range(num_local_experts):
                    expert_id = rank * num_local_experts + i
                    recv_x = per_token_cast_back(packed_recv_x[0][i], packed_recv_x[1][i]) if dispatch_use_fp8 \
                        else packed_recv_x[i]
                    recv_count, recv_src_info, recv_layout_range = packed_recv_count[i], handle[0][i], handle[1][i]
                    int_mask = (2**32) - 1
                    num_valid_tokens = recv_count.item()
                    assert num_valid_tokens == (recv_layout_range & int_mask).sum().item()
                    assert num_valid_tokens == (all_topk_idx == expert_id).sum().item()
                    recv_x = recv_x[:num_valid_tokens]
                    recv_x_amin = recv_x[:, :-128].amin(dim=-1)
                    recv_src_info = recv_src_info[:num_valid_tokens]
                    assert torch.equal(recv_x_amin, recv_x[:, :-128].amax(dim=-1))
                    if round_scale:
                        assert calc_diff(recv_x[:, -1], recv_src_info.view(-1)) < 0.007
                    else:
                        assert (recv_x[:, -128:] - recv_src_info.view(-1, 1) % num_tokens).sum().item() == 0
                    for j in range(num_ranks):
                        begin_idx, count = (recv_layout_range[j] >> 32).item(), (recv_layout_range[j] & int_mask).item()
                        if not round_scale:
                            assert (recv_x_amin == j - rank_offset).sum().item() == \
                                (all_topk_idx[j] == expert_id).sum().item()
                        assert (recv_x[begin_idx: begin_idx + count][:-128] - j).sum().item() == 0

                combined_x = router.finalize(CombineForwardPayload(simulated_gemm_x), topk_weights, topk_idx, False,
                                             {"original_num_tokens": num_tokens})
                diff = calc_diff(x * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1), combined_x)
                assert torch.isnan(combined_x).sum().item() == 0
                if not diff < (7e-4 if round_scale else 1e-5):
                    print(f"assert Error: diff < (7e-4 if round_scale else 1e-5) {diff=}", flush=True)
        # The bench / bench_kineto part times V1 calls (performance only): no meaning on an ElasticBuffer.

    @staticmethod
    def _test_intranode_expert_alignment_main(rank: int, num_ranks: int, hidden_size: int, num_experts: int,
                                              num_topk: int, expert_alignment: int, buffer, group: dist.ProcessGroup,
                                              seed: int = 777, wrapper=None):
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)

        assert num_experts % num_ranks == 0
        num_local_experts = num_experts // num_ranks
        dev = "cuda" if _gpu() else "cpu"

        # Random data
        if rank == 0:
            num_tokens = 3
        else:
            num_tokens = 2
        x = torch.ones((num_tokens, hidden_size), dtype=torch.bfloat16, device=dev) * (rank + 1)
        x[:, 1] = torch.arange(1, num_tokens + 1, device=dev).to(torch.bfloat16)
        x_e4m3 = per_token_cast_to_fp8(x, False) if DeepEPBuffer.is_sm90_compiled() else None
        x_e4m3 = (x_e4m3[0], x_e4m3[1].T.contiguous().T) if x_e4m3 is not None else None
        if rank == 0:
            topk_idx = torch.tensor([[3, 1], [3, 1], [3, 1]], dtype=torch.int64, device=dev)
        else:
            topk_idx = torch.tensor([[0, 1], [3, 1]], dtype=torch.int64, device=dev)
        topk_weights = torch.ones((num_tokens, num_topk), dtype=torch.float32, device=dev) * (rank + 1)
        rank_idx = topk_idx // num_local_experts
        rank_idx.masked_fill_(topk_idx == -1, -1)
        inplace_unique(rank_idx, num_ranks)

        # Expert meta
        num_tokens_per_expert = torch.zeros((num_experts,), dtype=torch.int, device=dev)
        for i in range(num_experts):
            num_tokens_per_expert[i] = (topk_idx == i).sum()
        gbl_num_tokens_per_expert = num_tokens_per_expert.clone()
        dist.all_reduce(gbl_num_tokens_per_expert, group=group)
        aligned_gbl_num_tokens_per_expert = torch.tensor(
            [align(num, expert_alignment) for num in gbl_num_tokens_per_expert], device=dev)

        # Rank layout meta
        num_tokens_per_rank = torch.empty((num_ranks,), dtype=torch.int, device=dev)
        token_idx_in_rank = torch.full((num_ranks, num_tokens), -1, dtype=torch.long, device=dev)
        for i in range(num_ranks):
            num_tokens_per_rank[i] = (rank_idx == i).sum()
            token_sel = (rank_idx == i).max(dim=-1)[0]
            count = token_sel.sum().item()
            tokens = torch.sort(token_sel.to(torch.int), descending=True)[1]
            tokens[:count] = torch.sort(tokens[:count])[0]
            token_idx_in_rank[i][tokens[:count]] = torch.arange(count, dtype=torch.long, device=dev)
        token_idx_in_rank = token_idx_in_rank.T.contiguous().to(torch.int)
        is_token_in_rank = token_idx_in_rank >= 0
        gbl_num_tokens_per_rank = num_tokens_per_rank.clone()
        dist.all_reduce(gbl_num_tokens_per_rank, group=group)

        if wrapper is not None:
            # Elastic and ep: the V1 layout call is refused; the dispatches go through NormalRouter(expert_alignment=4),
            # FP8 (the router quantises x as per_token_cast_to_fp8 did) then bf16, with the same checks. The router
            # has no async_finish/Config; its handle is closed by a finalize the original does not have.
            _v1_call_is_refused(lambda: buffer.get_dispatch_layout(topk_idx, num_experts), "get_dispatch_layout")
            for quant in (Quant.FP8_BLOCK, Quant.NONE):
                router = NormalRouter(wrapper, RouterOptions(quant=quant, expert_alignment=expert_alignment))
                payload = router.prepare(x, None, None, topk_weights, topk_idx)
                recv_x = per_token_cast_back(payload.expert_x, payload.expert_x_scale) if quant.is_fp8 \
                    else payload.expert_x
                recv_topk_idx = payload.expert_topk_ids
                recv_num_tokens_per_expert_list = payload.expert_tokens_meta.expert_num_tokens_cpu
                _check_alignment_dispatch(rank, num_ranks, num_experts, num_local_experts, expert_alignment, recv_x,
                                          recv_topk_idx, recv_num_tokens_per_expert_list, gbl_num_tokens_per_rank,
                                          gbl_num_tokens_per_expert, aligned_gbl_num_tokens_per_expert)
                router.finalize(CombineForwardPayload(recv_x), payload.expert_topk_weights, payload.expert_topk_ids,
                                False, {"original_num_tokens": num_tokens})
            return

        # Test dispatch layout
        (ref_num_tokens_per_rank, _, ref_num_tokens_per_expert, ref_is_token_in_rank, _) = \
            buffer.get_dispatch_layout(topk_idx, num_experts)
        assert torch.allclose(ref_num_tokens_per_rank, num_tokens_per_rank)
        assert torch.allclose(ref_num_tokens_per_expert, num_tokens_per_expert)
        assert torch.allclose(ref_is_token_in_rank, is_token_in_rank)

        # Config
        nvl_buffer_size = 256
        config = DeepEPConfig(24, 8, nvl_buffer_size)

        # Test dispatch fp8, then bf16 (the original writes the two passes out; the checks are identical)
        for current_x in (x_e4m3, x):
            dispatch_args = {
                "x": current_x,
                "num_tokens_per_rank": ref_num_tokens_per_rank,
                "is_token_in_rank": ref_is_token_in_rank,
                "num_tokens_per_expert": ref_num_tokens_per_expert,
                "config": config,
                "async_finish": True,
                "topk_idx": topk_idx,
                "topk_weights": topk_weights,
                "expert_alignment": expert_alignment,
            }
            (recv_x, recv_topk_idx, recv_topk_weights, recv_num_tokens_per_expert_list, handle,
             event) = buffer.dispatch(**dispatch_args)
            event.current_stream_wait()
            recv_x = per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
            _check_alignment_dispatch(rank, num_ranks, num_experts, num_local_experts, expert_alignment, recv_x,
                                      recv_topk_idx, recv_num_tokens_per_expert_list, gbl_num_tokens_per_rank,
                                      gbl_num_tokens_per_expert, aligned_gbl_num_tokens_per_expert)

    @staticmethod
    def _test_low_latency_per_token_quant_main(num_tokens: int, hidden: int, num_experts: int, num_topk: int,
                                               rank: int, num_ranks: int, group: dist.ProcessGroup, buffer,
                                               use_logfmt: bool = False, seed: int = 0):
        """ACCL-EP only: every dispatch passes ``pertoken_quant=True`` (one FP8 scale per token), which upstream
        DeepEP's ``low_latency_dispatch`` does not have. Ported up to the first dispatch (same data), which must be
        refused clearly: a TypeError naming ``pertoken_quant`` on legacy, deepep-switch's guard on elastic and ep. The
        rest (the §3.2 checks with per-token scales; combine diffs only printed) cannot run on upstream DeepEP."""
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)
        assert num_experts % num_ranks == 0
        num_local_experts = num_experts // num_ranks
        rank_offset = 128
        assert num_ranks - rank_offset < 257, "Too many ranks (exceeding test precision limit)"
        quant_size = hidden
        dev = "cuda" if _gpu() else "cpu"
        x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16, device=dev) * (rank - rank_offset)
        x[:, -quant_size:] = torch.arange(num_tokens, device=dev).to(torch.bfloat16).view(-1, 1)
        scores = torch.randn((num_tokens, num_experts), dtype=torch.float32, device=dev).abs() + 1
        topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=True)[1]
        for i in range(10):
            topk_idx[random.randint(0, num_tokens - 1), random.randint(0, num_topk - 1)] = -1
        cumulative_local_expert_recv_stats = torch.zeros((num_local_experts,), dtype=torch.int, device=dev)
        def dispatch():
            return buffer.low_latency_dispatch(x, topk_idx, num_tokens, num_experts, use_fp8=True, round_scale=False,
                                               use_ue8m0=False,
                                               cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
                                               async_finish=True, return_recv_hook=False, pertoken_quant=True)

        if _elastic():
            _v1_call_is_refused(dispatch, "low_latency_dispatch")
        else:
            with pytest.raises(TypeError, match="pertoken_quant"):
                dispatch()

    @staticmethod
    def _create_deepep_config(rank: int, num_ranks: int, args: Dict[str, Any], use_deepep_low_latency: bool = False,
                              enable_ffn_disaggregate: bool = False,
                              deep_ep_num_sm: int = 24) -> Tuple[Any, int, Any, Any]:
        """Helper function to create NcclCommConfig, EngineConfig and ModelConfig for DeepEP tests."""
        model_config = ModelConfig()
        model_config.attn_config.head_num = 2
        model_config.attn_config.size_per_head = 128
        model_config.num_layers = 2
        model_config.max_seq_len = 2048
        model_config.vocab_size = 500000
        if args:
            model_config.moe_k = args.get("moe_k", 2)
            model_config.expert_num = args.get("expert_num", 4)
            model_config.hidden_size = args.get("hidden_size", 128)

        master_port = int(os.getenv("MASTER_PORT", "8376"))
        base_port = master_port + 11
        nccl_comm_config = NcclCommConfig(
            nccl_ip="127.0.0.1",
            tp_nccl_port=base_port - 2,
            dp_tp_nccl_port=base_port - 10,
            ffn_tp_nccl_port=base_port - 5,
        )

        parallelism_config = ParallelismConfig()
        parallelism_config.dp_rank = rank
        parallelism_config.dp_size = num_ranks
        parallelism_config.tp_rank = 0
        parallelism_config.tp_size = 1
        parallelism_config.ep_size = num_ranks
        parallelism_config.ep_rank = rank
        parallelism_config.world_size = num_ranks
        parallelism_config.local_rank = rank
        parallelism_config.world_rank = rank
        parallelism_config.local_world_size = num_ranks

        moe_config = MoeConfig()
        moe_config.use_deepep_low_latency = use_deepep_low_latency
        moe_config.use_deepep_internode = False
        moe_config.deep_ep_num_sm = deep_ep_num_sm

        max_generate_batch_size = 32
        if args:
            max_generate_batch_size = args.get("max_generate_batch_size", 32)

        ffn_disaggregate_config = FfnDisAggregateConfig()
        ffn_disaggregate_config.enable_ffn_disaggregate = enable_ffn_disaggregate
        if enable_ffn_disaggregate and args:
            ffn_disaggregate_config.attention_dp_size = num_ranks // 2
            ffn_disaggregate_config.attention_tp_size = 1
            ffn_disaggregate_config.ffn_dp_size = num_ranks // 2
            ffn_disaggregate_config.ffn_tp_size = 1

        # Set ffn_disaggregate_config to parallelism_config
        parallelism_config.ffn_disaggregate_config = ffn_disaggregate_config

        moe_config.ll_num_max_token = max_generate_batch_size

        # Build engine_config and model_config for init_deepep_wrapper
        py_env = PyEnvConfigs()
        py_env.parallelism_config = parallelism_config
        py_env.moe_config = moe_config
        py_env.runtime_config.max_generate_batch_size = max_generate_batch_size
        py_env.concurrency_config.concurrency_limit = max_generate_batch_size
        engine_config = _engine_config(py_env, nccl_comm_config)
        return nccl_comm_config, master_port, engine_config, model_config

    @staticmethod
    def _run_deepep_intranode_test(rank: int, num_ranks: int, args: Dict[str, Any]):
        # set env: rtp-llm sets CUDA_VISIBLE_DEVICES here; launch.spawn has already pinned the rank to its GPU
        # init params
        nccl_comm_config, nccl_init_port, engine_config, model_config = DeepEPTest._create_deepep_config(
            rank, num_ranks, args, use_deepep_low_latency=False, enable_ffn_disaggregate=False)
        # init distributed environment
        parallelism_config = engine_config.parallelism_config
        set_device(parallelism_config.local_rank)
        init_distributed_environment(parallelism_config=parallelism_config, nccl_comm_config=nccl_comm_config,
                                     nccl_init_port=nccl_init_port, backend="nccl", timeout=60)
        init_deepep_wrapper(engine_config, model_config)
        config_adapter = MoEConfigAdapter(model_config=model_config,
                                          parallelism_config=engine_config.parallelism_config,
                                          moe_config=engine_config.moe_config)
        deepep_config = DeepepWrapperConfig.from_config_adapter(config_adapter, ll_num_max_token_per_rank=0)
        deepep_wrapper = DeepEPWrapper.get_instance(deepep_config)
        assert_backend(deepep_wrapper)  # (deepep-switch)
        buffer = deepep_wrapper.buffer
        # run test
        if _elastic():
            DeepEPTest._test_intranode_router_main(
                args["max_seq_len"], deepep_wrapper.hidden_size, deepep_wrapper.num_experts, deepep_wrapper.num_topk,
                deepep_wrapper.num_sms, deepep_wrapper.ep_rank, deepep_wrapper.ep_size, deepep_wrapper.ep_rank,
                deepep_wrapper, dist.group.WORLD)
        else:
            DeepEPTest._test_intranode_main(
                args["max_seq_len"], deepep_wrapper.hidden_size, deepep_wrapper.num_experts, deepep_wrapper.num_topk,
                deepep_wrapper.num_sms, deepep_wrapper.ep_rank, deepep_wrapper.ep_size, deepep_wrapper.ep_rank,
                buffer, dist.group.WORLD)
        DeepEPWrapper.reset()
        destroy_distributed_environment()

    @staticmethod
    def _run_deepep_low_latency_test(rank: int, num_ranks: int, args: Dict[str, Any]):
        # set env (rtp-llm also sets CUDA_VISIBLE_DEVICES; launch.spawn has pinned the rank already)
        _set_accl_env()
        nccl_comm_config, nccl_init_port, engine_config, model_config = DeepEPTest._create_deepep_config(
            rank, num_ranks, args, use_deepep_low_latency=True, enable_ffn_disaggregate=False)

        # init distributed environment
        parallelism_config = engine_config.parallelism_config
        tp_size = parallelism_config.tp_size
        set_device(parallelism_config.local_rank)
        init_distributed_environment(parallelism_config=parallelism_config, nccl_comm_config=nccl_comm_config,
                                     nccl_init_port=nccl_init_port, backend="nccl", timeout=60)
        init_deepep_wrapper(engine_config, model_config)
        config_adapter = MoEConfigAdapter(model_config=model_config,
                                          parallelism_config=engine_config.parallelism_config,
                                          moe_config=engine_config.moe_config)
        ll_num_max_token_per_rank = DeepepWrapperConfig.calc_low_latency_max_token_per_rank(
            engine_config.moe_config.ll_num_max_token, engine_config.parallelism_config.tp_size,
            model_config.quant_config)
        deepep_config = DeepepWrapperConfig.from_config_adapter(config_adapter, ll_num_max_token_per_rank)
        deepep_wrapper = DeepEPWrapper.get_instance(deepep_config)
        assert_backend(deepep_wrapper)  # (deepep-switch)
        buffer = deepep_wrapper.buffer
        # run test
        main = DeepEPTest._test_low_latency_router_main if _elastic() else DeepEPTest._test_low_latency_main
        main((args["max_generate_batch_size"] + tp_size - 1) // tp_size, deepep_wrapper.hidden_size,
             deepep_wrapper.num_experts, deepep_wrapper.num_topk, deepep_wrapper.ep_rank, deepep_wrapper.ep_size,
             dist.group.WORLD, deepep_wrapper if _elastic() else buffer, seed=1)
        DeepEPWrapper.reset()
        destroy_distributed_environment()

    @staticmethod
    def _run_deepep_low_latency_m2n_test(rank: int, num_ranks: int, args: Dict[str, Any]):
        """M2N (FFN disaggregation) is ACCL-EP only. The original returns before spawning unless
        ``DeepEPBuffer`` has ``get_low_latency_rdma_size_hint_m2n``, which upstream DeepEP never has, and its body
        is broken as written at 4b8d39cd (L1943 unpacks ``_create_deepep_config``'s 4-tuple into 3 names; L1972
        calls ``get_instance(config, group=...)``, removed in 9753e872). Ported: that early-return condition, and
        what an upstream-DeepEP replica gets for the M2N configuration instead: a clear refusal on every rank,
        before any communication, leaving no wrapper behind."""
        assert not hasattr(DeepEPBuffer, "get_low_latency_rdma_size_hint_m2n")
        _set_accl_env()
        nccl_comm_config, nccl_init_port, engine_config, model_config = DeepEPTest._create_deepep_config(
            rank, num_ranks, args, use_deepep_low_latency=True, enable_ffn_disaggregate=True)
        set_device(engine_config.parallelism_config.local_rank)
        init_distributed_environment(parallelism_config=engine_config.parallelism_config,
                                     nccl_comm_config=nccl_comm_config, nccl_init_port=nccl_init_port,
                                     backend="nccl", timeout=60)
        with pytest.raises(ValueError, match="FFN disaggregation"):
            init_deepep_wrapper(engine_config, model_config)
        assert not DeepEPWrapper.is_initialized()
        destroy_distributed_environment()

    @staticmethod
    def _run_deepep_normal_expert_alignment_test(rank: int, num_ranks: int):
        # set env (rtp-llm also sets CUDA_VISIBLE_DEVICES; launch.spawn has pinned the rank already)
        # init params
        args = {"moe_k": 2, "expert_num": 4, "hidden_size": ALIGNMENT_HIDDEN["v2" if _elastic() else "legacy"]}
        nccl_comm_config, nccl_init_port, engine_config, model_config = DeepEPTest._create_deepep_config(
            rank, num_ranks, args, use_deepep_low_latency=False, enable_ffn_disaggregate=False)
        # init distributed environment
        parallelism_config = engine_config.parallelism_config
        set_device(parallelism_config.local_rank)
        init_distributed_environment(parallelism_config=parallelism_config, nccl_comm_config=nccl_comm_config,
                                     nccl_init_port=nccl_init_port, backend="nccl", timeout=60)
        init_deepep_wrapper(engine_config, model_config)
        config_adapter = MoEConfigAdapter(model_config=model_config,
                                          parallelism_config=engine_config.parallelism_config,
                                          moe_config=engine_config.moe_config)
        deepep_config = DeepepWrapperConfig.from_config_adapter(config_adapter, ll_num_max_token_per_rank=0)
        deepep_wrapper = DeepEPWrapper.get_instance(deepep_config)
        assert_backend(deepep_wrapper)  # (deepep-switch)
        buffer = deepep_wrapper.buffer
        # run test
        DeepEPTest._test_intranode_expert_alignment_main(
            deepep_wrapper.ep_rank, deepep_wrapper.ep_size, deepep_wrapper.hidden_size, deepep_wrapper.num_experts,
            deepep_wrapper.num_topk, expert_alignment=4, buffer=buffer, group=dist.group.WORLD, seed=777,
            wrapper=deepep_wrapper if _elastic() else None)
        DeepEPWrapper.reset()
        destroy_distributed_environment()

    @staticmethod
    def _run_deepep_low_latency_per_token_quant_test(rank: int, num_ranks: int, args: Dict[str, Any]):
        # set env
        _set_accl_env()
        # init params
        nccl_comm_config, nccl_init_port, engine_config, model_config = DeepEPTest._create_deepep_config(
            rank, num_ranks, args, use_deepep_low_latency=True, enable_ffn_disaggregate=False)
        # init distributed environment
        parallelism_config = engine_config.parallelism_config
        tp_size = parallelism_config.tp_size
        set_device(parallelism_config.local_rank)
        init_distributed_environment(parallelism_config=parallelism_config, nccl_comm_config=nccl_comm_config,
                                     nccl_init_port=nccl_init_port, backend="nccl", timeout=60)
        init_deepep_wrapper(engine_config, model_config)
        config_adapter = MoEConfigAdapter(model_config=model_config,
                                          parallelism_config=engine_config.parallelism_config,
                                          moe_config=engine_config.moe_config)
        ll_num_max_token_per_rank = DeepepWrapperConfig.calc_low_latency_max_token_per_rank(
            engine_config.moe_config.ll_num_max_token, engine_config.parallelism_config.tp_size,
            model_config.quant_config)
        deepep_config = DeepepWrapperConfig.from_config_adapter(config_adapter, ll_num_max_token_per_rank)
        deepep_wrapper = DeepEPWrapper.get_instance(deepep_config)
        assert_backend(deepep_wrapper)  # (deepep-switch)
        buffer = deepep_wrapper.buffer
        # run test
        DeepEPTest._test_low_latency_per_token_quant_main(
            (args["max_generate_batch_size"] + tp_size - 1) // tp_size, deepep_wrapper.hidden_size,
            deepep_wrapper.num_experts, deepep_wrapper.num_topk, deepep_wrapper.ep_rank, deepep_wrapper.ep_size,
            dist.group.WORLD, buffer, use_logfmt=False, seed=1)
        # (port) rtp-llm's per-token FP8 strategy builds this router with per_act_token_quant=True; deepep-switch
        # refuses that quant config clearly on every backend (per-token FP8 dispatch needs ACCL-EP).
        with pytest.raises(ValueError, match="per-token"):
            DeepEpLowLatencyRouter(config_adapter, FusedMoEQuantConfig(quant_dtype=torch.float8_e4m3fn,
                                                                       per_act_token_quant=True))
        DeepEPWrapper.reset()
        destroy_distributed_environment()

    @staticmethod
    def _init_sp_deepep_wrapper(rank: int, num_ranks: int):
        """rtp-llm sets WORLD_SIZE=DP_SIZE=EP_SIZE=2, SP_TYPE=eagle, GEN_NUM_PER_CIRCLE=4, ROLE_TYPE=DECODE,
        USE_DEEPEP_MOE=1, USE_DEEPEP_INTERNODE=0, USE_DEEPEP_LOW_LATENCY=1 and lets its argument parser
        (``setup_args``), ``setup_and_configure_server`` and ``EngineConfig.create`` build the configs; those are
        not in the stand-in, so their effect on the DeepEP configs is written out below (research notes §3.6)."""
        from rtp_llm.ops import SpeculativeType

        py_env_configs = PyEnvConfigs()
        parallelism_config = py_env_configs.parallelism_config  # WORLD_SIZE = DP_SIZE = EP_SIZE = 2
        parallelism_config.world_size = parallelism_config.dp_size = parallelism_config.ep_size = num_ranks
        parallelism_config.local_world_size = num_ranks
        parallelism_config.ep_rank = parallelism_config.dp_rank = rank
        py_env_configs.sp_config.type = SpeculativeType.EAGLE  # SP_TYPE=eagle
        py_env_configs.sp_config.gen_num_per_cycle = 4  # GEN_NUM_PER_CIRCLE=4
        moe_config = py_env_configs.moe_config  # USE_DEEPEP_MOE=1, USE_DEEPEP_INTERNODE=0, USE_DEEPEP_LOW_LATENCY=1
        moe_config.use_deepep_moe = True
        moe_config.use_deepep_internode = False
        moe_config.use_deepep_low_latency = True
        model_config = ModelConfig()
        model_config.attn_config.head_num = 2
        model_config.attn_config.size_per_head = 128
        model_config.num_layers = 2
        model_config.max_seq_len = 2048
        model_config.vocab_size = 500000
        model_config.moe_k = 8
        model_config.expert_num = 32
        model_config.hidden_size = 7168

        # setup_and_configure_server (server_config_setup.py:567-577): ll_num_max_token = concurrency_limit
        # (default 32) x (gen_num_per_cycle + 1) under speculation, handed to auto_configure_deepep
        ll_num_max_token = py_env_configs.concurrency_config.concurrency_limit
        if py_env_configs.sp_config.type != SpeculativeType.NONE:
            ll_num_max_token *= py_env_configs.sp_config.gen_num_per_cycle + 1
        moe_config.ll_num_max_token = ll_num_max_token
        # EngineConfig.create (engine_config.py:245): max_generate_batch_size = concurrency_limit
        py_env_configs.runtime_config.max_generate_batch_size = py_env_configs.concurrency_config.concurrency_limit

        master_port = int(os.getenv("MASTER_PORT", "8376"))
        base_port = master_port + 11
        nccl_comm_config = NcclCommConfig(
            nccl_ip="127.0.0.1",
            tp_nccl_port=base_port - 2,
            dp_tp_nccl_port=base_port - 10,
            ffn_tp_nccl_port=base_port - 5,
        )
        engine_config = _engine_config(py_env_configs, nccl_comm_config)
        engine_config.parallelism_config.local_rank = rank
        engine_config.parallelism_config.world_rank = rank
        assert engine_config.moe_config.ll_num_max_token == 32 * (4 + 1)
        _set_accl_env()

        nccl_init_port = base_port - 11
        parallelism_config = engine_config.parallelism_config
        set_device(parallelism_config.local_rank)
        init_distributed_environment(parallelism_config=parallelism_config, nccl_comm_config=nccl_comm_config,
                                     nccl_init_port=nccl_init_port, backend="nccl", timeout=60)
        init_deepep_wrapper(engine_config, model_config)
        config_adapter = MoEConfigAdapter(model_config=model_config,
                                          parallelism_config=engine_config.parallelism_config,
                                          moe_config=engine_config.moe_config)
        ll_num_max_token_per_rank = DeepepWrapperConfig.calc_low_latency_max_token_per_rank(
            engine_config.moe_config.ll_num_max_token, engine_config.parallelism_config.tp_size,
            model_config.quant_config)
        deepep_config = DeepepWrapperConfig.from_config_adapter(config_adapter, ll_num_max_token_per_rank)
        # just need test get instance
        deepep_wrapper = DeepEPWrapper.get_instance(deepep_config)
        # (port) the arithmetic behind the match: 160 tokens -> 256 per rank, the capacity the buffer was built for
        assert ll_num_max_token_per_rank == 256 and deepep_wrapper.ll_num_max_token_per_rank == 256
        assert_backend(deepep_wrapper)  # (deepep-switch)
        # (port) rtp-llm's test process ends here without reset(); these ranks go on, so the buffer is released
        # while the process group is still up (a collective on real DeepEP)
        DeepEPWrapper.reset()
        destroy_distributed_environment()


def _engine_config(py_env, nccl_comm_config):
    """The original's ``EngineConfig(...)`` call from ``py_env``'s members (written out in three places there)."""
    return EngineConfig(
        parallelism_config=py_env.parallelism_config,
        runtime_config=py_env.runtime_config,
        nccl_comm_config=nccl_comm_config,
        server_config=py_env.server_config,
        pd_sep_config=py_env.pd_separation_config,
        concurrency_config=py_env.concurrency_config,
        fmha_config=py_env.fmha_config,
        kv_cache_config=py_env.kv_cache_config,
        profiling_debug_logging_config=py_env.profiling_debug_logging_config,
        hw_kernel_config=py_env.py_hw_kernel_config,
        device_resource_config=py_env.device_resource_config,
        moe_config=py_env.moe_config,
        model_specific_config=py_env.model_specific_config,
        sp_config=py_env.sp_config,
        cache_store_config=py_env.cache_store_config,
        misc_config=py_env.misc_config.misc_config,
        arpc_config=py_env.arpc_config,
        grpc_config=py_env.grpc_config,
        dash_sc_grpc_config=py_env.dash_sc_grpc_config,
        grammar_config=py_env.grammar_config,
        load_config=py_env.load_config,
    )


def _set_accl_env() -> None:
    """ACCL-EP tuning variables the original sets (upstream DeepEP ignores them)."""
    os.environ["ACCL_DISPATCH_NUM_WARP_GROUPS"] = "4"
    os.environ["ACCL_COMBINE_NUM_WARP_GROUPS"] = "4"
    os.environ["ACCL_LOW_LATENCY_OPTIMIZE"] = "1"
    os.environ["ACCL_TOPO_FIX"] = "1"
    os.environ["ACCL_LOAD_BALANCE"] = "1"


def _check_alignment_dispatch(rank, num_ranks, num_experts, num_local_experts, expert_alignment, recv_x, recv_topk_idx,
                              recv_num_tokens_per_expert_list, gbl_num_tokens_per_rank, gbl_num_tokens_per_expert,
                              aligned_gbl_num_tokens_per_expert):
    """The original's checks after each expert-alignment dispatch (its prints of the tensors are dropped)."""
    assert gbl_num_tokens_per_rank[rank].item() == recv_x.size(0), \
        f"{gbl_num_tokens_per_rank[rank].item()} != {recv_x.size(0)}"
    num_tokens_per_expert = [recv_topk_idx.eq(local_expert_idx).sum().item()
                             for local_expert_idx in range(num_local_experts)]
    assert num_tokens_per_expert == gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist(), \
        f"{num_tokens_per_expert} != {gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist()}"
    assert recv_num_tokens_per_expert_list == aligned_gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist(), \
        f"{recv_num_tokens_per_expert_list} != {aligned_gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist()}"
    # Check `topk_idx`
    assert (recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (recv_topk_idx < (num_experts // num_ranks)))
            ).sum().item() == recv_topk_idx.numel()
    for i, count in enumerate(recv_num_tokens_per_expert_list):
        assert align(recv_topk_idx.eq(i).sum().item(), expert_alignment) == count, \
            f"{align(recv_topk_idx.eq(i).sum().item(), expert_alignment)} != {count}"


# ---------------------------------------------------------------------------------------------- the tests
# CPU only, with the reason: rtp-llm's sizes on 2 CPU cores would take many minutes.
#  * normal: 128 tokens per rank instead of 1024 (24 dispatch cases x up to 4 exchanges of every token's 7168
#    channels); hidden stays 7168, which is where the legacy buffer-size difference below shows.
#  * low latency: hidden 1024 instead of 7168 (each of the 11 dispatches receives [32 experts, 256 slots, hidden]
#    and dequantises all of it); the checks read the first and last 128 channels, at any hidden size.
#  * the receive-hook GEMM of the untimed performance calls: 64 instead of 8192 (an 8192^3 GEMM on a CPU).
CPU_ARGS = dict(max_seq_len=128, ll_hidden_size=1024, overlap_gemm_size=64)

NUM_SMS_ENV = {"RTP_LLM_DEEPEP_NUM_SMS": "24"}

# test_deepep_normal_expert_alignment's hidden size. The original uses 128 with V1 dispatch (legacy keeps it). Real
# ElasticBuffer's and EPBuffer's combine kernels static-assert hidden % 256 == 0 (deepep-switch's elastic and ep
# routers refuse other sizes on real DeepEP: deepep_switch/backends/elastic.py check_hidden), so on those
# generations the test runs at 256, the smallest size they compile, on CPU as on GPU. Nothing it checks depends on
# the hidden size: x is (rank + 1) everywhere but channel 1 (the token index), the routing, counts and alignment
# are hidden-free, and per_token_cast_to_fp8 quantises 256 channels as two 128-channel blocks.
ALIGNMENT_HIDDEN = {"legacy": 128, "v2": 256}


def _args(sizes: dict) -> tuple[dict, dict]:
    """The original test methods' ``args`` for the normal and low-latency tests, from the class's size lists."""
    normal = {"max_seq_len": sizes.get("max_seq_len", DeepEPTest.MAX_SEQ_LEN[0]),
              "hidden_size": DeepEPTest.HIDDEN_SIZES[0], "expert_num": DeepEPTest.NUM_EXPERT[0],
              "moe_k": DeepEPTest.TOP_K[0]}
    low_latency = {"max_generate_batch_size": DeepEPTest.MAX_GENERATE_BATCH_SIZES[0],
                   "hidden_size": sizes.get("ll_hidden_size", DeepEPTest.HIDDEN_SIZES[0]),
                   "expert_num": DeepEPTest.NUM_EXPERT[0], "moe_k": DeepEPTest.TOP_K[0]}
    return normal, low_latency


def _rank_main(rank: int, num_ranks: int, sizes: dict, ports: list[int]) -> dict:
    """One rank: every test's body in the original's order, each with its own MASTER_PORT (as the original's
    ``PortsContext`` per test); returns ``{test: None or traceback}``."""
    from deepep_switch.settings import reload_settings

    install_and_import(globals(), IMPORTS + SWITCH_IMPORTS)
    DeepEPTest.OVERLAP_GEMM_SIZE = sizes.get("overlap_gemm_size", DeepEPTest.OVERLAP_GEMM_SIZE)
    normal_args, ll_args = _args(sizes)
    port = iter(ports)

    def with_port(body):
        def run():
            os.environ["MASTER_PORT"] = str(next(port))
            body()
        return run

    def with_num_sms_knob():
        os.environ.update(NUM_SMS_ENV)
        reload_settings()
        try:
            DeepEPTest._run_deepep_intranode_test(rank, num_ranks, normal_args)
        finally:
            for key in NUM_SMS_ENV:
                del os.environ[key]
            reload_settings()

    subtests = [
        ("normal", lambda: DeepEPTest._run_deepep_intranode_test(rank, num_ranks, normal_args)),
        ("low_latency", lambda: DeepEPTest._run_deepep_low_latency_test(rank, num_ranks, ll_args)),
        ("low_latency_m2n", lambda: DeepEPTest._run_deepep_low_latency_m2n_test(rank, num_ranks, ll_args)),
        ("normal_expert_alignment", lambda: DeepEPTest._run_deepep_normal_expert_alignment_test(rank, num_ranks)),
        ("low_latency_per_token_quant",
         lambda: DeepEPTest._run_deepep_low_latency_per_token_quant_test(rank, num_ranks, ll_args)),
        ("normal_num_sms_knob", with_num_sms_knob),
        ("init_sp_deepep_wrapper", lambda: DeepEPTest._init_sp_deepep_wrapper(rank, num_ranks)),
    ]
    if _elastic():
        subtests = [s for s in subtests if s[0] != "normal_num_sms_knob"]
    return run_subtests([(name, with_port(body)) for name, body in subtests])


@pytest.fixture(scope="module")
def ranks():
    """One spawn per (machine, backend), on first use; its per-test results are kept for the module."""
    done: dict[tuple[str, str], list[dict]] = {}

    def get(where: str, backend: str) -> list[dict]:
        if (where, backend) not in done:
            sizes = CPU_ARGS if where == CPU else {}
            # On a real ElasticBuffer or EPBuffer, handle[1] (read by the low-latency test) needs rows grouped by
            # source rank inside each expert: deterministic mode (the reference groups them either way).
            env = {"RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC": "1"} if where == GPU and is_v2(backend) else {}
            done[(where, backend)] = spawn_ranks(_rank_main, where, backend, args=(sizes, free_ports(8)),
                                                 timeout_s=560, extra_env=env)
        return done[(where, backend)]

    return get


# rtp-llm sizes the legacy normal buffer with int(2e9) NVL bytes, so any Config fits. deepep-switch sizes it from
# DeepEP's hints for the larger of Buffer.num_sms (20 unless RTP_LLM_DEEPEP_NUM_SMS is set) and rtp-llm's
# deep_ep_num_sm (24 here; deepep_switch/backends/legacy.py sizing_sms): this test dispatches with
# DeepEPConfig(24, 8, 256), 12 channels x 2 ranks x 256 ring rows of 7168 bf16 channels, whose first dispatch (no
# top-k) needs 88,105,360 NVL bytes; sized for 20 SMs (83,927,552 bytes) DeepEP's EP_HOST_ASSERT
# (csrc/legacy/buffer.hpp) would refuse it, as the reference does.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("where,backend", variants())
def test_deepep_normal(ranks, where, backend):
    check_subtest(ranks(where, backend), "normal")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where,backend", variants(backends=("legacy",)))
def test_deepep_normal_with_the_num_sms_knob(ranks, where, backend):
    """``test_deepep_normal`` on legacy with ``RTP_LLM_DEEPEP_NUM_SMS=24``, deepep-switch's setting for the SM
    count of the kernels themselves (rtp-llm's ``deep_ep_num_sm`` only sizes the buffer): every check runs."""
    check_subtest(ranks(where, backend), "normal_num_sms_knob")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where,backend", variants())
def test_deepep_low_latency(ranks, where, backend):
    check_subtest(ranks(where, backend), "low_latency")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where,backend", variants())
def test_deepep_low_latency_m2n(ranks, where, backend):
    check_subtest(ranks(where, backend), "low_latency_m2n")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where,backend", variants())
def test_deepep_normal_expert_alignment(ranks, where, backend):
    """On elastic and ep at hidden 256 (``ALIGNMENT_HIDDEN``), on CPU and GPU alike: the same data, routing and
    checks; the aligned counts do not depend on the hidden size."""
    check_subtest(ranks(where, backend), "normal_expert_alignment")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where,backend", variants())
def test_deepep_low_latency_per_token_quant(ranks, where, backend):
    check_subtest(ranks(where, backend), "low_latency_per_token_quant")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where,backend", variants())
def test_init_sp_deepep_wrapper(ranks, where, backend):
    check_subtest(ranks(where, backend), "init_sp_deepep_wrapper")
