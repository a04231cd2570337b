"""The backend registry: a toy third generation registered from one module runs both routers end to end, auto
prefers it, a failed construction falls back on every rank, and ranks with different registries all refuse."""

from __future__ import annotations

import os

import pytest

import _toy_backend
from _helpers import settings_from_env
from deepep_switch import Backend, BackendChoice, DeepEPWrapper, resolve_backend
from deepep_switch.backends import get_spec, names, registered, unregister
from deepep_switch.decision import BackendUnavailableError, Vote, agree
from deepep_switch.launch import LaunchError, spawn
from deepep_switch.preflight import check_names, run_preflight
from deepep_switch.quant import Quant
from deepep_switch.settings import ProviderChoice, load_settings, parse_backend
from deepep_switch.testing import (ToyExperts, dense_reference, layer_config, make_problem, relative_error,
                                   run_moe_layer)
from routers import LowLatencyRouter, NormalRouter, RouterOptions


@pytest.fixture
def toy():
    spec = _toy_backend.ensure_registered()
    yield spec
    unregister(spec.name)


def test_built_in_generations_are_registered_in_fallback_first_order():
    assert names()[:3] == ("legacy", "elastic", "ep")
    assert [s.backend for s in registered()][:3] == [Backend.LEGACY, Backend.ELASTIC, Backend.EP]
    assert get_spec(Backend.ELASTIC).library.attribute == "ElasticBuffer"
    assert get_spec(Backend.EP).library.modules == ("deep_ep_v25", "deep_ep")
    assert get_spec(Backend.EP).library.attribute == "EPBuffer"
    with pytest.raises(ValueError, match="registered: legacy, elastic, ep"):
        get_spec("nope")
    with pytest.raises(ValueError):
        unregister("legacy")


def test_a_registered_generation_is_a_backend_and_an_accepted_value(toy):
    assert Backend("toy") is Backend("toy") and Backend("toy").value == "toy"
    assert BackendChoice("toy").value == "toy"
    assert parse_backend(" TOY ") == (BackendChoice("toy"), None)
    assert "toy_api" in check_names() and "deepep_toy_import" in check_names()
    loaded = load_settings(backend_raw="toy", provider="reference")
    vote = Vote.local(loaded, run_preflight(loaded.settings))
    assert Vote.from_ints(vote.to_ints()) == vote
    assert agree([vote, vote]).resolved is Backend("toy")


def test_unregistered_names_stay_unknown():
    with pytest.raises(ValueError):
        Backend("toy")
    choice, problem = parse_backend("toy")
    assert choice is BackendChoice.LEGACY and "'toy'" in problem and "elastic" in problem


def test_toy_library_is_missing_on_real_deep_ep(toy):
    report = run_preflight(load_settings(backend_raw="toy").settings)
    failed = {c.name for c in report.failures(Backend("toy"))}
    assert failed >= {"deepep_toy_import", "toy_api"}


def _toy_worker(rank: int, world: int, backend: str, fail_rank: str) -> dict:
    _toy_backend.ensure_registered()
    os.environ[_toy_backend.FAIL_RANK_ENV] = fail_rank
    settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND=backend)
    tokens = [5 + 4 * r for r in range(world)]
    tokens[-1] = 0  # an empty rank too
    problem = make_problem(3, tokens, 256, 8, 2)
    experts = ToyExperts(3, 8, 256)
    out: dict = {"rank": rank}
    for low_latency in (False, True):
        config = layer_config(rank, world, hidden=256, experts=8, topk=2, capacity=max(tokens),
                              low_latency=low_latency)
        wrapper = DeepEPWrapper.create(config, settings=settings)
        try:
            router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper, RouterOptions(quant=Quant.FP8_BLOCK))
            x, ids, w = problem.local(rank)
            result = run_moe_layer(router, x, ids, w, experts, rank)
            reference = dense_reference(problem, experts, fp8=True)[problem.rank_slice(rank)]
            key = "low_latency" if low_latency else "normal"
            out[key] = dict(backend=wrapper.backend.value, buffer=type(wrapper.native_buffer).__name__,
                            path=type(router.path).__name__, fallback=wrapper.decision.fallback,
                            error=relative_error(result, reference) if x.shape[0] else 0.0)
        finally:
            DeepEPWrapper.reset()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,backend", [(2, "toy"), (4, "auto")])
def test_toy_generation_runs_both_routers(world, backend):
    env = {"DEEPEP_SWITCH_PROVIDER": "reference"}
    for r in spawn(_toy_worker, world, args=(backend, ""), env=env, timeout_s=200):
        for mode in ("normal", "low_latency"):
            m = r[mode]
            assert (m["backend"], m["buffer"], m["fallback"]) == ("toy", "ToyBuffer", None), r
            assert m["path"] == ("ElasticNormalPath" if mode == "normal" else "ElasticLowLatencyPath")
            assert m["error"] <= 1e-2, r


@pytest.mark.timeout(240)
def test_toy_construction_failure_on_one_rank_falls_back_everywhere():
    env = {"DEEPEP_SWITCH_PROVIDER": "reference"}
    for r in spawn(_toy_worker, 2, args=("toy", "1"), env=env, timeout_s=200):
        for mode in ("normal", "low_latency"):
            m = r[mode]
            assert m["backend"] == "legacy" and m["buffer"] == "ReferenceBuffer", r
            assert "construction failed on ranks [1]" in m["fallback"], r
            assert m["error"] <= 1e-2, r


def _mismatch_worker(rank: int, world: int) -> str:
    if rank == 0:  # only rank 0 knows the toy generation
        _toy_backend.ensure_registered()
    try:
        resolve_backend(settings=settings_from_env(RTP_LLM_DEEPEP_BACKEND="legacy"))
    except BackendUnavailableError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(120)
def test_ranks_with_different_registries_all_refuse():
    for message in spawn(_mismatch_worker, 2, env={"DEEPEP_SWITCH_PROVIDER": "reference"}, timeout_s=90):
        assert "register different deepep-switch generations" in message


def _strict_unknown_worker(rank: int, world: int) -> str:
    value = "elastc" if rank == 1 else "elastic"  # one rank's typo
    try:
        resolve_backend(settings=settings_from_env(RTP_LLM_DEEPEP_BACKEND=value, RTP_LLM_DEEPEP_STRICT="1"))
    except BackendUnavailableError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(120)
def test_strict_refuses_an_unknown_backend_value_on_every_rank():
    for message in spawn(_strict_unknown_worker, 2, env={"DEEPEP_SWITCH_PROVIDER": "reference"}, timeout_s=90):
        assert "RTP_LLM_DEEPEP_BACKEND is not a known backend on ranks [1]" in message


def test_strict_unknown_backend_single_process():
    loaded = load_settings(backend_raw="elastc", strict=True, provider=ProviderChoice.REFERENCE)
    with pytest.raises(BackendUnavailableError, match="not a known backend"):
        resolve_backend(settings=loaded)
    relaxed = load_settings(backend_raw="elastc", provider=ProviderChoice.REFERENCE)
    assert resolve_backend(settings=relaxed).resolved is Backend.LEGACY
