"""DeepEPWrapper lifecycle on the reference providers across 2 gloo processes, and its single-process errors."""

from __future__ import annotations

import dataclasses
import os

import pytest

from _helpers import settings_from_env
from deepep_switch import DeepEPMode, DeepEPWrapper, DeepepWrapperConfig
from deepep_switch.decision import BackendUnavailableError
from deepep_switch.launch import spawn
from deepep_switch.providers.reference import ReferenceBuffer, ReferenceConfig, ReferenceElasticBuffer
from deepep_switch.providers.reference.hints import elastic_buffer_size_hint, low_latency_rdma_size_hint
from deepep_switch.testing import layer_config


def make_config(rank: int, world: int, low_latency: bool = False, **over) -> DeepepWrapperConfig:
    # LL budget 64 tokens, elastic normal capacity 256: the two capacities differ on purpose.
    cfg = layer_config(rank, world, hidden=512, experts=16, topk=4, capacity=64, low_latency=low_latency,
                       max_tokens_per_rank=256)
    return dataclasses.replace(cfg, **over)


def _use(env: dict[str, str]):
    return settings_from_env(**env)


def _lifecycle_worker(rank: int, world: int) -> dict:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    out: dict = {}
    cfg = make_config(rank, world)
    w = DeepEPWrapper.create(cfg, settings=_use({"RTP_LLM_DEEPEP_BACKEND": "legacy"}))
    out["legacy"] = (w.backend.value, type(w.native_buffer).__name__, w.mode, w.buffer_bytes, w.capacity,
                     DeepEPWrapper.is_initialized(), w.ep_rank, w.num_experts, w.num_topk, w.use_accl_ep)
    out["same_config_same_instance"] = DeepEPWrapper.create(make_config(rank, world)) is w
    out["get_instance"] = DeepEPWrapper.get_instance(make_config(rank, world)) is w
    for name, call in (("create_other", lambda: DeepEPWrapper.create(make_config(rank, world, hidden_size=1024))),
                       ("get_other", lambda: DeepEPWrapper.get_instance(make_config(rank, world, moe_k=2)))):
        try:
            call()
            out[name] = "no error"
        except RuntimeError as exc:
            out[name] = str(exc)
    buffer = w.buffer
    DeepEPWrapper.reset()
    out["after_reset"] = (DeepEPWrapper.is_initialized(), buffer.runtime is None)
    try:
        DeepEPWrapper.get_instance(cfg)
        out["get_after_reset"] = "no error"
    except RuntimeError as exc:
        out["get_after_reset"] = str(exc)

    w = DeepEPWrapper.create(make_config(rank, world, low_latency=True), settings=_use({}))
    out["legacy_ll"] = (w.mode, w.buffer.low_latency_mode, w.buffer_bytes, w.capacity)
    DeepEPWrapper.reset()

    for low_latency in (False, True):
        w = DeepEPWrapper.create(make_config(rank, world, low_latency=low_latency),
                                 settings=_use({"RTP_LLM_DEEPEP_BACKEND": "elastic"}))
        out[f"elastic_{low_latency}"] = (w.backend.value, type(w.native_buffer).__name__, w.buffer_bytes, w.capacity,
                                         w.buffer.num_max_tokens_per_rank, w.buffer.explicitly_destroy)
        DeepEPWrapper.reset()

    w = DeepEPWrapper.create(make_config(rank, world), settings=_use({"RTP_LLM_DEEPEP_BACKEND": "elastic",
                                                                      "RTP_LLM_DEEPEP_MAX_TOKENS_PER_RANK": "96"}))
    out["elastic_capacity_override"] = (w.capacity, w.buffer_bytes)
    DeepEPWrapper.reset()
    return out


@pytest.mark.timeout(120)
def test_lifecycle_create_get_mismatch_reset_and_sizes():
    results = spawn(_lifecycle_worker, 2, timeout_s=90)
    nvl = max(ReferenceConfig(20, *c).get_nvl_buffer_size_hint(512 * 2, 2)
              for c in ((24, 256, 6, 128), (10, 256, 6, 128)))
    for rank, out in enumerate(results):
        backend, cls, mode, nbytes, capacity, initialized, ep_rank, experts, topk, accl = out["legacy"]
        assert (backend, cls, mode, capacity, initialized) == ("legacy", "ReferenceBuffer", DeepEPMode.NORMAL, None, True)
        assert (ep_rank, experts, topk, accl) == (rank, 16, 4, False)
        assert nbytes == {"nvl": nvl, "rdma": 0}
        assert out["same_config_same_instance"] and out["get_instance"]
        assert "different config" in out["create_other"] and "mismatch" in out["get_other"]
        assert out["after_reset"] == (False, True)
        assert "not initialized" in out["get_after_reset"]
        assert out["legacy_ll"] == (DeepEPMode.LOW_LATENCY, True,
                                    {"rdma": low_latency_rdma_size_hint(64, 512, 2, 16)}, 64)
        for low_latency, tokens in ((False, 256), (True, 64)):
            backend, cls, nbytes, capacity, m, explicit = out[f"elastic_{low_latency}"]
            assert (backend, cls, capacity, m, explicit) == ("elastic", "ReferenceElasticBuffer", tokens, tokens, True)
            assert nbytes == {"elastic": elastic_buffer_size_hint(2, tokens, 512, 4)}
        assert out["elastic_capacity_override"] == (96, {"elastic": elastic_buffer_size_hint(2, 96, 512, 4)})


def _construction_failure_worker(rank: int, world: int, strict: bool) -> tuple:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    original = ReferenceElasticBuffer.__init__

    def flaky(self, *args, **kwargs):
        if rank == 1:
            raise RuntimeError("NCCL GIN is unavailable (injected)")
        original(self, *args, **kwargs)

    ReferenceElasticBuffer.__init__ = flaky
    env = {"RTP_LLM_DEEPEP_BACKEND": "elastic"} | ({"RTP_LLM_DEEPEP_STRICT": "1"} if strict else {})
    try:
        w = DeepEPWrapper.create(make_config(rank, world), settings=_use(env))
    except BackendUnavailableError as exc:
        return ("raised", str(exc), DeepEPWrapper.is_initialized())
    result = (w.backend.value, type(w.native_buffer).__name__, w.decision.fallback, w.decision.reasons)
    DeepEPWrapper.reset()
    return result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strict", [False, True])
def test_elastic_construction_failure_on_one_rank_is_agreed(strict):
    results = spawn(_construction_failure_worker, 2, args=(strict,), timeout_s=60)
    if strict:
        assert all(r[0] == "raised" and "ranks [1]" in r[1] and r[2] is False for r in results), results
    else:
        assert all(r[0] == "legacy" and r[1] == "ReferenceBuffer" for r in results), results
        assert all("ranks [1]" in r[2] for r in results)
        assert "injected" in results[1][2] and "injected" not in results[0][2]


def _invalid_config_worker(rank: int, world: int) -> str:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    if rank == 1:
        return "did not call create"  # an invalid config must fail before any collective, so no one waits
    messages = []
    for bad in (make_config(rank, world, expert_num=15), make_config(rank, world, hidden_size=100),
                make_config(rank, world, enable_ffn_disaggregate=True, low_latency=True),
                make_config(rank, world, ep_size=4, world_size=4)):
        try:
            DeepEPWrapper.create(bad, settings=_use({}))
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
    return "\n".join(messages)


@pytest.mark.timeout(60)
def test_invalid_config_fails_before_any_communication():
    out = spawn(_invalid_config_worker, 2, timeout_s=30)[0].split("\n")
    assert "expert_num=15" in out[0] and "hidden_size=100" in out[1] and "ACCL" in out[2]
    assert "ep_size=4" in out[3] and "no error" not in out


def test_create_requires_torch_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed must be initialized"):
        DeepEPWrapper.create(make_config(0, 2))
    assert not DeepEPWrapper.is_initialized()


def test_supported_follows_the_provider(monkeypatch):
    monkeypatch.setenv("DEEPEP_SWITCH_PROVIDER", "reference")
    assert DeepEPWrapper.supported()
    monkeypatch.setenv("DEEPEP_SWITCH_PROVIDER", "deep_ep")
    from deepep_switch.settings import get_settings
    get_settings.cache_clear()
    import importlib.util
    assert DeepEPWrapper.supported() is (importlib.util.find_spec("deep_ep") is not None)
