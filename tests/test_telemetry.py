"""Telemetry (RTP_LLM_DEEPEP_METRICS): off costs nothing but ``router._metrics is None``; on, the counts match
what was sent and received on 2 gloo ranks with the reference providers, fallbacks are classified the same on
every rank, and the Prometheus exposition has the documented names with bounded labels."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import pytest
import torch

from deepep_switch import telemetry
from deepep_switch.backend import Backend
from deepep_switch.config import DeepEPMode
from deepep_switch.decision import ConsensusOutcome, resolve_backend
from deepep_switch.launch import spawn
from deepep_switch.settings import load_settings
from deepep_switch.testing import make_problem
from routers import RouterOptions

HIDDEN, EXPERTS, TOPK, TOKENS, CALLS, EVERY = 256, 8, 2, (12, 7), 3, 2
SEED = 5


def _settings(backend: str, metrics: bool, **extra: Any):
    return load_settings(backend_raw=backend, provider="reference", metrics=metrics, metrics_sample_every=EVERY,
                         **extra)


def _config(rank: int, world: int, low_latency: bool):
    from deepep_switch.testing import layer_config

    return layer_config(rank, world, hidden=HIDDEN, experts=EXPERTS, topk=TOPK, capacity=max(TOKENS),
                        low_latency=low_latency)


def _worker(rank: int, world: int) -> dict[str, Any]:
    from deepep_switch import DeepEPWrapper
    from deepep_switch.providers.reference import ReferenceElasticBuffer
    from deepep_switch.testing import ToyExperts, run_moe_layer
    from routers import LowLatencyRouter, NormalRouter

    problem = make_problem(SEED, list(TOKENS), HIDDEN, EXPERTS, TOPK)
    experts = ToyExperts(SEED, EXPERTS, HIDDEN)
    x, ids, weights = problem.local(rank)
    out: dict[str, Any] = {}

    # Off: the routers hold None and nothing is recorded, by the wrapper or the routers.
    wrapper = DeepEPWrapper.create(_config(rank, world, False), settings=_settings("elastic", False))
    try:
        router = NormalRouter(wrapper)
        out["off_metrics"] = router._metrics
        run_moe_layer(router, x, ids, weights, experts, rank)
    finally:
        DeepEPWrapper.reset()
    out["off_snapshot"] = telemetry.snapshot(harvest=True, wait=True)

    # On: per backend, two normal-mode layers and one low-latency router without a layer id.
    for backend in ("legacy", "elastic"):
        for low_latency in (False, True):
            wrapper = DeepEPWrapper.create(_config(rank, world, low_latency), settings=_settings(backend, True))
            try:
                routers = ([LowLatencyRouter(wrapper)] if low_latency else
                           [NormalRouter(wrapper, RouterOptions(layer_id=layer)) for layer in (0, 1)])
                for router in routers:
                    for _ in range(CALLS):
                        run_moe_layer(router, x, ids, weights, experts, rank)
            finally:
                DeepEPWrapper.reset()

    # The wrapper destroys and rebuilds its buffer: the router keeps its recorder and its series.
    wrapper = DeepEPWrapper.create(_config(rank, world, False), settings=_settings("legacy", True))
    try:
        router = NormalRouter(wrapper, RouterOptions(layer_id=5))
        recorder = router._metrics
        run_moe_layer(router, x, ids, weights, experts, rank)
        DeepEPWrapper.destroy_buffer()
        DeepEPWrapper.rebuild_buffer()
        run_moe_layer(router, x, ids, weights, experts, rank)
        out["same_recorder_after_rebuild"] = router._metrics is recorder
    finally:
        DeepEPWrapper.reset()

    # Fallbacks, classified alike on both ranks: ranks disagree; an unknown value; a constructor fails on rank 1.
    wrapper = DeepEPWrapper.create(_config(rank, world, False),
                                   settings=_settings("elastic" if rank else "legacy", True))
    DeepEPWrapper.reset()
    wrapper = DeepEPWrapper.create(_config(rank, world, False), settings=_settings("elastc", True))
    DeepEPWrapper.reset()
    original = ReferenceElasticBuffer.__init__

    def flaky(self: Any, *args: Any, **kwargs: Any) -> None:
        if rank == 1:
            raise RuntimeError("constructor failure (injected)")
        original(self, *args, **kwargs)

    ReferenceElasticBuffer.__init__ = flaky  # type: ignore[method-assign]
    try:
        wrapper = DeepEPWrapper.create(_config(rank, world, False), settings=_settings("elastic", True))
        DeepEPWrapper.reset()
    finally:
        ReferenceElasticBuffer.__init__ = original  # type: ignore[method-assign]

    out["snapshot"] = telemetry.snapshot(harvest=True, wait=True)
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        out["exposition"] = None
    else:
        registry = CollectorRegistry()
        assert telemetry.register(registry) and telemetry.register(registry) == []  # once per registry
        out["exposition"] = generate_latest(registry).decode()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return spawn(_worker, 2, timeout_s=200)


def _expected(rank: int) -> dict[str, Any]:
    """What rank ``rank`` sends and receives per call, computed here from the problem alone."""
    problem = make_problem(SEED, list(TOKENS), HIDDEN, EXPERTS, TOPK)
    world, local = len(TOKENS), EXPERTS // len(TOKENS)
    ids = problem.topk_ids
    dest = torch.where(ids >= 0, ids // local, -1)
    on_rank = dest == rank
    per_expert = [int((ids == rank * local + e).sum()) for e in range(local)]
    sent = ids[problem.rank_slice(rank)]
    per_rank = [int(((sent >= 0) & (sent // local == r)).sum()) for r in range(world)]
    return {"sent": TOKENS[rank], "received_normal": int(on_rank.any(dim=1).sum()),
            "received_ll": int(on_rank.sum()), "expert_imbalance": max(per_expert) * local / sum(per_expert),
            "rank_imbalance": max(per_rank) * world / sum(per_rank)}


@pytest.mark.timeout(240)
def test_off_routers_hold_none_and_nothing_is_recorded(results):
    for r in results:
        assert r["off_metrics"] is None
        snap = r["off_snapshot"]
        assert snap["series"] == [] and snap["decisions"] == {} and snap["fallbacks"] == [], snap


@pytest.mark.timeout(240)
def test_counts_match_what_was_sent_and_received(results):
    samples = (CALLS + EVERY - 1) // EVERY  # the first call is sampled, then every EVERY-th
    received_total = {"normal": 0, "low_latency": 0}
    for rank, r in enumerate(results):
        exp = _expected(rank)
        series = {(s["backend"], s["mode"], s["layer"]): s for s in r["snapshot"]["series"]}
        rebuilt = series.pop(("legacy", "normal", "5"))
        assert r["same_recorder_after_rebuild"] and rebuilt["dispatches"] == 2, rebuilt
        assert set(series) == {(b, m, layer) for b in ("legacy", "elastic")
                               for m, layer in (("normal", "0"), ("normal", "1"), ("low_latency", "all"))}
        for (backend, mode, layer), s in series.items():
            label = f"rank {rank} {backend} {mode} layer {layer}"
            received = exp["received_ll" if mode == "low_latency" else "received_normal"]
            assert (s["dispatches"], s["tokens_sent"], s["tokens_received"]) == (
                CALLS, CALLS * exp["sent"], CALLS * received), label
            assert s["samples"] == samples and s["samples_dropped"] == 0, label
            assert s["expert_imbalance"]["count"] == samples, label
            assert s["expert_imbalance"]["last"] == pytest.approx(exp["expert_imbalance"]), label
            assert s["rank_imbalance"]["last"] == pytest.approx(exp["rank_imbalance"]), label
            rt = s["round_trip_seconds"]
            assert rt["count"] == samples and 0 < rt["min"] <= rt["max"] < 60, label
            assert rt["buckets"][-1] == ["+Inf", samples] or rt["buckets"][-1] == ("+Inf", samples), label
            if backend == "legacy" and layer != "1":
                received_total[mode] += s["tokens_received"]
    # Conservation: every (token, expert) pair sent arrives somewhere exactly once in low-latency mode.
    problem = make_problem(SEED, list(TOKENS), HIDDEN, EXPERTS, TOPK)
    assert received_total["low_latency"] == CALLS * int((problem.topk_ids >= 0).sum())


@pytest.mark.timeout(240)
def test_decisions_buffers_and_fallbacks_are_recorded_alike_on_every_rank(results):
    for rank, r in enumerate(results):
        fallbacks = {(f["requested"], f["resolved"], f["reason"]): f["count"] for f in r["snapshot"]["fallbacks"]}
        assert fallbacks == {
            ("legacy", "legacy", "none"): 3, ("elastic", "elastic", "none"): 2,
            # ranks disagreed: rank 0 asked for legacy, rank 1 for elastic; each label names its own request
            ("elastic" if rank else "legacy", "legacy", "disagreement"): 1,
            ("legacy", "legacy", "unknown_value"): 1,  # 'elastc' parses as legacy, with a warning
            ("elastic", "legacy", "construction"): 1,  # the injected constructor failure on rank 1
        }, (rank, fallbacks)
    for r in results:
        snap = r["snapshot"]
        decision = snap["decisions"]["normal"]  # the last normal-mode wrapper: the injected constructor failure
        assert (decision["requested"], decision["resolved"], decision["fallback_reason"]) == (
            "elastic", "legacy", "construction")
        assert "ranks [1]" in decision["fallback"] and decision["describe"].startswith("requested=elastic")
        buffers = {(b["backend"], b["mode"], b["pool"]): b["bytes"] for b in snap["buffers"]}
        assert set(buffers) == {("legacy", "normal", "nvl"), ("legacy", "normal", "rdma"),
                                ("legacy", "low_latency", "rdma"), ("elastic", "normal", "elastic"),
                                ("elastic", "low_latency", "elastic")}
        assert buffers[("elastic", "normal", "elastic")] > 0 and snap["device_bytes"] == []  # CPU: not measured


EXPOSED = {
    "deepep_switch_backend_info": {"mode", "requested", "requested_mode", "resolved", "fallback_reason", "provider",
                                   "strict"},
    "deepep_switch_fallbacks_total": {"requested", "resolved", "reason"},
    "deepep_switch_dispatches_total": {"backend", "mode", "layer"},
    "deepep_switch_tokens_sent_total": {"backend", "mode", "layer"},
    "deepep_switch_tokens_received_total": {"backend", "mode", "layer"},
    "deepep_switch_samples_dropped_total": {"backend", "mode", "layer"},
    "deepep_switch_expert_imbalance_ratio_bucket": {"backend", "mode", "layer", "le"},
    "deepep_switch_rank_imbalance_ratio_bucket": {"backend", "mode", "layer", "le"},
    "deepep_switch_round_trip_seconds_bucket": {"backend", "mode", "layer", "le"},
    "deepep_switch_round_trip_seconds_count": {"backend", "mode", "layer"},
    "deepep_switch_round_trip_seconds_sum": {"backend", "mode", "layer"},
    "deepep_switch_buffer_bytes": {"backend", "mode", "pool"},
}
BOUNDED = {"backend": {"legacy", "elastic"}, "resolved": {"legacy", "elastic"}, "mode": {"normal", "low_latency"},
           "requested": {"legacy", "elastic", "auto"}, "requested_mode": {"legacy", "elastic", "auto"},
           "reason": set(telemetry.FALLBACK_REASONS), "fallback_reason": set(telemetry.FALLBACK_REASONS),
           "layer": {"all", "0", "1", "5"}, "pool": {"nvl", "rdma", "elastic"}, "provider": {"reference"},
           "strict": {"true", "false"}}


@pytest.mark.timeout(240)
def test_prometheus_exposition_has_the_names_with_bounded_labels(results):
    pytest.importorskip("prometheus_client")
    text = results[0]["exposition"]
    labels_by_name: dict[str, set[frozenset[str]]] = {}
    series = 0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        assert match, line
        name, raw = match.group(1), match.group(2) or ""
        labels = dict(re.findall(r'(\w+)="([^"]*)"', raw))
        labels_by_name.setdefault(name, set()).add(frozenset(labels))
        for key, value in labels.items():
            if key in BOUNDED:
                assert value in BOUNDED[key], line
        series += name == "deepep_switch_dispatches_total"
    for name, expected in EXPOSED.items():
        assert labels_by_name.get(name) == {frozenset(expected)}, (name, labels_by_name.get(name))
    assert series == 2 * 3 + 1  # backends x (two normal layers + one low-latency "all"), and layer 5
    assert "deepep_switch_device_bytes" not in labels_by_name  # CPU: nothing measured, no sample
    assert re.search(r'deepep_switch_tokens_received_total\{backend="legacy",layer="all",mode="low_latency"\} '
                     r'\d+\.0', text)


def test_fallback_reason_classifies_decisions():
    base = resolve_backend(settings=load_settings(backend_raw="elastic", provider="reference"))
    assert telemetry.fallback_reason(base) == "none"
    legacy = Backend.LEGACY
    assert telemetry.fallback_reason(base.model_copy(update={"resolved": legacy})) == "preflight"
    assert telemetry.fallback_reason(base.model_copy(update={"resolved": legacy, "fallback": "boom"})) == "construction"
    split = ConsensusOutcome(world_size=2, rank=0, votes=[{"unknown_backend": 0}] * 2, agreed=False,
                             disagreements={"backend": {"legacy": [0], "elastic": [1]}})
    assert telemetry.fallback_reason(base.model_copy(update={"resolved": legacy, "consensus": split})) == "disagreement"
    typo = split.model_copy(update={"votes": [{"unknown_backend": 1}, {"unknown_backend": 0}]})
    assert telemetry.fallback_reason(base.model_copy(update={"resolved": legacy, "consensus": typo})) == "unknown_value"
    alone = resolve_backend(settings=load_settings(backend_raw="elastc", provider="reference"))
    assert telemetry.fallback_reason(alone) == "unknown_value"


def test_nothing_is_recorded_under_cuda_graph_capture():
    store = telemetry._Store()
    recorder = telemetry.RouterMetrics(store, "legacy", DeepEPMode.NORMAL, 7, torch.device("cpu"), 4, 2, 1)
    recorder._capturing = lambda: True  # what torch.cuda.is_current_stream_capturing() says inside a capture

    class Payload:
        expert_x = torch.zeros(5, 8)
        expert_tokens_meta = type("Meta", (), {"expert_num_tokens": torch.tensor([1, 2, 1, 1], dtype=torch.int32)})

    calls = []
    ids = torch.zeros(3, 2, dtype=torch.int64)
    payload, handle = recorder.prepare(lambda *a: (calls.append("p") or Payload(), "h"), torch.zeros(3, 8), ids, ids)
    recorder.finalize(lambda *a: calls.append("f"), torch.zeros(5, 8), handle, ids, ids)
    series = store.series[("legacy", "normal", "7")]
    assert calls == ["p", "f"] and series.dispatches == 0 and series.round_trip.count == 0
    recorder._capturing = lambda: False
    recorder.prepare(lambda *a: (Payload(), "h"), torch.zeros(3, 8), ids, ids)
    recorder.finalize(lambda *a: None, torch.zeros(5, 8), "h", ids, ids)
    assert (series.dispatches, series.tokens_sent, series.tokens_received, series.round_trip.count) == (1, 3, 5, 1)
    assert series.expert_imbalance.last == pytest.approx(2 * 4 / 5)
    assert series.rank_imbalance.last == pytest.approx(2.0)  # all 6 pairs go to rank 0


def test_collectors_name_the_metrics_extra_when_prometheus_client_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # "import prometheus_client" raises ImportError
    for call in (telemetry.collectors, telemetry.register):
        with pytest.raises(ImportError, match=r"deepep-switch\[metrics\]"):
            call()
    assert isinstance(telemetry.snapshot(), dict)  # the plain snapshot needs nothing


@pytest.mark.parametrize("bad", [-1, "3", True, 1.0])
def test_layer_id_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="layer_id"):
        RouterOptions(layer_id=bad)
    assert RouterOptions(layer_id=3).layer_id == 3 and RouterOptions().layer_id is None


def test_metrics_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RTP_LLM_DEEPEP_METRICS", "1")
    monkeypatch.setenv("RTP_LLM_DEEPEP_METRICS_SAMPLE_EVERY", "8")
    loaded = load_settings()
    assert loaded.settings.metrics is True and loaded.settings.metrics_sample_every == 8
    monkeypatch.setenv("RTP_LLM_DEEPEP_METRICS_SAMPLE_EVERY", "0")
    loaded = load_settings()
    assert loaded.settings.metrics_sample_every == 64 and "METRICS_SAMPLE_EVERY" in loaded.knob_problems[0]
    assert os.environ.get("RTP_LLM_DEEPEP_METRICS") == "1"
