"""Both modes in one wrapper, the per-batch AutoRouter and live switching (reference providers, 2 and 4 gloo ranks).

Every output is compared with the dense float32 MoE (:mod:`deepep_switch.testing`), computed on each rank from the
shared problem alone; the parent checks what the ranks report.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from _helpers import settings_from_env
from deepep_switch.launch import spawn
from deepep_switch.testing import layer_config

HIDDEN, TOPK, N_LL, M_NORMAL = 256, 2, 16, 64
TOL = 1e-2
SWITCH = "DeepEPWrapper.switch()"


def _experts(world: int) -> int:
    return 4 * world


def _config(rank: int, world: int, low_latency: bool = False) -> Any:
    """Both capacities set: the LL budget N_LL and the elastic normal capacity M_NORMAL."""
    return layer_config(rank, world, hidden=HIDDEN, experts=_experts(world), topk=TOPK, capacity=N_LL,
                        low_latency=low_latency, ll_num_max_token_per_rank=N_LL, max_tokens_per_rank=M_NORMAL)


def _problem(seed: int, tokens: list[int], world: int) -> Any:
    from deepep_switch.testing import make_problem

    return make_problem(seed, tokens, HIDDEN, _experts(world), TOPK)


def _layer(router: Any, problem: Any, rank: int, **choice: Any) -> float:
    """One MoE layer (prepare -> toy experts -> finalize) through ``router``; its error against the dense MoE."""
    from deepep_switch.testing import ToyExperts, dense_reference, relative_error, run_moe_layer

    experts = ToyExperts(7, _experts(len(problem.tokens_per_rank)), HIDDEN)
    x, ids, w = problem.local(rank)
    out = run_moe_layer(router, x, ids, w, experts, rank, **choice)
    assert router.handle is None
    if not x.shape[0]:
        return 0.0
    return relative_error(out, dense_reference(problem, experts)[problem.rank_slice(rank)])


def _tokens(world: int, small: bool) -> list[int]:
    base = [12, 7, 0, 16] if small else [40, 9, 64, 23]
    return base[:world]


# ---------------------------------------------------------------------------------------------- the main run
def _main_worker(rank: int, world: int) -> dict[str, Any]:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    torch.set_num_threads(1)
    from deepep_switch import DeepEPMode, DeepEPWrapper, telemetry
    from routers import AutoRouter, LowLatencyRouter, NormalRouter

    N, LL = DeepEPMode.NORMAL, DeepEPMode.LOW_LATENCY
    telemetry.reset()
    out: dict[str, Any] = {"errors": {}}
    decode, prefill = _problem(1, _tokens(world, True), world), _problem(2, _tokens(world, False), world)

    def check(tag: str) -> None:
        out["errors"][f"{tag}/normal"] = _layer(normal, prefill, rank)
        out["errors"][f"{tag}/ll"] = _layer(low_latency, decode, rank)
        out["backends"][tag] = (normal.backend.value, low_latency.backend.value)

    out["backends"] = {}
    settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND_NORMAL="elastic", RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY="legacy",
                                 RTP_LLM_DEEPEP_METRICS="1")
    wrapper = DeepEPWrapper.create_both(_config(rank, world), settings=settings)
    try:
        out["modes"] = [m.name for m in wrapper.modes]
        out["primary"] = (wrapper.mode.name, wrapper.backend.value, type(wrapper.native_buffer).__name__)
        out["lookups"] = [DeepEPWrapper.get_instance(c) is wrapper for c in (
            _config(rank, world), _config(rank, world, low_latency=True),
            layer_config(rank, world, hidden=HIDDEN, experts=_experts(world), topk=TOPK, capacity=N_LL,
                         max_tokens_per_rank=M_NORMAL))]  # rtp-llm's normal config: ll_num_max_token_per_rank=0
        out["create_again"] = DeepEPWrapper.create_both(_config(rank, world)) is wrapper
        try:
            wrapper.switch("legacy")
            out["switch_without_mode"] = "no error"
        except ValueError as exc:
            out["switch_without_mode"] = str(exc)
        normal, low_latency = NormalRouter(wrapper), LowLatencyRouter(wrapper)
        check("initial")

        # The per-batch chooser: by phase, then by the (rank-identical) largest per-rank token count.
        auto = AutoRouter(wrapper, verify=True)
        chosen = []
        for problem, choice in ((prefill, {"is_prefill": True}), (decode, {"is_prefill": False}),
                                (decode, {"global_max_tokens": max(decode.tokens_per_rank)}),
                                (prefill, {"global_max_tokens": max(prefill.tokens_per_rank)}),
                                (decode, {"is_prefill": False, "global_max_tokens": 100})):
            out["errors"][f"auto/{len(chosen)}"] = _layer(auto, problem, rank, **choice)
            chosen.append(auto.choose(**choice).mode.name)
        out["chosen"] = chosen
        try:  # rank-dependent counts: the ranks disagree, and verify says so on every rank before any dispatch
            x, ids, w = decode.local(rank)
            auto.prepare(x, None, None, w, ids, global_max_tokens=0 if rank == 0 else 100)
            out["disagreement"] = "no error"
        except RuntimeError as exc:
            out["disagreement"] = str(exc)

        # legacy -> elastic -> legacy on the low-latency buffer (and the reverse on the normal one), both at once.
        for tag, targets in (("swap", {N: "legacy", LL: "elastic"}), ("back", {N: "elastic", LL: "legacy"})):
            decisions = wrapper.switch_modes(targets)
            out[f"{tag}_decisions"] = {m.name: (d.resolved.value, d.request_env) for m, d in decisions.items()}
            check(tag)

        # keep_previous: the legacy LL buffer stays alive, a switch back reuses it, release_previous frees it.
        legacy_ll = wrapper.slot(LL).native_buffer
        wrapper.switch("elastic", mode=LL, keep_previous=True)
        elastic_ll = wrapper.slot(LL).native_buffer
        out["kept_after_keep"] = (wrapper.slot(LL).kept, legacy_ll.runtime is not None)
        # the routers' replaced paths over the kept buffer live on with it (graphs captured through them replay)
        out["retired"] = [type(p).__name__ for p in wrapper.slot(LL)._retired.get(id(legacy_ll), [])]
        out["snapshot_kept"] = telemetry.snapshot()["kept"]
        check("kept_elastic")
        wrapper.switch("legacy", mode=LL, keep_previous=True)
        out["reused"] = wrapper.slot(LL).native_buffer is legacy_ll
        out["kept_after_back"] = wrapper.slot(LL).kept
        check("reused_legacy")
        out["released"] = wrapper.release_previous()
        out["after_release"] = (wrapper.slot(LL).kept, elastic_ll.runtime is None, telemetry.snapshot()["kept"],
                                id(elastic_ll) in wrapper.slot(LL)._retired)
        same = wrapper.switch("legacy", mode=LL)  # already running it: nothing built, nothing freed
        out["same"] = (same.resolved.value, wrapper.slot(LL).native_buffer is legacy_ll)
        out["snapshot"] = telemetry.snapshot()
    finally:
        DeepEPWrapper.reset()

    # The one-mode API: create(config) with its mode, switch without naming it.
    wrapper = DeepEPWrapper.create(_config(rank, world), settings=settings_from_env())
    try:
        router = NormalRouter(wrapper)
        first = wrapper.native_buffer
        decision = wrapper.switch("elastic")
        out["one_mode"] = (decision.resolved.value, wrapper.backend.value, type(wrapper.native_buffer).__name__,
                           router.backend.value, first.runtime is None, wrapper.capacity, router.capacity)
        out["errors"]["one_mode/elastic"] = _layer(router, prefill, rank)
        wrapper.switch("legacy")
        out["errors"]["one_mode/legacy"] = _layer(router, prefill, rank)
        out["one_mode_back"] = (wrapper.backend.value, wrapper.capacity, router.capacity)
    finally:
        DeepEPWrapper.reset()
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def main_results(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return spawn(_main_worker, request.param, timeout_s=240)


@pytest.mark.timeout(300)
def test_every_output_matches_the_dense_moe(main_results):
    for rank, r in enumerate(main_results):
        assert len(r["errors"]) == 2 * 5 + 5 + 2, sorted(r["errors"])
        for name, err in r["errors"].items():
            assert err <= TOL, (rank, name, err)


@pytest.mark.timeout(300)
def test_both_modes_in_one_wrapper_with_different_backends(main_results):
    for r in main_results:
        assert r["modes"] == ["NORMAL", "LOW_LATENCY"]
        assert r["primary"] == ("NORMAL", "elastic", "ReferenceElasticBuffer")
        assert r["lookups"] == [True, True, True] and r["create_again"]
        assert "owns both modes" in r["switch_without_mode"]
        assert r["backends"]["initial"] == ("elastic", "legacy")


@pytest.mark.timeout(300)
def test_auto_router_chooses_alike_on_every_rank(main_results):
    expected = ["NORMAL", "LOW_LATENCY", "LOW_LATENCY", "NORMAL", "NORMAL"]
    for r in main_results:
        assert r["chosen"] == expected
        assert "chose different modes" in r["disagreement"] and "NORMAL" in r["disagreement"], r["disagreement"]


@pytest.mark.timeout(300)
def test_switch_there_and_back_and_routers_follow(main_results):
    for r in main_results:
        assert r["swap_decisions"] == {"NORMAL": ("legacy", SWITCH), "LOW_LATENCY": ("elastic", SWITCH)}
        assert r["back_decisions"] == {"NORMAL": ("elastic", SWITCH), "LOW_LATENCY": ("legacy", SWITCH)}
        assert r["backends"]["swap"] == ("legacy", "elastic") and r["backends"]["back"] == ("elastic", "legacy")
        assert r["one_mode"] == ("elastic", "elastic", "ReferenceElasticBuffer", "elastic", True, M_NORMAL, M_NORMAL)
        assert r["one_mode_back"] == ("legacy", None, None)


@pytest.mark.timeout(300)
def test_keep_previous_reuse_and_release(main_results):
    for r in main_results:
        kept, alive = r["kept_after_keep"]
        assert set(kept) == {"legacy"} and alive
        assert [(k["backend"], k["mode"]) for k in r["snapshot_kept"]] == [("legacy", "low_latency")]
        assert r["snapshot_kept"][0]["bytes"] == sum(kept["legacy"].values()) > 0
        assert r["backends"]["kept_elastic"] == ("elastic", "elastic")
        assert r["reused"] and set(r["kept_after_back"]) == {"elastic"}
        assert r["backends"]["reused_legacy"] == ("elastic", "legacy")
        assert r["released"] == {"NORMAL": [], "LOW_LATENCY": ["elastic"]}
        assert r["retired"] == ["LegacyLowLatencyPath"] * 2  # the LL router's and the AutoRouter's
        assert r["after_release"] == ({}, True, [], False)
        assert r["same"] == ("legacy", True)


@pytest.mark.timeout(300)
def test_telemetry_after_switches(main_results):
    for r in main_results:
        snap = r["snapshot"]
        ll = snap["decisions"]["low_latency"]
        assert (ll["resolved"], ll["request_source"], ll["fallback_reason"]) == ("legacy", SWITCH, "none")
        assert snap["decisions"]["normal"]["resolved"] == "elastic"
        switches = {(s["mode"], s["from"], s["to"]): s for s in snap["switches"]}
        assert {k: s["count"] for k, s in switches.items()} == {
            ("normal", "elastic", "legacy"): 1, ("normal", "legacy", "elastic"): 1,
            ("low_latency", "legacy", "elastic"): 2, ("low_latency", "elastic", "legacy"): 2,
            ("low_latency", "legacy", "legacy"): 1}
        assert switches[("low_latency", "legacy", "legacy")]["last_source"] == "unchanged"
        assert switches[("low_latency", "elastic", "legacy")]["last_source"] == "kept"
        assert switches[("low_latency", "legacy", "elastic")]["last_source"] == "built"
        assert all(0 < s["last_seconds"] < 60 for s in snap["switches"])
        assert snap["switch_seconds"]["low_latency"]["count"] == 5
        # the routers' series follow the running backend of their mode
        labels = {(s["backend"], s["mode"]) for s in snap["series"]}
        assert {("elastic", "low_latency"), ("legacy", "normal"), ("legacy", "low_latency")} <= labels


# ---------------------------------------------------------------------------------------------- open dispatch
class _Busy:
    """A router stand-in with a dispatch open (``BufferUser``), attached to one rank's low-latency slot."""

    def __init__(self) -> None:
        from deepep_switch import DeepEPMode

        self.mode = DeepEPMode.LOW_LATENCY
        self.handle: Any = object()
        self.changes = 0

    def on_buffer_changed(self) -> None:
        self.changes += 1


def _open_dispatch_worker(rank: int, world: int) -> dict[str, Any]:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    from deepep_switch import DeepEPWrapper
    from deepep_switch.providers.reference import ReferenceElasticBuffer
    from routers import CombineForwardPayload, LowLatencyRouter

    built = []
    original = ReferenceElasticBuffer.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    ReferenceElasticBuffer.__init__ = counting  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    wrapper = DeepEPWrapper.create(_config(rank, world, low_latency=True), settings=settings_from_env())
    try:
        router = LowLatencyRouter(wrapper)
        before = wrapper.native_buffer
        busy = _Busy()
        if rank == 1:  # only this rank has a dispatch open
            wrapper.attach(busy)
        try:
            wrapper.switch("elastic")
            out["one_rank"] = "no error"
        except RuntimeError as exc:
            out["one_rank"] = str(exc)
        out["untouched"] = (wrapper.native_buffer is before, before.runtime is not None, len(built),
                            wrapper.backend.value)
        # Every rank's real router has a dispatch open: refused everywhere; after finalize the switch runs.
        x, ids, w = _problem(3, _tokens(world, True), world).local(rank)
        busy.handle = None
        payload = router.prepare(x, None, None, w, ids)
        try:
            wrapper.switch("elastic")
            out["all_ranks"] = "no error"
        except RuntimeError as exc:
            out["all_ranks"] = str(exc)
        router.finalize(CombineForwardPayload(payload.expert_x.to(torch.bfloat16)), payload.expert_topk_weights,
                        payload.expert_topk_ids, False)
        decision = wrapper.switch("elastic")
        out["after"] = (decision.resolved.value, router.backend.value, len(built), before.runtime is None,
                        busy.changes)
    finally:
        DeepEPWrapper.reset()
        ReferenceElasticBuffer.__init__ = original  # type: ignore[method-assign]
    return out


@pytest.mark.timeout(200)
def test_switch_refused_on_every_rank_while_one_rank_has_a_dispatch_open():
    results = spawn(_open_dispatch_worker, 2, timeout_s=150)
    for r in results:
        assert "refused on every rank" in r["one_rank"] and "ranks [1]" in r["one_rank"], r["one_rank"]
        assert r["untouched"] == (True, True, 0, "legacy")
        assert "refused on every rank" in r["all_ranks"] and "ranks [0, 1]" in r["all_ranks"], r["all_ranks"]
    assert results[0]["after"] == ("elastic", "elastic", 1, True, 0)
    assert results[1]["after"] == ("elastic", "elastic", 1, True, 1)  # the stand-in was told of the switch


# ---------------------------------------------------------------------------------------------- construction fails
def _failure_worker(rank: int, world: int, strict: bool) -> dict[str, Any]:
    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    torch.set_num_threads(1)
    from deepep_switch import DeepEPMode, DeepEPWrapper, telemetry
    from deepep_switch.decision import BackendUnavailableError
    from deepep_switch.providers.reference import ReferenceBuffer, ReferenceElasticBuffer
    from routers import NormalRouter

    original, original_destroy = ReferenceElasticBuffer.__init__, ReferenceBuffer.destroy
    destroyed = []

    def flaky(self: Any, *args: Any, **kwargs: Any) -> None:
        if rank == world - 1:
            raise RuntimeError("NCCL GIN is unavailable (injected)")
        original(self, *args, **kwargs)

    def counting_destroy(self: Any) -> None:
        destroyed.append(1)
        original_destroy(self)

    ReferenceElasticBuffer.__init__ = flaky  # type: ignore[method-assign]
    ReferenceBuffer.destroy = counting_destroy  # type: ignore[method-assign]
    env = {"RTP_LLM_DEEPEP_METRICS": "1"} | ({"RTP_LLM_DEEPEP_STRICT": "1"} if strict else {})
    telemetry.reset()
    out: dict[str, Any] = {}
    try:
        wrapper = DeepEPWrapper.create(_config(rank, world), settings=settings_from_env(**env))
        router, before = NormalRouter(wrapper), wrapper.native_buffer
        problem = _problem(4, _tokens(world, False), world)
        try:
            decision = wrapper.switch("elastic")
            out["switch"] = (decision.resolved.value, decision.fallback)
        except BackendUnavailableError as exc:
            out["switch"] = ("raised", str(exc))
        out["kept_running"] = (wrapper.backend.value, wrapper.native_buffer is before, before.runtime is not None,
                               router.backend.value, _layer(router, problem, rank))
        snap = telemetry.snapshot()
        out["telemetry"] = (snap["decisions"]["normal"]["fallback_reason"], snap["switches"])
        DeepEPWrapper.reset()
        destroyed.clear()

        # create_both: the normal buffer (legacy) builds, the low-latency one (elastic) fails on one rank.
        both = settings_from_env(RTP_LLM_DEEPEP_BACKEND_NORMAL="legacy", RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY="elastic",
                                 **env)
        try:
            wrapper = DeepEPWrapper.create_both(_config(rank, world), settings=both)
            out["create_both"] = (wrapper.slot(DeepEPMode.NORMAL).backend.value,
                                  wrapper.slot(DeepEPMode.LOW_LATENCY).backend.value,
                                  wrapper.slot(DeepEPMode.LOW_LATENCY).decision.fallback is not None)
        except BackendUnavailableError as exc:
            out["create_both"] = ("raised", str(exc), DeepEPWrapper.is_initialized(), DeepEPWrapper._instance is None,
                                  len(destroyed))
    finally:
        DeepEPWrapper.reset()
        ReferenceElasticBuffer.__init__ = original  # type: ignore[method-assign]
        ReferenceBuffer.destroy = original_destroy  # type: ignore[method-assign]
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("strict", [False, True], ids=["fallback", "strict"])
def test_switch_construction_failure_on_one_rank_is_agreed(strict):
    world = 2
    results = spawn(_failure_worker, world, args=(strict,), timeout_s=150)
    for rank, r in enumerate(results):
        if strict:
            assert r["switch"][0] == "raised" and "ranks [1]" in r["switch"][1], r["switch"]
            assert r["create_both"][0] == "raised" and "ranks [1]" in r["create_both"][1], r["create_both"]
            # nothing published, and the normal buffer built first was destroyed collectively
            assert r["create_both"][2:] == (False, True, 1), r["create_both"]
        else:
            assert r["switch"][0] == "legacy" and "ranks [1]" in r["switch"][1], r["switch"]
            assert ("injected" in r["switch"][1]) == (rank == world - 1)
            assert r["create_both"] == ("legacy", "legacy", True)
            reason, switches = r["telemetry"]
            assert reason == "construction"
            assert [(s["from"], s["to"], s["last_source"]) for s in switches] == [("legacy", "legacy", "unchanged")]
        backend, same, alive, router_backend, err = r["kept_running"]
        assert (backend, same, alive, router_backend) == ("legacy", True, True, "legacy") and err <= TOL


# ---------------------------------------------------------------------------------------------- the rule alone
def test_mode_chooser_rule():
    from deepep_switch import DeepEPMode
    from routers import ModeChooser

    N, LL = DeepEPMode.NORMAL, DeepEPMode.LOW_LATENCY
    chooser = ModeChooser(128)
    assert chooser.choose(is_prefill=True) is N and chooser.choose(is_prefill=True, global_max_tokens=1) is N
    assert chooser.choose(is_prefill=False) is LL
    assert [chooser.choose(global_max_tokens=t) for t in (0, 128, 129)] == [LL, LL, N]
    assert chooser.choose(is_prefill=False, global_max_tokens=129) is N  # a decode batch too big for the LL buffer
    tp2 = ModeChooser(128, threshold=64, tp_size=2)  # a TP group's 129 tokens are 65 per rank
    assert [tp2.choose(global_max_tokens=t) for t in (128, 129)] == [LL, N]
    with pytest.raises(ValueError, match="is_prefill"):
        chooser.choose()
    with pytest.raises(ValueError, match="low-latency capacity"):
        ModeChooser(128, threshold=129)


# ---------------------------------------------------------------------------------------------- a rank never joins
def _absent_worker(rank: int, world: int) -> Any:
    import time

    os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    from deepep_switch import CommunicationTimeout, DeepEPWrapper

    DeepEPWrapper.create(_config(rank, world), settings=settings_from_env(RTP_LLM_DEEPEP_TIMEOUT_S="2"))
    if rank == 1:  # never calls switch; stays alive past the others' deadline
        time.sleep(6)
        return "absent"
    started = time.monotonic()
    try:
        DeepEPWrapper._instance.switch("elastic")  # type: ignore[union-attr]
    except CommunicationTimeout as exc:
        return (type(exc).__name__, exc.missing_ranks, round(time.monotonic() - started, 1))
    return "no error"


@pytest.mark.timeout(120)
def test_switch_waits_for_peers_within_the_deadline():
    first, second = spawn(_absent_worker, 2, timeout_s=60)
    assert second == "absent"
    name, missing, seconds = first
    assert name == "ConsensusTimeout" and missing == [1] and 1.5 <= seconds <= 5, first
