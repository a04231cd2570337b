"""Port of rtp-llm's
``rtp_llm/models_py/modules/factory/fused_moe/impl/cuda/routers/test/deepep_low_latency_router_test.py``
at alibaba/rtp-llm @ 4b8d39cd5cbe4eff0cf0661411e15be21ccc58b9, against the rtp-llm stand-in and deepep-switch.

What it checks (unchanged), for FP8 and bf16 dispatch and attention TP 1 and 2 on 2 ranks: rtp-llm's
``DeepEpLowLatencyRouter(config, quant_config)`` (64 tokens per DP rank, top-8 of 128 experts) receives, per local
expert, exactly the reference rows once they are put back in (source rank, token) order with ``router.handle[0]``
(src_info) and ``router.handle[1]`` (layout_range); ``expert_num_tokens`` equals the reference counts (int32);
and finalize's weighted combine (8 x 1/8) gives back the tokens. Here the router is deepep-switch's, bound under
rtp-llm's name by ``routers.rtp_llm.install()``, and ``router.handle`` is indexable on every generation. On a real
``ElasticBuffer`` or ``EPBuffer`` ``handle[1]`` needs rows grouped by source rank inside each expert, which DeepEP
V2 guarantees only when built deterministic: the GPU elastic and ep variants set
``RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC=1`` (the reference provider groups them either way, so the CPU variants run
V2's default, shuffled order).

Replaced infrastructure only: ``mp.spawn`` (one per configuration) + ``PortManager`` -> one
``deepep_switch.launch.spawn`` per backend whose ranks run the 4 configurations in the original order, each
initialising and destroying its own distributed environment (a fresh port each); ``.cuda()`` -> the rank's device;
``rtp_llm.*`` -> the stand-in. The ``ACCL_*`` variables the original sets are kept (upstream DeepEP ignores them).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from _ported import (GPU, assert_backend, device, free_ports, install_and_import, is_v2, set_device, spawn_ranks,
                     variants)

IMPORTS = [
    ("rtp_llm.config.engine_config", ["EngineConfig"]),
    ("rtp_llm.config.model_config", ["ModelConfig"]),
    ("rtp_llm.config.py_config_modules", ["PyEnvConfigs"]),
    ("rtp_llm.models_py.distributed.collective_torch",
     ["destroy_distributed_environment", "init_distributed_environment"]),
    ("rtp_llm.models_py.distributed.deepep_wrapper", ["DeepEPWrapper", "init_deepep_wrapper"]),
    ("rtp_llm.models_py.modules.factory.fused_moe.defs.config_adapter", ["MoEConfigAdapter"]),
    ("rtp_llm.models_py.modules.factory.fused_moe.defs.fused_moe", ["CombineForwardPayload"]),
    ("rtp_llm.models_py.modules.factory.fused_moe.defs.quant_config", ["FusedMoEQuantConfig"]),
    ("rtp_llm.models_py.modules.factory.fused_moe.impl.cuda.routers.deepep_low_latency_router",
     ["DeepEpLowLatencyRouter"]),
    ("rtp_llm.ops", ["MoeConfig", "NcclCommConfig", "ParallelismConfig", "RuntimeConfig"]),
    ("rtp_llm.test.utils.numeric_util", ["per_token_cast_back"]),
]

# Bound in each rank by install_and_import(), after routers.rtp_llm.install(); None in the pytest process.
EngineConfig = ModelConfig = PyEnvConfigs = destroy_distributed_environment = init_distributed_environment = \
    DeepEPWrapper = init_deepep_wrapper = MoEConfigAdapter = CombineForwardPayload = FusedMoEQuantConfig = \
    DeepEpLowLatencyRouter = MoeConfig = NcclCommConfig = ParallelismConfig = RuntimeConfig = per_token_cast_back \
    = None

NUM_TOKEN_PER_RANK = 64
HIDDEN_SIZE = 7168
TOPK = 8
NUM_EXPERTS = 128
# CPU only: hidden 1024 instead of 7168. Each dispatch receives [64 local experts, 128 slots, hidden] per rank and
# the FP8 runs dequantise all of it; at 7168 the 4 configurations x 2 backends take minutes on 2 CPU cores. The
# checks only read the first 128 channels, which are the same at any hidden size.
CPU_HIDDEN_SIZE = 1024


def _init_router(rank: int, use_fp8: bool, parallelism_config, nccl_port: int):
    # set env (rtp-llm also sets CUDA_VISIBLE_DEVICES to the world's GPUs; launch.spawn has pinned the rank already)
    os.environ["ACCL_DISPATCH_NUM_WARP_GROUPS"] = "4"
    os.environ["ACCL_COMBINE_NUM_WARP_GROUPS"] = "4"
    os.environ["ACCL_LOW_LATENCY_OPTIMIZE"] = "1"
    os.environ["ACCL_TOPO_FIX"] = "1"
    os.environ["ACCL_LOAD_BALANCE"] = "1"
    # init params
    model_config = ModelConfig()
    model_config.attn_config.head_num = 2
    model_config.attn_config.size_per_head = 128
    model_config.num_layers = 2
    model_config.max_seq_len = 2048
    model_config.vocab_size = 500000
    model_config.moe_k = TOPK
    model_config.expert_num = NUM_EXPERTS
    model_config.hidden_size = HIDDEN_SIZE

    base_port = nccl_port + 11
    nccl_comm_config = NcclCommConfig(
        nccl_ip="127.0.0.1",
        tp_nccl_port=base_port - 2,
        dp_tp_nccl_port=base_port - 10,
        ffn_tp_nccl_port=base_port - 5,
    )

    moe_config = MoeConfig()
    moe_config.use_deepep_low_latency = True
    moe_config.use_deepep_internode = False

    runtime_config = RuntimeConfig()
    runtime_config.max_generate_batch_size = NUM_TOKEN_PER_RANK
    moe_config.ll_num_max_token = NUM_TOKEN_PER_RANK
    config = MoEConfigAdapter(
        model_config=model_config,
        parallelism_config=parallelism_config,
        moe_config=moe_config,
    )

    set_device(parallelism_config.local_rank)
    init_distributed_environment(
        parallelism_config=parallelism_config,
        nccl_comm_config=nccl_comm_config,
        nccl_init_port=base_port - 11,
        backend="nccl",
        timeout=60,
    )

    py_env = PyEnvConfigs()
    py_env.parallelism_config = parallelism_config
    py_env.moe_config = moe_config
    py_env.runtime_config = runtime_config
    py_env.concurrency_config.concurrency_limit = NUM_TOKEN_PER_RANK
    engine_config = EngineConfig(
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
    init_deepep_wrapper(engine_config, model_config)

    router = DeepEpLowLatencyRouter(
        config,
        FusedMoEQuantConfig(
            quant_dtype=torch.float8_e4m3fn if use_fp8 else None,
            per_act_token_quant=False,
            per_out_ch_quant=False,
            block_shape=[128, 128] if use_fp8 else None,
        ),
    )
    assert_backend(router.wrapper)  # (deepep-switch) the requested RTP_LLM_DEEPEP_BACKEND is the one running

    return config, router


def _destroy_router(router):
    del router
    DeepEPWrapper.reset()
    destroy_distributed_environment()


def _run_deepep_low_latency_router_test(rank: int, use_fp8: bool, parallelism_config, nccl_port: int):
    config, router = _init_router(rank, use_fp8, parallelism_config, nccl_port)
    # construct data
    torch.manual_seed(42)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(42)
    ep_size = config.ep_size
    ep_rank = config.ep_rank
    dp_size = config.dp_size
    dp_rank = config.dp_rank
    num_experts = config.expert_num
    hidden_size = config.hidden_size
    num_topk = config.moe_k
    num_max_tokens = router._ll_num_max_token_per_rank * ep_size

    # for per dp rank
    num_token_per_rank = config.ll_num_max_token
    int_mask = (2**32) - 1
    hidden_states = torch.randn((dp_size, num_token_per_rank, hidden_size)).to(
        torch.bfloat16
    )
    hidden_states[:, :, :128] = (
        torch.arange(dp_size * num_token_per_rank, dtype=torch.bfloat16)
        .view(dp_size, num_token_per_rank, 1)
        .repeat(1, 1, 128)
        .to(device())  # rtp-llm: .cuda()
    )
    topk_ids = torch.rand(dp_size, num_token_per_rank, num_experts).topk(
        num_topk, dim=-1, largest=True
    )[1]
    topk_weights = (
        torch.ones((dp_size, num_token_per_rank, num_topk)).to(torch.float32) / num_topk
    )
    # reference data
    assert num_experts % ep_size == 0
    num_local_experts = num_experts // ep_size
    ref_recv_x = (
        torch.zeros((num_local_experts, num_max_tokens, hidden_size))
        .to(torch.bfloat16)
        .to(device())
    )
    ref_recv_count = torch.zeros((num_local_experts), dtype=torch.int32).to(device())
    for local_expert_id in range(num_local_experts):
        expert_id = ep_rank * num_local_experts + local_expert_id
        expert_mask = (topk_ids == expert_id).any(
            dim=-1
        )  # shape: (ep_size, num_token_per_rank)
        num_selected_tokens = expert_mask.sum()
        ref_recv_x[local_expert_id, :num_selected_tokens] = hidden_states[expert_mask]
        ref_recv_count[local_expert_id] = num_selected_tokens
    # router prepare
    payload = router.prepare(
        hidden_states[dp_rank],
        None,
        None,
        topk_weights[dp_rank],
        topk_ids[dp_rank],
    )
    # quant back to bfloat16 if use_fp8
    num_expert_recv_tokens = payload.expert_tokens_meta.expert_num_tokens
    if use_fp8 and payload.expert_x_scale is not None:
        recv_x = torch.zeros(payload.expert_x.size(), dtype=torch.bfloat16).to(device())
        for local_expert_id in range(num_local_experts):
            recv_x[local_expert_id] = per_token_cast_back(
                payload.expert_x[local_expert_id],
                payload.expert_x_scale[local_expert_id],
            )
    else:
        recv_x = payload.expert_x
    # permute recv_x
    permuted_recv_x = torch.zeros_like(recv_x)
    for local_expert_id in range(num_local_experts):
        current_start_idx = 0
        recv_src_info = router.handle[0][local_expert_id]
        recv_layout_range = router.handle[1][local_expert_id]
        for j in range(ep_size):
            begin_idx, count = (recv_layout_range[j] >> 32).item(), (
                recv_layout_range[j] & int_mask
            ).item()
            sorted_indices_per_rank = torch.argsort(
                recv_src_info[begin_idx : begin_idx + count]
            )
            permuted_recv_x[
                local_expert_id, current_start_idx : current_start_idx + count
            ] = recv_x[local_expert_id, begin_idx + sorted_indices_per_rank]
            current_start_idx += count
    # check permuted_recv_x
    torch.testing.assert_close(
        ref_recv_x[:, :, :128], permuted_recv_x[:, :, :128], atol=1e-2, rtol=1e-1
    )
    # check num_expert_recv_tokens
    torch.testing.assert_close(
        ref_recv_count, num_expert_recv_tokens, atol=1e-8, rtol=1e-8
    )
    # pass num_token_per_rank to finalize for gather
    extra_finalize_args = {"original_num_tokens": num_token_per_rank}
    # router finalize
    combined_x = router.finalize(
        CombineForwardPayload(fused_expert_output=recv_x),
        payload.expert_topk_weights,
        payload.expert_topk_ids,
        False,
        extra_finalize_args,
    )
    torch.testing.assert_close(
        hidden_states[dp_rank, :, :128], combined_x[:, :128], atol=1e-2, rtol=1e-1
    )
    _destroy_router(router)


def _spawn_wrapper(rank: int, use_fp8: bool, world_size: int, test_tp_size: int, nccl_port: int):
    """Wrapper function for mp.spawn that calculates parallelism config."""
    dp_size = world_size // test_tp_size
    ep_size = world_size  # EP size equals world_size for low latency router

    # Calculate parallelism config for this rank
    parallelism_config = ParallelismConfig()
    parallelism_config.tp_size = test_tp_size
    parallelism_config.tp_rank = rank % test_tp_size
    parallelism_config.ep_size = ep_size
    parallelism_config.ep_rank = rank % ep_size
    parallelism_config.dp_size = dp_size
    parallelism_config.dp_rank = rank // test_tp_size
    parallelism_config.local_rank = rank
    parallelism_config.world_size = world_size
    parallelism_config.world_rank = rank
    parallelism_config.local_world_size = world_size
    _run_deepep_low_latency_router_test(rank, use_fp8, parallelism_config, nccl_port)


def _rank_main(rank: int, world_size: int, hidden_size: int, ports: list[int]) -> list[tuple[bool, int]]:
    """One rank of ``test_deepep_low_latency_router``: the original's loop of ``mp.spawn`` runs, in one process."""
    global HIDDEN_SIZE
    HIDDEN_SIZE = hidden_size
    install_and_import(globals(), IMPORTS)
    test_tp_sizes = [1, 2]
    done = []
    for use_fp8 in [True, False]:
        for test_tp_size in test_tp_sizes:
            logging.info(f"test_deepep_low_latency_router: use_fp8: {use_fp8}, test_tp_size: {test_tp_size}, "
                         f"world_size: {world_size}")
            _spawn_wrapper(rank, use_fp8, world_size, test_tp_size, ports[len(done)])
            done.append((use_fp8, test_tp_size))
    return done


@pytest.mark.timeout(420)
@pytest.mark.parametrize("where,backend", variants())
def test_deepep_low_latency_router(where: str, backend: str):
    world_size = 2
    env = {"RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC": "1"} if where == GPU and is_v2(backend) else {}
    hidden = HIDDEN_SIZE if where == GPU else CPU_HIDDEN_SIZE
    results = spawn_ranks(_rank_main, where, backend, args=(hidden, free_ports(4)), timeout_s=400, extra_env=env)
    assert results == [[(True, 1), (True, 2), (False, 1), (False, 2)]] * world_size
