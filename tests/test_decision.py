"""The backend decision: the pure agreement rules, then real 4-process consensus over gloo with skewed env."""

from __future__ import annotations

import os
import time

import pytest

from _helpers import settings_from_env
from deepep_switch.backend import Backend
from deepep_switch.backends import registry
from deepep_switch.decision import AGREED_KNOBS, BackendUnavailableError, Vote, agree, resolve_backend
from deepep_switch.launch import spawn
from deepep_switch.preflight import CHECK_NAMES, Check, PreflightReport
from deepep_switch.settings import BackendChoice, ProviderChoice, Validation, backend_choices

MODES = backend_choices()
GIN_BIT = 1 << CHECK_NAMES.index("gin")


def vote(mode: str = "legacy", strict: bool = False, elastic_fail: int = 0, legacy_fail: int = 0, ep_fail: int = 0,
         provider: str = "reference", problems: int = 0, unknown: bool = False, **knobs: int) -> Vote:
    values = {k: 0 for k in AGREED_KNOBS}
    values.update(elastic_allow_hybrid=1, elastic_prefer_overlap=1, elastic_allow_multiple_reduction=1,
                  validation=list(Validation).index(Validation.BASIC))
    values.update(knobs)
    masks = [0] * registry.MAX_BACKENDS
    for name, fail in (("legacy", legacy_fail), ("elastic", elastic_fail), ("ep", ep_fail)):
        masks[registry.names().index(name)] = fail
    return Vote(provider=list(ProviderChoice).index(ProviderChoice(provider)), mode=MODES.index(BackendChoice(mode)),
                strict=int(strict), unknown_backend=int(unknown), knob_problems=problems, registry=registry.digest(),
                fail_masks=tuple(masks), **values)


def test_unanimous_elastic_resolves_elastic():
    a = agree([vote("elastic")] * 4)
    assert a.resolved is Backend.ELASTIC and a.error is None and a.runnable and not a.disagreements


def test_unanimous_legacy_and_auto_with_feasibility():
    assert agree([vote("legacy")] * 2).resolved is Backend.LEGACY
    assert agree([vote("auto")] * 3).resolved is Backend.EP  # the fastest generation every rank can run
    assert agree([vote("ep")] * 2).resolved is Backend.EP
    # ep ruled out on one rank (e.g. its NCCL is older than 2.32.3): elastic, if every rank can run it
    nccl = 1 << CHECK_NAMES.index("ep_nccl_runtime")
    a = agree([vote("auto"), vote("auto", ep_fail=nccl), vote("auto")])
    assert a.resolved is Backend.ELASTIC and "ep is unavailable on ranks [1]" in a.reasons[0]
    # one rank has ep only, another elastic only: neither runs everywhere, so legacy
    a = agree([vote("auto", elastic_fail=1 << CHECK_NAMES.index("nccl_build_match")), vote("auto", ep_fail=nccl)])
    assert a.resolved is Backend.LEGACY and a.error is None
    a = agree([vote("auto"), vote("auto", elastic_fail=GIN_BIT, ep_fail=GIN_BIT), vote("auto")])
    assert a.resolved is Backend.LEGACY and a.error is None
    assert "[1]" in a.reasons[-1] and "gin" in a.reasons[-1]


def test_disagreeing_requests_resolve_legacy_and_name_the_ranks():
    a = agree([vote("elastic"), vote("elastic"), vote("legacy"), vote("auto")])
    assert a.resolved is Backend.LEGACY and a.error is None
    assert a.disagreements["backend"] == {"elastic": [0, 1], "legacy": [2], "auto": [3]}
    assert "[0, 1]" in a.reasons[0] and "[2]" in a.reasons[0]


def test_strict_turns_every_fallback_into_an_error():
    assert agree([vote("elastic", strict=True), vote("legacy")]).error
    assert agree([vote("elastic", strict=True), vote("elastic", elastic_fail=GIN_BIT)]).error
    # auto promises a fallback, so strict does not forbid it
    assert agree([vote("auto", strict=True), vote("auto", elastic_fail=GIN_BIT, ep_fail=GIN_BIT)]).error is None
    assert agree([vote("ep", strict=True), vote("ep", ep_fail=GIN_BIT)]).error
    assert agree([vote("legacy", strict=True), vote("legacy", problems=1)]).error


def test_knob_disagreement_uses_defaults_everywhere():
    a = agree([vote("elastic", num_sms=24), vote("elastic", num_sms=20), vote("elastic", num_sms=24)])
    assert a.knobs["num_sms"] == 0 and a.resolved is Backend.ELASTIC and a.error is None
    assert a.disagreements["num_sms"] == {"24": [0, 2], "20": [1]}
    assert agree([vote("elastic", num_sms=24), vote("elastic", num_sms=20, strict=True)]).error
    assert agree([vote("elastic", max_tokens_per_rank=64)] * 2).knobs["max_tokens_per_rank"] == 64


def test_validation_disagreement_uses_basic_everywhere():
    a = agree([vote("legacy", validation=2), vote("legacy", validation=0)])
    assert a.knobs["validation"] is Validation.BASIC and a.error is None
    assert a.disagreements["validation"] == {"full": [0], "off": [1]}
    assert agree([vote("legacy", validation=2)] * 2).knobs["validation"] is Validation.FULL
    assert agree([vote("legacy", validation=2, strict=True), vote("legacy", validation=0)]).error


def test_provider_disagreement_is_always_an_error():
    a = agree([vote("legacy", provider="deep_ep"), vote("legacy", provider="reference")])
    assert a.error and "DEEPEP_SWITCH_PROVIDER" in a.error


def test_legacy_unrunnable_is_reported():
    a = agree([vote("legacy"), vote("legacy", legacy_fail=1 << CHECK_NAMES.index("deep_ep_import"))])
    assert a.resolved is Backend.LEGACY and not a.runnable and "deep_ep_import" in a.reasons[-1]


def test_vote_round_trips_through_ints():
    v = vote("auto", strict=True, elastic_fail=5, ep_fail=9, num_sms=24)
    assert Vote.from_ints(v.to_ints()) == v


def test_single_process_decision_without_torch_distributed(monkeypatch):
    monkeypatch.setenv("DEEPEP_SWITCH_PROVIDER", "reference")
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", "auto")
    decision = resolve_backend()
    assert decision.requested is Backend.EP and decision.resolved is Backend.EP
    assert decision.requested_mode is BackendChoice.AUTO and decision.consensus is None


def test_unknown_value_is_named_in_the_reasons(monkeypatch):
    monkeypatch.setenv("DEEPEP_SWITCH_PROVIDER", "reference")
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", "elastik")
    decision = resolve_backend()
    assert decision.resolved is Backend.LEGACY and "'elastik'" in decision.reasons[0]


# ---------------------------------------------------------------------------------------------- multi-process

def _failing_gin_report() -> PreflightReport:
    return PreflightReport(provider=ProviderChoice.REFERENCE, checks=[
        Check(name="gin", passed=False, detail="no RDMA NIC (faked)", gates=(Backend.ELASTIC, Backend.EP))])


def _decide(env: dict[str, str], preflight=None):
    try:
        d = resolve_backend(settings=settings_from_env(**env), preflight=preflight)
    except BackendUnavailableError as exc:
        return ("raised", str(exc))
    return (d.resolved.value, d.reasons, d.settings.num_sms, d.consensus.disagreements if d.consensus else None)


def _consensus_worker(rank: int, world: int) -> dict:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    out = {}
    requests = ["elastic", "elastic", "legacy", "garbage"]
    out["skewed"] = _decide({"RTP_LLM_DEEPEP_BACKEND": requests[rank]})
    out["skewed_strict"] = _decide({"RTP_LLM_DEEPEP_BACKEND": requests[rank],
                                    "RTP_LLM_DEEPEP_STRICT": "1" if rank == 0 else "0"})
    out["one_cannot"] = _decide({"RTP_LLM_DEEPEP_BACKEND": "elastic"},
                                _failing_gin_report() if rank == 2 else None)
    out["one_cannot_strict"] = _decide({"RTP_LLM_DEEPEP_BACKEND": "elastic", "RTP_LLM_DEEPEP_STRICT": "1"},
                                       _failing_gin_report() if rank == 2 else None)
    out["auto_one_cannot_strict"] = _decide({"RTP_LLM_DEEPEP_BACKEND": "auto", "RTP_LLM_DEEPEP_STRICT": "1"},
                                            _failing_gin_report() if rank == 2 else None)
    out["knob_skew"] = _decide({"RTP_LLM_DEEPEP_BACKEND": "elastic",
                                "RTP_LLM_DEEPEP_NUM_SMS": "24" if rank == 1 else "20"})
    out["all_elastic"] = _decide({"RTP_LLM_DEEPEP_BACKEND": " ELASTIC "})
    # A rank that is late by more than the timeout: the others must raise, not hang.
    if rank == 3:
        time.sleep(6)
        out["late"] = _decide({"RTP_LLM_DEEPEP_BACKEND": "elastic"})
    else:
        t0 = time.monotonic()
        try:
            _decide({"RTP_LLM_DEEPEP_BACKEND": "elastic", "RTP_LLM_DEEPEP_CONSENSUS_TIMEOUT_S": "2"})
            out["late"] = ("no timeout", time.monotonic() - t0)
        except Exception as exc:  # ConsensusTimeout
            out["late"] = (type(exc).__name__, time.monotonic() - t0)
    return out


@pytest.mark.timeout(120)
def test_four_ranks_with_skewed_environments_agree_without_hanging():
    results = spawn(_consensus_worker, 4, timeout_s=90)

    skewed = [r["skewed"] for r in results]
    assert all(s[0] == "legacy" for s in skewed), skewed
    assert all(s[3]["backend"] == {"elastic": [0, 1], "legacy": [2, 3]} for s in skewed)  # garbage -> legacy
    assert "'garbage'" in skewed[3][1][0]  # the rank with the bad value says so in its reasons

    assert all(r["skewed_strict"][0] == "raised" for r in results)
    assert all("[0, 1]" in r["skewed_strict"][1] for r in results)

    assert all(r["one_cannot"][0] == "legacy" for r in results)
    assert all("[2]" in r["one_cannot"][1][-1] and "gin" in r["one_cannot"][1][-1] for r in results)
    assert all(r["one_cannot_strict"][0] == "raised" for r in results)
    assert all(r["auto_one_cannot_strict"][0] == "legacy" for r in results)

    assert all(r["knob_skew"][0] == "elastic" and r["knob_skew"][2] == 0 for r in results)
    assert all(r["all_elastic"][0] == "elastic" for r in results)

    for rank, r in enumerate(results[:3]):
        kind, waited = r["late"]
        assert kind == "ConsensusTimeout" and 1.5 < waited < 10, (rank, r["late"])


def _per_mode_worker(rank: int, world: int, env: dict) -> list:
    out = []
    for low_latency in (False, True):
        loaded = settings_from_env(**env)
        try:
            d = resolve_backend(settings=loaded, low_latency=low_latency)
            out.append((d.resolved.value, d.request_env, d.describe()))
        except BackendUnavailableError as exc:
            out.append(("raised", str(exc), ""))
    return out


@pytest.mark.timeout(120)
def test_per_mode_backends_are_agreed_per_mode():
    # elastic prefill + legacy decode (the documented split), then one rank's override differing.
    env = {"RTP_LLM_DEEPEP_BACKEND_NORMAL": "elastic", "RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY": "legacy"}
    for r in spawn(_per_mode_worker, 2, args=(env,), env={"DEEPEP_SWITCH_PROVIDER": "reference"}, timeout_s=90):
        assert r[0][:2] == ("elastic", "RTP_LLM_DEEPEP_BACKEND_NORMAL") and "(from RTP_LLM_DEEPEP_BACKEND_NORMAL)" in r[0][2]
        assert r[1][:2] == ("legacy", "RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY")


def _skewed_override_worker(rank: int, world: int) -> list:
    env = {"RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY": "elastic" if rank == 0 else "", "RTP_LLM_DEEPEP_STRICT": "1"}
    return _per_mode_worker(rank, world, env)


@pytest.mark.timeout(120)
def test_one_ranks_per_mode_override_is_an_error_in_strict_mode_on_every_rank():
    for r in spawn(_skewed_override_worker, 2, env={"DEEPEP_SWITCH_PROVIDER": "reference"}, timeout_s=90):
        assert r[0][0] == "legacy"  # normal buffers: nobody overrides, legacy everywhere
        assert r[1][0] == "raised" and "ranks disagree" in r[1][1], r
