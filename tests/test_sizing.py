"""Sizing comes from the provider's hints; the reference hints reproduce DeepEP's C++ formulas."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from deepep_switch.backend import Backend
from deepep_switch.config import DeepEPMode, DeepepWrapperConfig
from deepep_switch.providers.reference import ReferenceBuffer, ReferenceConfig, ReferenceElasticBuffer
from deepep_switch.providers.reference.hints import elastic_buffer_size_hint, low_latency_rdma_size_hint
from deepep_switch.settings import SwitchSettings
from deepep_switch.backends import Library, elastic, legacy
from deepep_switch.quant import Quant


def test_hints_match_deep_ep_worked_examples():
    # Values computed from DeepEP 2.1.0's C++ (csrc/legacy/config.hpp, csrc/elastic/buffer.hpp).
    assert ReferenceConfig(20, 6, 256, 6, 256).get_nvl_buffer_size_hint(7168 * 2, 8) == 335_709_824
    assert low_latency_rdma_size_hint(128, 7168, 8, 256) == 1_908_410_496
    assert elastic_buffer_size_hint(8, 4096, 7168, 8) == 473_956_352
    assert elastic_buffer_size_hint(8, 4096, 7168, 0) == 484_442_112  # topk 0 sizes for 32
    assert elastic_buffer_size_hint(2, 128, 7168, 8) % (2 << 20) == 0
    assert ReferenceConfig().get_rdma_buffer_size_hint(14336, 8) == 0


def test_hints_grow_with_what_they_should():
    assert low_latency_rdma_size_hint(256, 7168, 2, 64) > low_latency_rdma_size_hint(128, 7168, 2, 64)
    assert low_latency_rdma_size_hint(128, 7168, 2, 64) == low_latency_rdma_size_hint(128, 7168, 8, 64)
    assert elastic_buffer_size_hint(4, 4096, 7168, 8) > elastic_buffer_size_hint(2, 4096, 7168, 8)
    assert elastic_buffer_size_hint(8, 4096, 7168, 8, use_fp8_dispatch=True) < elastic_buffer_size_hint(8, 4096, 7168, 8)
    assert ReferenceConfig(24).get_nvl_buffer_size_hint(14336, 8) > ReferenceConfig(20).get_nvl_buffer_size_hint(14336, 8)


class RecordingElastic:
    calls: list = []

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk=0, use_fp8_dispatch=False,
                             allow_hybrid_mode=True, allow_multiple_reduction=True):
        RecordingElastic.calls.append((num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                                       allow_hybrid_mode, allow_multiple_reduction))
        return 6 << 20




def config(low_latency=False, **over) -> DeepepWrapperConfig:
    cfg = DeepepWrapperConfig(ep_rank=0, ep_size=4, tp_size=1, local_rank=0, world_size=4, hidden_size=7168,
                              expert_num=64, moe_k=8, deep_ep_num_sm=0, use_deepep_low_latency=low_latency,
                              use_deepep_internode=False, ll_num_max_token=128,
                              ll_num_max_token_per_rank=128 if low_latency else 0)
    return dataclasses.replace(cfg, **over)


def test_legacy_normal_plan_uses_max_of_dispatch_and_combine_hints():
    plan = legacy.plan(ReferenceBuffer, None, config(), SwitchSettings())
    expected = max(ReferenceBuffer.get_dispatch_config(4).get_nvl_buffer_size_hint(14336, 4),
                   ReferenceBuffer.get_combine_config(4).get_nvl_buffer_size_hint(14336, 4))
    assert plan.backend is Backend.LEGACY and plan.capacity is None
    assert plan.kwargs["num_nvl_bytes"] == expected and plan.kwargs["num_rdma_bytes"] == 0
    assert plan.kwargs["explicitly_destroy"] is True and plan.kwargs["low_latency_mode"] is False


def test_legacy_sm_override_changes_the_hint():
    try:
        small = legacy.plan(ReferenceBuffer, None, config(), SwitchSettings()).bytes["nvl"]
        big = legacy.plan(ReferenceBuffer, None, config(), SwitchSettings(num_sms=32)).bytes["nvl"]
        assert big > small
    finally:
        ReferenceBuffer.set_num_sms(20)


def test_legacy_normal_plan_fits_the_engines_deep_ep_num_sm():
    """rtp-llm code dispatches on the buffer itself with ``Config(deep_ep_num_sm, ...)``: the NVL bytes must fit
    that SM count as well as the kernels' own (``Buffer.num_sms``), whichever is larger, and sizing must leave
    the class-wide SM count the kernels use as it was."""
    def nvl(sms: int) -> int:
        return max(ReferenceConfig(sms, 6, 256, 6, 128).get_nvl_buffer_size_hint(14336, 4),
                   ReferenceConfig(sms, 9, 256, 6, 128).get_nvl_buffer_size_hint(14336, 4))

    try:
        assert ReferenceBuffer.num_sms == 20
        default = legacy.plan(ReferenceBuffer, None, config(), SwitchSettings()).bytes["nvl"]
        assert default == nvl(20)
        for deep_ep_num_sm, sms in ((24, 24), (23, 24), (8, 20), (0, 20)):
            plan = legacy.plan(ReferenceBuffer, None, config(deep_ep_num_sm=deep_ep_num_sm), SwitchSettings())
            assert plan.bytes["nvl"] == plan.kwargs["num_nvl_bytes"] == nvl(sms), deep_ep_num_sm
            assert ReferenceBuffer.num_sms == 20  # the kernels' SM count is untouched
        # RTP_LLM_DEEPEP_NUM_SMS sets the kernels' count (class-wide); deep_ep_num_sm only ever raises the sizing.
        plan = legacy.plan(ReferenceBuffer, None, config(deep_ep_num_sm=24), SwitchSettings(num_sms=32))
        assert plan.bytes["nvl"] == nvl(32) and ReferenceBuffer.num_sms == 32
        assert legacy.sizing_sms(ReferenceBuffer, 24) == 32
    finally:
        ReferenceBuffer.set_num_sms(20)


def test_legacy_sizing_restores_the_sm_count_when_deep_ep_has_no_config():
    try:
        with pytest.raises(ValueError, match="ep_size=3"):
            legacy.sizing_configs(ReferenceBuffer, 3, 24)
        assert ReferenceBuffer.num_sms == 20
    finally:
        ReferenceBuffer.set_num_sms(20)


def test_legacy_low_latency_plan():
    plan = legacy.plan(ReferenceBuffer, None, config(low_latency=True), SwitchSettings())
    assert plan.kwargs["num_rdma_bytes"] == low_latency_rdma_size_hint(128, 7168, 4, 64)
    assert plan.kwargs["num_qps_per_rank"] == 16 and isinstance(plan.kwargs["num_qps_per_rank"], int)
    assert plan.kwargs["low_latency_mode"] is True and plan.kwargs["num_nvl_bytes"] == 0 and plan.capacity == 128


def test_legacy_normal_rejects_rank_counts_without_a_config():
    with pytest.raises(ValueError, match="ep_size=6"):
        legacy.plan(ReferenceBuffer, None, config(ep_size=6, world_size=6, expert_num=60), SwitchSettings())


def test_elastic_plan_passes_settings_to_the_hint_and_constructor():
    RecordingElastic.calls.clear()
    settings = SwitchSettings(elastic_allow_hybrid=False, elastic_deterministic=True, max_tokens_per_rank=512)
    plan = elastic.plan(RecordingElastic, None, config(quant=Quant.FP8_BLOCK), settings)
    assert RecordingElastic.calls == [(512, 7168, 8, True, False, True)]
    assert plan.bytes == {"elastic": 6 << 20} and plan.capacity == 512
    assert plan.kwargs["deterministic"] is True and plan.kwargs["explicitly_destroy"] is True
    assert plan.kwargs["num_max_tokens_per_rank"] == 512


def test_elastic_capacity_by_mode():
    assert elastic.capacity(config(low_latency=True), SwitchSettings(max_tokens_per_rank=999)) == 128
    assert elastic.capacity(config(max_tokens_per_rank=2048), SwitchSettings()) == 2048
    assert elastic.capacity(config(max_tokens_per_rank=2048), SwitchSettings(max_tokens_per_rank=64)) == 64


def test_library_load_names_every_module_and_survives_import_time_assertions(tmp_path, monkeypatch):
    # deep_ep_v25 raises AssertionError from its NCCL file check at import time: a lazy import must catch it.
    (tmp_path / "asserting_ep.py").write_text("assert False, 'two libnccl are mapped'\n")
    (tmp_path / "v1_only_ep.py").write_text("class Buffer: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lib = Library(modules=("asserting_ep", "v1_only_ep", "no_such_module_xyz"), attribute="ElasticBuffer",
                  import_check="x_import", api_check="x_api", install_hint="install it")
    with pytest.raises(ImportError) as err:
        lib.load()
    text = str(err.value)
    assert "AssertionError: two libnccl are mapped" in text and "v1_only_ep has no ElasticBuffer" in text
    assert "no_such_module_xyz" in text and "install it" in text
    assert dataclasses.replace(lib, attribute="Buffer").load().__name__ == "Buffer"


def quant(method):
    return SimpleNamespace(is_quanted=lambda: method is not None, get_method=lambda: method)


@pytest.mark.parametrize("n,tp,method,expected", [
    (1, 1, None, 64), (64, 1, None, 64), (65, 1, None, 128), (129, 1, None, 256), (300, 2, None, 256),
    (10, 1, "FP8_PER_BLOCK", 64), (10, 1, "FP8_PER_TENSOR_COMPRESSED", 16), (17, 1, "FP8_DYNAMIC_PER_TENSOR", 24),
    (200, 4, "W4A8_INT4_PER_CHANNEL", 56),
])
def test_low_latency_buckets_match_rtp_llm(n, tp, method, expected):
    assert DeepepWrapperConfig.calc_low_latency_max_token_per_rank(n, tp, quant(method)) == expected


def test_low_latency_bucket_rejects_unknown_quant():
    with pytest.raises(ValueError):
        DeepepWrapperConfig.calc_low_latency_max_token_per_rank(8, 1, quant("INT4_AWQ"))


def test_config_equality_and_modes():
    a, b = config(), config()
    assert a.equal(b) and not a.equal(config(hidden_size=4096))
    assert config().mode is DeepEPMode.NORMAL and config(low_latency=True).mode is DeepEPMode.LOW_LATENCY
    assert config(low_latency=True, enable_ffn_disaggregate=True).mode is DeepEPMode.LOW_LATENCY_M2N


def test_from_config_adapter_reads_rtp_llm_fields():
    ffn = SimpleNamespace(enable_ffn_disaggregate=False, attention_tp_size=1, attention_dp_size=2,
                          ffn_tp_size=1, ffn_dp_size=2)
    adapter = SimpleNamespace(
        parallelism_config=SimpleNamespace(ep_rank=1, ep_size=2, tp_size=1, local_rank=1, world_size=2,
                                           ffn_disaggregate_config=ffn),
        model_config=SimpleNamespace(hidden_size=4096, expert_num=32, moe_k=4),
        moe_config=SimpleNamespace(deep_ep_num_sm=24, use_deepep_low_latency=True, use_deepep_internode=False),
        ll_num_max_token=160)
    cfg = DeepepWrapperConfig.from_config_adapter(adapter, 128)
    assert (cfg.ep_rank, cfg.hidden_size, cfg.expert_num, cfg.deep_ep_num_sm, cfg.ll_num_max_token) == (1, 4096, 32, 24, 160)
    assert cfg.ll_num_max_token_per_rank == 128 and cfg.attention_dp_size == 2
    assert [f.name for f in dataclasses.fields(cfg)][:12] == [
        "ep_rank", "ep_size", "tp_size", "local_rank", "world_size", "hidden_size", "expert_num", "moe_k",
        "deep_ep_num_sm", "use_deepep_low_latency", "use_deepep_internode", "ll_num_max_token"]


class Buffer210(ReferenceBuffer):
    """``deep_ep.Buffer``'s 2.1.0 constructor signature (no deadline of any kind), with the reference's statics."""

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=None,
                 explicitly_destroy=False, enable_shrink=False, comm=None) -> None:
        raise AssertionError("never built here")


class ElasticBuffer210(RecordingElastic):
    """``deep_ep.ElasticBuffer``'s 2.1.0 constructor signature."""

    def __init__(self, group, num_bytes=None, num_cpu_bytes=0, num_max_tokens_per_rank=0, hidden=0, num_topk=0,
                 use_fp8_dispatch=False, deterministic=False, allow_hybrid_mode=True, allow_multiple_reduction=True,
                 prefer_overlap_with_compute=True, sl_idx=3, num_allocated_qps=0, num_cpu_timeout_secs=300,
                 num_gpu_timeout_secs=100, explicitly_destroy=False) -> None:
        raise AssertionError("never built here")


@pytest.mark.parametrize("low_latency", [False, True])
def test_the_deadline_reaches_only_constructors_that_take_it(low_latency):
    settings = SwitchSettings(timeout_s=2.5)
    real_legacy = legacy.plan(Buffer210, None, config(low_latency=low_latency), settings).kwargs
    assert not {"timeout_s", "num_cpu_timeout_secs", "num_gpu_timeout_secs"} & set(real_legacy)
    assert legacy.plan(ReferenceBuffer, None, config(low_latency=low_latency), settings).kwargs["timeout_s"] == 2.5

    real_elastic = elastic.plan(ElasticBuffer210, None, config(low_latency=low_latency), settings).kwargs
    assert (real_elastic["num_cpu_timeout_secs"], real_elastic["num_gpu_timeout_secs"]) == (3, 3)  # whole seconds
    assert "timeout_s" not in real_elastic
    ref = elastic.deadline_kwargs(ReferenceElasticBuffer, settings)  # its size hint needs a live group
    assert ref == {"timeout_s": 2.5, "num_cpu_timeout_secs": 3, "num_gpu_timeout_secs": 3}
    assert elastic.plan(ElasticBuffer210, None, config(), SwitchSettings(timeout_s=0.2)).kwargs[
        "num_cpu_timeout_secs"] == 1
