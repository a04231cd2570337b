"""The GPU tests' backend lists (tests/_generations.py): which generations a process can run, and the skip reasons
on the DeepEP 2.1 and 2.5 stacks, decided by deepep-switch's own preflight (faked hosts from test_preflight)."""

from __future__ import annotations

import pytest

import _generations
from _generations import GENERATIONS, generation_params, unavailable_in
from deepep_switch.preflight import run_preflight
from test_preflight import INSTALLS, NCCL_2_1, NCCL_2_5, _fit_probe, _settings


def _why(install: str, nccl: tuple[int, int, int], gin: bool = True) -> dict[str, str]:
    fields, _ = INSTALLS[install]
    return unavailable_in(run_preflight(_settings(ep_disable_gin=gin), _fit_probe(**{**fields, "nccl": nccl})))


def test_the_2_1_stack_runs_legacy_and_elastic_and_says_why_not_ep():
    why = _why("sgl_deep_ep_2_1", NCCL_2_1)
    assert set(why) == {"ep"} and "ep_api" in why["ep"] and "EPBuffer" in why["ep"], why


def test_the_2_5_stack_runs_legacy_and_ep_and_says_why_not_elastic():
    why = _why("sgl_2_1_and_v25", NCCL_2_5)
    assert set(why) == {"elastic"} and "nccl_build_match" in why["elastic"], why


def test_without_ep_disable_gin_the_nccl_generations_are_ruled_out_on_a_host_without_nics():
    why = _why("sgl_2_1_and_v25", NCCL_2_5, gin=False)
    assert set(why) == {"elastic", "ep"} and all("gin" in text for text in why.values()), why


def test_params_skip_what_cannot_run_with_the_reason(monkeypatch):
    monkeypatch.setattr(_generations, "unavailable", lambda: {"elastic": "elastic unavailable: nccl_build_match"})
    params = generation_params(GENERATIONS, marks=[pytest.mark.gpu])
    assert [p.id for p in params] == ["legacy", "elastic", "ep"]
    skips = {p.id: [m.kwargs["reason"] for m in p.marks if m.name == "skip"] for p in params}
    assert skips == {"legacy": [], "ep": [],
                     "elastic": ["elastic cannot run in this process: elastic unavailable: nccl_build_match"]}
    assert all(any(m.name == "gpu" for m in p.marks) for p in params)
    assert _generations.runnable() == ("legacy", "ep")


def test_without_gpus_every_generation_is_unavailable_without_importing_deep_ep(monkeypatch):
    monkeypatch.setattr(_generations, "gpu_ready", lambda min_gpus=2: (False, "needs >= 2 CUDA GPUs"))
    _generations.unavailable.cache_clear()
    try:
        assert _generations.unavailable() == {name: "needs >= 2 CUDA GPUs" for name in GENERATIONS}
    finally:
        _generations.unavailable.cache_clear()


def _in_a_rank(rank: int, world: int) -> dict:
    import _generations as generations

    generations.unavailable.cache_clear()
    return generations.unavailable()


def test_the_ranks_spawned_by_a_test_never_probe_deep_ep():
    from deepep_switch.launch import spawn

    for out in spawn(_in_a_rank, 2, timeout_s=60):
        assert set(out) == set(GENERATIONS) and all("not in its ranks" in why for why in out.values()), out
