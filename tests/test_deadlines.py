"""Deadlines across real processes (gloo, reference providers): ONE rank fails, every other rank raises
``CommunicationTimeout`` naming the operation within ``RTP_LLM_DEEPEP_TIMEOUT_S`` instead of hanging; ranks that
would build different things refuse together, before any buffer exists."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import pytest
import torch

from _helpers import settings_from_env
from deepep_switch import CommunicationTimeout, ConsensusTimeout, DeepEPWrapper
from deepep_switch.launch import spawn
from deepep_switch.providers.reference import ReferenceBuffer, ReferenceElasticBuffer
from deepep_switch.testing import ToyExperts, layer_config, make_problem, run_moe_layer
from routers import LowLatencyRouter, NormalRouter

T = 3.0        # RTP_LLM_DEEPEP_TIMEOUT_S in these tests
SLACK = 4.0    # a loaded CI machine: polling, the missing-rank query, scheduling
CULPRIT = 1    # the one rank that misbehaves
HIDDEN, EXPERTS, TOPK, TOKENS = 256, 8, 2, 16


def _config(rank: int, world: int, low_latency: bool = False, **over: Any):
    return layer_config(rank, world, hidden=HIDDEN, experts=EXPERTS, topk=TOPK, capacity=TOKENS,
                        low_latency=low_latency, **over)


def _timeout(exc: CommunicationTimeout, started: float) -> dict:
    return dict(kind=type(exc).__name__, is_communication_timeout=isinstance(exc, CommunicationTimeout),
                operation=exc.operation, rank=exc.rank, world=exc.world_size, missing=exc.missing_ranks,
                timeout_s=exc.timeout_s, waited=time.monotonic() - started, message=str(exc))


def _failure_worker(rank: int, world: int, scenario: str, backend: str, low_latency: bool) -> dict:
    """Every rank runs create -> one MoE layer -> reset; rank CULPRIT misbehaves as ``scenario`` says."""
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND=backend, RTP_LLM_DEEPEP_TIMEOUT_S=str(T))
    culprit = rank == CULPRIT
    linger = T + 2.0  # a misbehaving rank stays alive: it skipped or failed a call, it did not die

    if culprit and scenario == "skip_create":
        time.sleep(linger)
        return {"culprit": "skipped create"}
    started = time.monotonic()
    try:
        wrapper = DeepEPWrapper.create(_config(rank, world, low_latency), settings=settings)
    except CommunicationTimeout as exc:
        return _timeout(exc, started)

    router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper)
    problem = make_problem(7, [TOKENS] * world, HIDDEN, EXPERTS, TOPK)
    experts = ToyExperts(7, EXPERTS, HIDDEN)
    x, ids, w = problem.local(rank)
    outcome: dict = {}
    if culprit and scenario == "skip_dispatch":
        time.sleep(linger)
        return {"culprit": "skipped the layer"}
    if culprit and scenario == "value_error":
        try:
            router.prepare(x.float(), None, None, w, ids)  # float32 hidden states: refused before communicating
        except ValueError as exc:
            time.sleep(linger)
            return {"culprit": f"ValueError: {exc}"}
        return {"culprit": "no ValueError"}
    if culprit and scenario == "late":
        time.sleep(T + 1.0)  # the others give up on this dispatch meanwhile

    started = time.monotonic()
    try:
        run_moe_layer(router, x, ids, w, experts, rank)
    except CommunicationTimeout as exc:
        outcome = _timeout(exc, started)
        if not culprit and scenario == "late":
            time.sleep(linger)  # stay connected while the late rank finds out on its own
        return outcome
    if culprit and scenario == "skip_reset":
        time.sleep(linger)
        return {"culprit": "skipped reset"}
    started = time.monotonic()
    try:
        DeepEPWrapper.reset()
    except CommunicationTimeout as exc:
        return _timeout(exc, started)
    return {"completed": True}


SCENARIOS = [
    # (scenario, world, backend, low_latency, the operation the others name)
    ("skip_create", 2, "legacy", False, "backend decision"),
    ("skip_dispatch", 2, "legacy", False, "dispatch"),
    ("skip_dispatch", 4, "elastic", True, "dispatch"),
    ("value_error", 2, "elastic", False, "dispatch"),
    ("value_error", 4, "legacy", True, "low_latency_dispatch"),
    ("late", 2, "elastic", False, "dispatch"),
    ("skip_reset", 2, "legacy", False, "destroy"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario,world,backend,low_latency,operation", SCENARIOS,
                         ids=[f"{s[0]}-{s[1]}ranks-{s[2]}{'-ll' if s[3] else ''}" for s in SCENARIOS])
def test_one_failing_rank_makes_every_other_rank_raise_within_the_deadline(scenario, world, backend, low_latency,
                                                                            operation):
    results = spawn(_failure_worker, world, args=(scenario, backend, low_latency), timeout_s=90)
    culprit = results[CULPRIT]
    if scenario == "value_error":
        assert culprit["culprit"].startswith("ValueError: a1 must be bf16"), culprit
    elif scenario == "late":  # it finds its peers gone on its own dispatch, and says so too
        assert culprit["is_communication_timeout"] and culprit["operation"] == operation, culprit
    else:
        assert "culprit" in culprit, culprit
    for rank, out in enumerate(results):
        if rank == CULPRIT:
            continue
        assert out.get("is_communication_timeout"), (rank, out)
        assert (out["operation"], out["rank"], out["world"], out["timeout_s"]) == (operation, rank, world, T), out
        assert T - 0.1 <= out["waited"] <= T + SLACK, (rank, out["waited"])
        assert out["missing"] == [CULPRIT], (rank, out)
        assert f"ranks [{CULPRIT}] never arrived" in out["message"] and operation in out["message"], out["message"]
        if operation == "backend decision":
            assert out["kind"] == ConsensusTimeout.__name__


# ---------------------------------------------------------------------------------------------- disagreement
def _count_constructions() -> list[str]:
    built: list[str] = []
    for cls in (ReferenceBuffer, ReferenceElasticBuffer):
        original = cls.__init__

        def counting(self, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            built.append(type(self).__name__)
            _original(self, *args, **kwargs)

        cls.__init__ = counting
    return built


MISMATCHES = [
    # (config field or None, its value on the culprit, the culprit's environment, what the error must name)
    ("expert_num", 16, {}, ["expert_num", "8 on ranks [0, 2, 3]", "16 on ranks [1]"]),
    ("hidden_size", 512, {}, ["hidden_size", "256 on ranks [0, 2, 3]", "512 on ranks [1]"]),
    (None, None, {"EP_DISABLE_GIN": "1"}, ["EP_DISABLE_GIN", "unset on ranks [0, 2, 3]", "'1' on ranks [1]"]),
]


def _mismatch_worker(rank: int, world: int) -> list[dict]:
    """Each case in turn (a refused create leaves the group clean): rank CULPRIT differs in one thing."""
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    built = _count_constructions()
    results = []
    for field, value, env, _ in MISMATCHES:
        if rank == CULPRIT:
            os.environ.update(env)
        over = {field: value} if field is not None and rank == CULPRIT else {}
        settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND="elastic", RTP_LLM_DEEPEP_TIMEOUT_S=str(T))
        started = time.monotonic()
        try:
            DeepEPWrapper.create(_config(rank, world, **over), settings=settings)
            DeepEPWrapper.reset()
            results.append(dict(error=None))
        except ValueError as exc:
            results.append(dict(error=str(exc), built=list(built), initialized=DeepEPWrapper.is_initialized(),
                                waited=time.monotonic() - started))
        for name in env:
            os.environ.pop(name, None)
    return results


@pytest.mark.timeout(120)
def test_ranks_that_would_build_differently_refuse_together_before_any_buffer():
    results = spawn(_mismatch_worker, 4, timeout_s=90)
    for case, (_, _, _, named) in enumerate(MISMATCHES):
        outcomes = [r[case] for r in results]
        errors = {o["error"] for o in outcomes}
        assert len(errors) == 1 and None not in errors, outcomes  # the same ValueError on every rank
        message = errors.pop()
        for part in named:
            assert part in message, (part, message)
        for out in outcomes:
            assert out["built"] == [] and out["initialized"] is False, out  # before any buffer exists
            assert out["waited"] < T, out  # one collective that every rank joined: no deadline involved
