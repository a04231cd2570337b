"""The rtp-llm stand-in itself (alibaba/rtp-llm @ 4b8d39cd), in this process, without ranks: the pieces whose
behaviour the ported tests rely on, and ``install()`` binding deepep-switch's objects into its real modules.
(``conftest.py`` puts the stand-in on ``sys.path`` for this module only; hence the imports inside ``rtp``.)
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

import deepep_switch.config as switch_config

ROUTERS = "rtp_llm.models_py.modules.factory.fused_moe.impl.cuda.routers"


MODULES = dict(
    model_config="rtp_llm.config.model_config", quant_config="rtp_llm.config.quant_config",
    wrapper="rtp_llm.models_py.distributed.deepep_wrapper",
    adapter="rtp_llm.models_py.modules.factory.fused_moe.defs.config_adapter",
    moe_quant="rtp_llm.models_py.modules.factory.fused_moe.defs.quant_config",
    checker="rtp_llm.models_py.modules.factory.fused_moe.utils.condition_checker", ops="rtp_llm.ops",
    compute_ops="rtp_llm.ops.compute_ops", numeric="rtp_llm.test.utils.numeric_util",
    normal=f"{ROUTERS}.deepep_normal_router", low_latency=f"{ROUTERS}.deepep_low_latency_router")


@pytest.fixture(scope="module")
def rtp() -> SimpleNamespace:
    """The stand-in's modules by short name."""
    return SimpleNamespace(**{key: importlib.import_module(name) for key, name in MODULES.items()})


def _method(rtp, name: str):
    class Method(rtp.quant_config.QuantizationConfig):
        @classmethod
        def get_method(cls) -> str:
            return name

    return Method(8, 128, True)


def test_trt_fp8_quantize_128_follows_the_kernel_recipe(rtp):
    trt_fp8_quantize_128 = rtp.compute_ops.trt_fp8_quantize_128
    calc_diff, per_token_cast_back = rtp.numeric.calc_diff, rtp.numeric.per_token_cast_back
    torch.manual_seed(0)
    x = (torch.randn(6, 512) * torch.tensor([0.01, 1.0, 30.0, 1e-6]).repeat_interleave(128)).to(torch.bfloat16)
    q, s = trt_fp8_quantize_128(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (6, 4) and s.dtype == torch.float32
    amax = x.view(6, 4, 128).abs().amax(-1).float()
    assert torch.equal(s, amax.clamp(min=1e-4) / 448.0)  # max(1e-4, amax) / 448 in float32
    inverse = (1.0 / s).to(torch.bfloat16).unsqueeze(-1)  # bf16(1 / scale), multiplied in bf16
    assert torch.equal(q.view(6, 4, 128).float(), (x.view(6, 4, 128) * inverse).float().clamp(-448, 448)
                       .to(torch.float8_e4m3fn).float())
    assert q.float().abs().max() <= 448  # saturating conversion
    # the fp32-multiply recipe: the same scales, codes within one step
    ref_q, ref_s = rtp.numeric.per_token_cast_to_fp8(x, False)
    assert torch.equal(s, ref_s)
    assert calc_diff(per_token_cast_back(q, s), per_token_cast_back(ref_q, ref_s)) < 1e-4
    q_col, s_col = trt_fp8_quantize_128(x, True)
    assert torch.equal(q_col, q) and s_col.shape == (4, 6) and s_col.is_contiguous() and torch.equal(s_col.t(), s)
    with pytest.raises(ValueError, match="divisible by 128"):
        trt_fp8_quantize_128(torch.zeros(2, 100, dtype=torch.bfloat16))


def test_per_token_cast_back_reads_ue8m0_bytes(rtp):
    scales = torch.tensor([[2.0 ** -3, 2.0 ** 4, 1.0, 2.0 ** -7]])
    packed = ((scales.view(torch.int32) >> 23) & 0xFF).to(torch.uint8).view(torch.int32)  # one int of 4 bytes
    x = torch.ones(1, 512).to(torch.float8_e4m3fn)
    out = rtp.numeric.per_token_cast_back(x, packed)
    assert torch.equal(out.float().view(4, 128)[:, 0], scales[0])


@pytest.mark.parametrize("n,tp,method", [(1, 1, None), (64, 1, None), (100, 2, None), (160, 1, None),
                                         (129, 1, None), (64, 1, "FP8_PER_BLOCK"), (20, 1, "FP8_DYNAMIC_PER_TENSOR"),
                                         (200, 2, "W4A8_INT4_PER_CHANNEL_COMPRESSED"), (3, 1, "modelopt_fp4")])
def test_wrapper_configs_agree_with_deepep_switch(rtp, n, tp, method):
    standin_wrapper = rtp.wrapper
    quant = _method(rtp, method) if method else None
    ours = switch_config.DeepepWrapperConfig.calc_low_latency_max_token_per_rank(n, tp, quant)
    assert standin_wrapper.DeepepWrapperConfig.calc_low_latency_max_token_per_rank(n, tp, quant) == ours
    model, par, moe = rtp.model_config.ModelConfig(), rtp.ops.ParallelismConfig(), rtp.ops.MoeConfig()
    model.expert_num, model.moe_k, model.hidden_size, model.quant_config = 16, 4, 1024, quant
    par.ep_size, par.ep_rank, par.world_size, par.tp_size, par.local_rank = 2, 1, 2, tp, 1
    moe.deep_ep_num_sm, moe.ll_num_max_token = 24, n
    adapter = rtp.adapter.MoEConfigAdapter(model, par, moe)
    theirs = standin_wrapper.DeepepWrapperConfig.from_config_adapter(adapter, ours)
    mine = switch_config.DeepepWrapperConfig.from_config_adapter(adapter, ours)
    assert theirs.equal(mine)  # rtp-llm's 18 fields
    # deepep-switch's own two fields: ``quant`` follows the model's FP8 method (it sizes the elastic buffer), so a
    # config of an FP8 model is, by design, not equal to rtp-llm's (which lacks the field); others are.
    assert mine.equal(theirs) is (method not in ("FP8_PER_BLOCK", "FP8_DYNAMIC_PER_TENSOR"))
    assert theirs.use_deepep_low_latency is True  # MoeConfig's default, as in rtp-llm


def test_unsupported_quant_method_is_refused_by_both(rtp):
    for cls in (rtp.wrapper.DeepepWrapperConfig, switch_config.DeepepWrapperConfig):
        with pytest.raises(ValueError):
            cls.calc_low_latency_max_token_per_rank(8, 1, _method(rtp, "W8A8_INT8"))


def test_fused_moe_quant_config_properties(rtp):
    FusedMoEQuantConfig = rtp.moe_quant.FusedMoEQuantConfig
    fp8_block = FusedMoEQuantConfig(torch.float8_e4m3fn, False, False, [128, 128])
    assert fp8_block.is_quantized and fp8_block.is_block_quantized and not fp8_block.is_per_tensor
    assert fp8_block.scale_shape(7, 1024) == (7, 8)
    assert str(fp8_block) == "FusedMoEQuantConfig(float8_e4m3fn, per_block[128, 128])"
    per_token = FusedMoEQuantConfig(torch.float8_e4m3fn, per_act_token_quant=True)
    assert per_token.is_per_act_token and per_token.batched_scale_shape(2, 3, 256) == (2, 3, 1)
    assert FusedMoEQuantConfig(torch.uint8, block_shape=[16, 16]).is_per_group_fp4
    assert FusedMoEQuantConfig().is_per_tensor and FusedMoEQuantConfig().scale_shape(1, 128) is None
    with pytest.raises(AssertionError, match="illegal quantization"):
        FusedMoEQuantConfig(torch.float8_e4m3fn, per_act_token_quant=True, block_shape=[128, 128])


def test_condition_checker_records_the_source_of_each_condition(rtp):
    checker = rtp.checker.ConditionChecker("router")
    sm = (9, 0)
    checker.check(sm[0] >= 9, sm=sm)
    checker.check(
        len([1, 2]) == 3,
        what="two lines")
    assert checker.conditions == [(1, "sm[0] >= 9", True, {"sm": (9, 0)}),
                                  (2, "len([1, 2]) == 3", False, {"what": "two lines"})]
    assert checker.all_passed() is False


def test_placeholders_ask_for_install_and_install_binds_deepep_switch(rtp, monkeypatch):
    normal, low_latency, standin_wrapper = rtp.normal, rtp.low_latency, rtp.wrapper
    with pytest.raises(RuntimeError, match=r"install\(\)"):
        normal.DeepepNormalRouterBase(None, None, 1)
    with pytest.raises(RuntimeError, match=r"install\(\)"):
        low_latency.DeepEpLowLatencyRouter(None, None)
    adapter = importlib.import_module("routers.rtp_llm")
    assert adapter.RTP_LLM_AVAILABLE
    for module_name, names in adapter.REPLACED.items():  # restored by monkeypatch after the test
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))
    adapter.install()
    from deepep_switch.wrapper import DeepEPWrapper

    assert standin_wrapper.DeepEPWrapper is DeepEPWrapper
    assert standin_wrapper.DeepepWrapperConfig is switch_config.DeepepWrapperConfig
    assert standin_wrapper.init_deepep_wrapper is adapter.init_deepep_wrapper
    assert normal.DeepepNormalRouterBase is adapter.SwitchDeepepNormalRouterBase
    assert low_latency.DeepEpLowLatencyRouter is adapter.SwitchDeepEpLowLatencyRouter
    # rtp-llm's DeepEPBuffer / DeepEPConfig aliases stay: the provider's V1 Buffer and Config
    from deepep_switch.providers.reference import ReferenceBuffer, ReferenceConfig

    assert (standin_wrapper.DeepEPBuffer, standin_wrapper.DeepEPConfig) == (ReferenceBuffer, ReferenceConfig)
