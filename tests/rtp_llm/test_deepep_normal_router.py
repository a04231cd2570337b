"""Port of rtp-llm's
``rtp_llm/models_py/modules/factory/fused_moe/impl/cuda/routers/test/deepep_normal_router_test.py``
at alibaba/rtp-llm @ 4b8d39cd5cbe4eff0cf0661411e15be21ccc58b9, against the rtp-llm stand-in and deepep-switch.

What it checks (unchanged): rtp-llm's ``DeepepNormalRouterBase(config, FP8 per-block quant config,
expert_alignment=1)`` with 16 experts, top-16 (every token to every expert), hidden 1024, TP 2 over 2 ranks, 5
iterations of prepare -> dequantise -> finalize: ``expert_num_tokens_cpu`` is the list ``[T] * 8``, and the
combined output's first 128 channels equal ``per_token_cast_back(trt_fp8_quantize_128(a1)) * world_size`` (the
unweighted sum over the 2 destination ranks after the TP gather). Here the router is deepep-switch's, bound under
rtp-llm's name by ``routers.rtp_llm.install()``, on every ``RTP_LLM_DEEPEP_BACKEND`` generation.

Replaced infrastructure only: ``mp.Process`` + ``PortManager`` -> ``deepep_switch.launch.spawn`` (2 ranks, bounded)
+ free ports; ``cuda:{rank}`` -> the rank's device (GPU variants) or the CPU (reference providers, gloo);
``rtp_llm.*`` -> the stand-in (``tests/rtp_llm/standin``). Sizes and iterations are the original's on both. As in
the original's ``__main__``, only ``test_tp_size = 2`` and ``use_fp8 = True`` run (its unused ``[1, 2]`` list is
kept); its ``test_single(world_size, test_tp_size, use_fp8)`` signature became pytest parameters.
"""

from __future__ import annotations

import random
from typing import List

import pytest
import torch

from _ported import (assert_backend, device, free_ports, install_and_import, set_device, spawn_ranks,
                     variants)

# The original file's imports, bound by install_and_import() in each rank after routers.rtp_llm.install().
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
    ("rtp_llm.models_py.modules.factory.fused_moe.impl.cuda.routers.deepep_normal_router",
     ["DeepepNormalRouterBase"]),
    ("rtp_llm.ops", ["MoeConfig", "NcclCommConfig", "ParallelismConfig"]),
    ("rtp_llm.test.utils.numeric_util", ["per_token_cast_back"]),
    ("rtp_llm.ops.compute_ops", ["trt_fp8_quantize_128"]),
]

# Bound in each rank by install_and_import(), after routers.rtp_llm.install(); None in the pytest process.
EngineConfig = ModelConfig = PyEnvConfigs = destroy_distributed_environment = init_distributed_environment = \
    DeepEPWrapper = init_deepep_wrapper = MoEConfigAdapter = CombineForwardPayload = FusedMoEQuantConfig = \
    DeepepNormalRouterBase = MoeConfig = NcclCommConfig = ParallelismConfig = per_token_cast_back = \
    trt_fp8_quantize_128 = None


def init_router(rank: int, use_fp8: bool, parallelism_config, nccl_port: int):
    model_config = ModelConfig()
    model_config.expert_num = 16
    model_config.hidden_size = 1024
    model_config.moe_k = 16

    parallelism_config.world_rank = rank
    parallelism_config.local_rank = rank
    nccl_comm_config = NcclCommConfig(
        nccl_ip="0.0.0.0",
        tp_nccl_port=nccl_port + 9,
        dp_tp_nccl_port=nccl_port + 1,
        ffn_tp_nccl_port=nccl_port + 6,
    )

    moe_config = MoeConfig()
    moe_config.use_deepep_low_latency = False

    config = MoEConfigAdapter(
        model_config=model_config,
        parallelism_config=parallelism_config,
        moe_config=moe_config,
    )

    set_device(parallelism_config.local_rank)
    init_distributed_environment(
        parallelism_config=parallelism_config,
        nccl_comm_config=nccl_comm_config,
        nccl_init_port=nccl_port,
        backend="nccl",
        timeout=60,
    )

    py_env = PyEnvConfigs()
    py_env.parallelism_config = parallelism_config
    py_env.moe_config = moe_config
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

    quant_config = FusedMoEQuantConfig(
        quant_dtype=torch.float8_e4m3fn,
        per_act_token_quant=False,
        per_out_ch_quant=False,
        block_shape=[128, 128],
    )
    router = DeepepNormalRouterBase(config, quant_config, expert_alignment=1)
    assert_backend(router.wrapper)  # (deepep-switch) the requested RTP_LLM_DEEPEP_BACKEND is the one running

    return config, router


# payload.expert_x: [token, dim], type: fp8
# payload.expert_x_scale: [token, dim / 128], type: fp32
def dequant_to_bf16(expert_x: torch.Tensor, expert_x_scale: torch.Tensor):
    # (unused in the original too) expand each scale over its 128 channels and multiply in fp32
    scale_expanded = expert_x_scale.repeat_interleave(128, dim=1)
    expert_x_fp32 = expert_x.float()
    combine_x = expert_x_fp32 * scale_expanded
    return combine_x.bfloat16()


def worker_function(
    rank: int,
    use_fp8: bool,
    token_num_per_rank: List[int],
    parallelism_config,
    nccl_port: int,
):
    random.seed(rank)
    config, router = init_router(rank, use_fp8, parallelism_config, nccl_port)
    try:
        dp_rank = config.dp_rank
        dp_size = config.dp_size
        top_k = config.expert_num
        # test dispatch
        current_device = device()  # rtp-llm: torch.device(f"cuda:{rank}")
        for i in range(5):
            token_num = token_num_per_rank[dp_rank]
            # a1 is the same on ranks of the same dp_rank
            torch.manual_seed(rank * dp_size + dp_rank)
            a1 = torch.randn(
                (token_num, config.hidden_size),
                device=current_device,
                dtype=torch.bfloat16,
            )

            a1[:, :128] = (
                torch.arange(token_num, dtype=torch.bfloat16)
                .view(token_num, 1)
                .repeat(1, 128)
                .to(current_device)  # rtp-llm: .cuda()
            )

            topk_weights = torch.ones([token_num, top_k]).to(current_device)
            topk_ids = torch.arange(config.expert_num, device=current_device).repeat(
                token_num, 1
            )
            quant_config = FusedMoEQuantConfig(
                quant_dtype=torch.float8_e4m3fn,
                per_act_token_quant=False,
                per_out_ch_quant=False,
                block_shape=[128, 128],
            )
            payload = router.prepare(
                a1,
                None,
                None,
                topk_weights,
                topk_ids,
            )
            assert payload.expert_tokens_meta.expert_num_tokens_cpu == [
                sum(token_num_per_rank)
            ] * (config.expert_num // config.world_size)
            # Determine if fp8 is used based on quant_config
            use_fp8_actual = (
                quant_config.is_quantized
                and quant_config.quant_dtype == torch.float8_e4m3fn
            )
            if use_fp8_actual:
                combine_x = per_token_cast_back(
                    payload.expert_x, payload.expert_x_scale
                )
            else:
                combine_x = payload.expert_x
            combine_payload = CombineForwardPayload(fused_expert_output=combine_x)
            # pass token_num to finalize for gather
            extra_finalize_args = {"original_num_tokens": token_num}
            a2 = router.finalize(
                combine_payload, topk_weights, topk_ids, False, extra_finalize_args
            )
            if use_fp8_actual:
                x, scale = trt_fp8_quantize_128(a1, False)
                ref_a2 = per_token_cast_back(x, scale) * config.world_size
            else:
                ref_a2 = a1 * config.world_size
            torch.testing.assert_close(ref_a2[:, :128], a2[:, :128])
    finally:
        DeepEPWrapper.reset()
        destroy_distributed_environment()


def _rank_main(rank: int, world_size: int, use_fp8: bool, token_num_per_rank: List[int], parallelism_configs,
               nccl_port: int) -> str:
    """One rank of ``test_single``: install, import, then the original worker (as ``mp.Process`` ran it)."""
    install_and_import(globals(), IMPORTS)
    worker_function(rank, use_fp8, token_num_per_rank, parallelism_configs[rank], nccl_port)
    return "ok"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where,backend", variants())
@pytest.mark.parametrize("world_size,test_tp_size,use_fp8", [(2, 2, True)])  # the original's __main__
def test_single(where: str, backend: str, world_size: int, test_tp_size: int, use_fp8: bool):
    from rtp_llm.ops import ParallelismConfig

    nccl_port = free_ports(1)[0]

    dp_size = world_size // test_tp_size
    ep_size = world_size  # EP size equals world_size for normal router

    parallelism_configs = []
    token_num_per_rank = [random.randint(4, 12) // 4 * 4 for _ in range(dp_size)]
    for rank in range(world_size):
        # Calculate parallelism config for this rank
        parallelism_config = ParallelismConfig()
        parallelism_config.tp_size = test_tp_size
        parallelism_config.tp_rank = rank % test_tp_size
        parallelism_config.ep_size = ep_size
        parallelism_config.ep_rank = rank % ep_size
        parallelism_config.dp_size = dp_size
        parallelism_config.dp_rank = rank // test_tp_size
        parallelism_config.world_size = world_size
        parallelism_config.world_rank = rank
        parallelism_config.local_world_size = world_size
        parallelism_configs.append(parallelism_config)

    # rtp-llm: one mp.Process per rank joined with a 300 s timeout; a non-zero exit code raises.
    assert spawn_ranks(_rank_main, where, backend, args=(use_fp8, token_num_per_rank, parallelism_configs, nccl_port),
                       timeout_s=280) == ["ok"] * world_size


test_tp_sizes = [1, 2]  # the original defines this list but its __main__ runs [2] only
