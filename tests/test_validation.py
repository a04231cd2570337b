"""RTP_LLM_DEEPEP_VALIDATE: the setting, the agreed knob, the validators, and both routers on every generation
(legacy, elastic, ep) giving the same answer (or the same ValueError) for crafted bad inputs over 2 gloo ranks on the
reference providers, and on 2 GPUs over the generations this process can run (``tests/_generations``).

Failure tests make one rank's input bad and let only that rank call the failing method; the others wait at a
barrier, so a check that communicated by mistake would time out the spawn (a failure, never a hang).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from _generations import GENERATIONS, GPU_ENV, runnable
from _helpers import settings_from_env
from deepep_switch import DeepEPWrapper
from deepep_switch.decision import AGREED_KNOBS, Vote, agree, knob_from_int, knob_to_int, resolve_backend
from deepep_switch.kernels.ids import (TorchIdCleaner, drop_bad_ids_torch, drop_out_of_range_torch, id_cleaner_for,
                                      repeated_ids)
from deepep_switch.launch import spawn
from deepep_switch.settings import Validation, env_name, load_settings
from deepep_switch.testing import (MoEProblem, ToyExperts, dense_reference, layer_config, low_latency_executor,
                                   make_problem, normal_executor, relative_error, run_moe_layer)
from routers import CombineForwardPayload, LowLatencyRouter, NormalRouter, RouterOptions
from routers.validation import FullValidator, OffValidator, check_output, validator_for

TOL = 1e-2
H, E, K = 128, 8, 4            # 2 ranks: 4 local experts each
BAD_ROW = 1                    # the crafted token, on rank 0


# ---------------------------------------------------------------------------------------------- the setting

@pytest.mark.parametrize("raw,expected", [
    (None, Validation.BASIC), ("off", Validation.OFF), (" FULL ", Validation.FULL), ("Basic", Validation.BASIC),
])
def test_validate_setting_parses(monkeypatch, raw, expected):
    if raw is not None:
        monkeypatch.setenv("RTP_LLM_DEEPEP_VALIDATE", raw)
    loaded = load_settings()
    assert loaded.settings.validation is expected and loaded.problems == []
    assert env_name("validation") == "RTP_LLM_DEEPEP_VALIDATE"


@pytest.mark.parametrize("raw", ["strict", "1", "", "on", "ful"])
def test_malformed_validate_warns_and_takes_basic(monkeypatch, caplog, raw):
    monkeypatch.setenv("RTP_LLM_DEEPEP_VALIDATE", raw)
    with caplog.at_level(logging.WARNING):
        loaded = load_settings()
    assert loaded.settings.validation is Validation.BASIC
    assert len(loaded.knob_problems) == 1 and "RTP_LLM_DEEPEP_VALIDATE" in loaded.knob_problems[0]
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def _vote(validation: Validation, strict: bool = False) -> Vote:
    settings = load_settings(validation=validation, strict=strict, provider="reference")
    return Vote.local(settings, resolve_backend(settings=settings).preflight)


def test_validation_is_an_agreed_knob():
    assert "validation" in AGREED_KNOBS
    for mode in Validation:
        assert knob_from_int("validation", knob_to_int(mode)) is mode
    same = agree([_vote(Validation.FULL)] * 3)
    assert same.knobs["validation"] is Validation.FULL and not same.disagreements
    skew = agree([_vote(Validation.FULL), _vote(Validation.OFF), _vote(Validation.FULL)])
    assert skew.knobs["validation"] is Validation.BASIC and skew.error is None
    assert skew.disagreements["validation"] == {"full": [0, 2], "off": [1]}
    assert "RTP_LLM_DEEPEP_VALIDATE" in skew.reasons[0] and "default basic" in skew.reasons[0]
    assert agree([_vote(Validation.FULL, strict=True), _vote(Validation.OFF)]).error


def test_decision_carries_the_typed_mode(monkeypatch):
    monkeypatch.setenv("DEEPEP_SWITCH_PROVIDER", "reference")
    monkeypatch.setenv("RTP_LLM_DEEPEP_VALIDATE", "full")
    assert resolve_backend().settings.validation is Validation.FULL


# ---------------------------------------------------------------------------------------------- validators

def clean_reference(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """What basic mode promises, in plain Python: ids outside [0, E) and repeats of an earlier id become -1."""
    out = ids.clone().to(torch.int64)
    for t in range(ids.shape[0]):
        seen: set[int] = set()
        for k in range(ids.shape[1]):
            v = int(ids[t, k])
            if v < 0 or v >= experts or v in seen:
                out[t, k] = -1
            else:
                seen.add(v)
    return out


def test_basic_clean_ids_matches_the_plain_python_rule():
    gen = torch.Generator().manual_seed(3)
    for topk in (1, 2, 4, 8, 32):
        v = validator_for(Validation.BASIC, H, topk, 64, None)
        ids = torch.randint(-70, 140, (300, topk), generator=gen)
        ids[::3] = torch.randint(-1, 6, (100, topk), generator=gen)   # many repeats
        ids[5] = torch.tensor([64, 64 + 100, -5, 2**40][:topk] + [-1] * (topk - 4))[:topk]
        before = ids.clone()
        got = v.clean_ids(ids)
        assert got.dtype == torch.int64 and torch.equal(got, clean_reference(ids, 64)), topk
        assert torch.equal(ids, before)  # the caller's tensor is never modified
    empty = torch.empty((0, 4), dtype=torch.int64)
    assert validator_for(Validation.BASIC, H, 4, 8, None).clean_ids(empty).shape == (0, 4)


def test_torch_cleaners_and_their_binding_off_cuda():
    ids = torch.tensor([[8, -5, 3, 3], [1, 2, 1, -1], [7, 108, -1, 7]])
    assert drop_bad_ids_torch(ids, E).tolist() == [[-1, -1, 3, -1], [1, 2, -1, -1], [7, -1, -1, -1]]
    assert drop_out_of_range_torch(ids, E).tolist() == [[-1, -1, 3, 3], [1, 2, 1, -1], [7, -1, -1, 7]]
    name, clean = id_cleaner_for(torch.device("cpu"), K, E)
    assert name == "torch" and torch.equal(clean(ids), drop_bad_ids_torch(ids, E))
    name, clean = id_cleaner_for(torch.device("cpu"), 1, E)  # nothing can repeat with one id per row
    assert name == "torch" and clean(ids[:, :1]).tolist() == [[-1], [1], [7]]
    assert validator_for(Validation.BASIC, H, K, E, None).kernel == "torch"
    assert validator_for(Validation.OFF, H, K, E, None).kernel is None


def test_fused_torch_cleaner_matches_the_reference():
    gen = torch.Generator().manual_seed(3)
    for topk in (2, 4, 8, 11):
        cleaner = TorchIdCleaner(topk, 16, torch.device("cpu"))
        for tokens in (0, 1, 7, 300):
            ids = torch.randint(-3, 19, (tokens, topk), generator=gen)
            ids[::2] = torch.randint(-1, 4, (ids[::2].shape[0], topk), generator=gen)  # many repeats
            strided = torch.randint(-3, 19, (topk, tokens), generator=gen).t()
            for x in (ids, strided, ids[:, :1].expand(tokens, topk)):
                before = x.clone()
                assert torch.equal(cleaner(x), drop_bad_ids_torch(x, 16)), (topk, tokens)
                assert torch.equal(x, before)


def test_repeated_ids_flags_later_occurrences_only():
    ids = torch.tensor([[3, 1, 3, 3], [-1, -1, 2, 5], [0, 1, 2, 3]])
    assert repeated_ids(ids).tolist() == [[False, False, True, True], [False, True, False, False], [False] * 4]


def test_off_leaves_ids_alone_and_full_cleans_like_basic():
    ids = torch.tensor([[8, 3, 3, -5]])
    assert validator_for(Validation.OFF, H, 4, 8, None).clean_ids(ids) is ids
    assert type(validator_for(Validation.OFF, H, 4, 8, None)) is OffValidator
    full = validator_for(Validation.FULL, H, 4, 8, None)
    assert isinstance(full, FullValidator) and full.clean_ids(ids).tolist() == [[-1, 3, -1, -1]]


def test_full_skips_its_host_sync_while_a_graph_is_captured(caplog):
    a1, w, ids = _inputs()
    ids[0, 0] = E
    full = validator_for(Validation.FULL, H, K, E, None)
    full._capturing = lambda: True
    with caplog.at_level(logging.WARNING):
        full.check_values(a1, w, ids)
        full.check_values(a1, w, ids)
    assert sum("CUDA graph capture" in r.getMessage() for r in caplog.records) == 1
    full._capturing = lambda: False
    with pytest.raises(ValueError):
        full.check_values(a1, w, ids)


def _inputs(tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.zeros((tokens, H), dtype=torch.bfloat16), torch.ones((tokens, K)),
            torch.arange(K).repeat(tokens, 1))


@pytest.mark.parametrize("mutate,message", [
    (lambda a, w, i: i.__setitem__((2, 1), E), ["topk_ids[2, 1] = 8", "token 2", "[-1, 8)"]),
    (lambda a, w, i: i.__setitem__((2, 3), -5), ["topk_ids[2, 3] = -5", "token 2"]),
    (lambda a, w, i: i.__setitem__((1, 0), E + 100), ["topk_ids[1, 0] = 108", "token 1"]),
    (lambda a, w, i: i.__setitem__((2, 3), 1), ["topk_ids[2]", "token 2", "expert 1 twice", "slots 1 and 3"]),
    (lambda a, w, i: a.__setitem__((1, 7), float("nan")), ["a1[1, 7] = nan", "token 1"]),
    (lambda a, w, i: w.__setitem__((2, 0), float("-inf")), ["topk_weights[2, 0] = -inf", "token 2"]),
])
def test_full_names_argument_token_and_value(mutate, message):
    a1, w, ids = _inputs()
    mutate(a1, w, ids)
    v = validator_for(Validation.FULL, H, K, E, None)
    with pytest.raises(ValueError) as info:
        v.check_values(a1, w, ids.to(torch.int32))
    assert all(part in str(info.value) for part in message), str(info.value)
    validator_for(Validation.BASIC, H, K, E, None).check_values(a1, w, ids)  # basic never syncs: no error
    validator_for(Validation.OFF, H, K, E, None).check_values(a1, w, ids)


def test_full_accepts_minus_one_repeats_and_empty_batches():
    a1, w, ids = _inputs()
    ids[1] = torch.tensor([-1, 2, -1, -1])
    v = validator_for(Validation.FULL, H, K, E, None)
    v.check_values(a1, w, ids)
    v.check_values(*_inputs(0))


@pytest.mark.parametrize("bad,word", [
    (lambda a, w, i: (a.half(), w, i), "a1 must be bf16"),
    (lambda a, w, i: (a[:, :64], w, i), "a1 must be bf16"),
    (lambda a, w, i: (a[0], w, i), "a1 must be bf16"),
    (lambda a, w, i: (a, w[:, :2], i), "topk_ids/topk_weights"),
    (lambda a, w, i: (a, w, i[:2]), "topk_ids/topk_weights"),
    (lambda a, w, i: (a, w.double(), i), "float32"),
    (lambda a, w, i: (a, w, i.to(torch.int16)), "int32 or int64"),
    (lambda a, w, i: (a, w.to("meta"), i), "must be on cpu"),
])
def test_basic_host_checks(bad, word):
    v = validator_for(Validation.BASIC, H, K, E, None)
    assert v.check_inputs(*_inputs()) == 3
    with pytest.raises(ValueError, match=word):
        v.check_inputs(*bad(*_inputs()))
    assert validator_for(Validation.OFF, H, K, E, None).check_inputs(*_inputs(5)) == 5  # off: no checks


def test_basic_host_checks_pin_the_device_for_real_deep_ep():
    v = validator_for(Validation.BASIC, H, K, E, torch.device("meta"))
    with pytest.raises(ValueError, match="must be on meta"):
        v.check_inputs(*_inputs())


def test_check_output_says_what_was_expected_and_what_came():
    cpu = torch.device("cpu")
    check_output(torch.zeros((5, H), dtype=torch.bfloat16), torch.Size([5, H]), cpu)
    check_output(torch.empty((0, H), dtype=torch.bfloat16), torch.Size([0, H]), cpu)  # rtp-llm: nothing arrived
    for y in (torch.zeros((4, H), dtype=torch.bfloat16), torch.zeros((5, H)), torch.zeros((5, H - 1), dtype=torch.bfloat16),
              torch.zeros((5, H), dtype=torch.bfloat16, device="meta")):
        with pytest.raises(ValueError) as info:
            check_output(y, torch.Size([5, H]), cpu)
        text = str(info.value)
        assert f"bf16 [5, {H}] on cpu" in text and f"got {y.dtype} {list(y.shape)} on {y.device}" in text


# ---------------------------------------------------------------------------------------------- 2 ranks
# The workers run on 2 gloo ranks with the reference providers (CPU) here, and unchanged on 2 GPUs with real
# DeepEP (``gpu`` tests below, hidden 2048: real legacy low-latency kernels exist for a fixed set of sizes).

GPU_H = 2048
# The clean_settings fixture removes EP_DISABLE_GIN before each test body runs; the GPU ranks need the value the
# device's install script set (single-node ElasticBuffer/EPBuffer without an RDMA NIC), read at collection.
_GPU_ENV = GPU_ENV
CRAFTED = ("int64", "int32", "empty_batch", "empty_everywhere", "id_minus_5", "nan_x", "inf_weight", "id_eq_E",
           "id_E_plus_100", "duplicate")
BAD_IDS = ("id_minus_5", "id_eq_E", "id_E_plus_100", "duplicate")
NON_FINITE = ("nan_x", "inf_weight")
# off passes ids to DeepEP as given: only inputs every generation treats alike (ids < -1 count as -1 everywhere).
RUNS = {
    Validation.OFF: ("int64", "int32", "empty_batch", "empty_everywhere", "id_minus_5") + NON_FINITE,
    Validation.BASIC: CRAFTED,
    Validation.FULL: CRAFTED,
}
FULL_RAISES = BAD_IDS + NON_FINITE
FULL_MESSAGES = {  # what the ValueError must name (argument, token, value)
    "id_eq_E": "topk_ids[1, 0] = 8 (token 1)", "id_minus_5": "topk_ids[1, 1] = -5 (token 1)",
    "id_E_plus_100": "topk_ids[1, 2] = 108 (token 1)", "duplicate": "topk_ids[1] (token 1) names expert 0 twice",
    "nan_x": "a1[1, 7] = nan (token 1)", "inf_weight": "topk_weights[1, 1] = inf (token 1)",
}


def crafted_problem(name: str, hidden: int = H) -> MoEProblem:
    """Both ranks' tokens; for the bad cases, token ``BAD_ROW`` of rank 0 carries the defect."""
    tokens = {"empty_batch": [0, 5], "empty_everywhere": [0, 0]}.get(name, [6, 5])
    p = make_problem(41, tokens, hidden, E, K)
    if tokens[0] > BAD_ROW:
        p.topk_ids[BAD_ROW] = torch.tensor([0, 5, 2, 7])      # experts on both ranks
    mutate = {
        "id_eq_E": lambda: p.topk_ids.__setitem__((BAD_ROW, 0), E),
        "id_minus_5": lambda: p.topk_ids.__setitem__((BAD_ROW, 1), -5),
        "id_E_plus_100": lambda: p.topk_ids.__setitem__((BAD_ROW, 2), E + 100),
        "duplicate": lambda: p.topk_ids.__setitem__((BAD_ROW, 3), 0),
        "nan_x": lambda: p.x.__setitem__((BAD_ROW, 7), float("nan")),
        "inf_weight": lambda: p.topk_weights.__setitem__((BAD_ROW, 1), float("inf")),
    }.get(name)
    if mutate:
        mutate()
    return p


def _device(cuda: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _local(p: MoEProblem, rank: int, name: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    x, ids, w = p.local(rank, device)
    return x, (ids.to(torch.int32) if name == "int32" else ids), w


def _router(rank: int, world: int, backend: str, mode: Validation, low_latency: bool, hidden: int = H) -> Any:
    cfg = layer_config(rank, world, hidden=hidden, experts=E, topk=K, capacity=8, low_latency=low_latency)
    settings = settings_from_env(RTP_LLM_DEEPEP_BACKEND=backend, RTP_LLM_DEEPEP_VALIDATE=mode.value)
    wrapper = DeepEPWrapper.create(cfg, settings=settings)
    router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper, RouterOptions())
    assert router.backend.value == backend
    return router


def _capture(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as exc:  # the parent checks type and message
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _host(t: Any) -> Any:
    return t.cpu() if torch.is_tensor(t) else t


def _equivalence_worker(rank: int, world: int, hidden: int = H, cuda: bool = False,
                        backends: tuple[str, ...] = GENERATIONS) -> dict:
    if not cuda:
        os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    device = _device(cuda)
    experts = ToyExperts(5, E, hidden, device)
    out: dict = {}
    for mode, names in RUNS.items():
        for low_latency in (False, True):
            for backend in backends:
                router = _router(rank, world, backend, mode, low_latency, hidden)
                try:
                    assert router.validation is mode
                    for name in names:
                        p = crafted_problem(name, hidden)
                        x, ids, w = _local(p, rank, name, device)
                        key = (mode.value, "ll" if low_latency else "normal", backend, name)
                        if mode is Validation.FULL and name in FULL_RAISES:
                            # Only the bad rank calls prepare: it must raise before communicating.
                            if rank == 0:
                                out[key] = _capture(lambda: router.prepare(x, None, None, w, ids))
                                out[key + ("closed",)] = router.handle is None
                            dist.barrier()
                            continue
                        out[key] = _host(run_moe_layer(router, x, ids, w, experts, rank))
                        out[key + ("closed",)] = router.handle is None
                finally:
                    DeepEPWrapper.reset()
    # The ranks must agree on the mode: a skewed environment gives every rank the default.
    skew = _router(rank, world, backends[-1], Validation.FULL if rank == 0 else Validation.OFF, False, hidden)
    out["skew"] = (skew.validation, skew.wrapper.decision.reasons)
    DeepEPWrapper.reset()
    return out


def _assert_same(out: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    """Same non-finite pattern (NaN and ±inf where the reference has them), finite values within bf16."""
    assert out.shape == ref.shape and out.dtype == torch.bfloat16, label
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), label
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)), label
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), label
    finite = torch.isfinite(ref).all(dim=1)
    if finite.any():
        assert relative_error(out[finite], ref[finite]) <= TOL, (label, relative_error(out[finite], ref[finite]))


def check_equivalence(results: list[dict], hidden: int, backends: tuple[str, ...] = GENERATIONS) -> None:
    """Every mode: every generation and both routers equal the dense MoE on basic's cleaned ids (NaN/Inf alike), and
    each equals the first generation's output (legacy where it runs)."""
    experts = ToyExperts(5, E, hidden)
    for rank, out in enumerate(results):
        for mode, names in RUNS.items():
            for name in names:
                if mode is Validation.FULL and name in FULL_RAISES:
                    continue
                p = crafted_problem(name, hidden)
                cleaned = MoEProblem(p.x, clean_reference(p.topk_ids, E), p.topk_weights, p.tokens_per_rank)
                dense = dense_reference(cleaned, experts)[p.rank_slice(rank)]
                for router in ("normal", "ll"):
                    label = f"rank {rank} {mode.value} {router} {name}"
                    first = out[(mode.value, router, backends[0], name)]
                    for backend in backends:
                        result = out[(mode.value, router, backend, name)]
                        _assert_same(result, dense, f"{label} {backend} vs dense")
                        _assert_same(result, first.float(), f"{label} {backend} vs {backends[0]}")
                        assert out[(mode.value, router, backend, name, "closed")], (label, backend)
                if name in NON_FINITE and rank == 0:  # the defect really reached the output
                    for backend in backends:
                        assert not torch.isfinite(out[(mode.value, "normal", backend, name)][BAD_ROW]).all(), backend


def check_full_errors(results: list[dict], backends: tuple[str, ...] = GENERATIONS) -> None:
    """full: the bad rank's ValueError is the same on every generation and router; the other rank never
    dispatched."""
    r0 = results[0]
    for name in FULL_RAISES:
        messages = {r0[("full", router, backend, name)] for router in ("normal", "ll") for backend in backends}
        assert len(messages) == 1, messages
        message = messages.pop()
        assert message.startswith("ValueError: ") and FULL_MESSAGES[name] in message, message
        for router in ("normal", "ll"):
            for backend in backends:
                assert r0[("full", router, backend, name, "closed")]  # nothing left open
    assert not any(isinstance(key, tuple) and key[0] == "full" and key[3] in FULL_RAISES
                   for key in results[1])  # rank 1 never called prepare for those


def check_skew(results: list[dict]) -> None:
    """Ranks whose RTP_LLM_DEEPEP_VALIDATE differs all run the default, basic, and say why."""
    for mode, reasons in (out["skew"] for out in results):
        assert mode is Validation.BASIC
        assert any("RTP_LLM_DEEPEP_VALIDATE" in r and "default basic" in r for r in reasons), reasons


@pytest.fixture(scope="module")
def equivalence() -> list[dict]:
    return spawn(_equivalence_worker, 2, timeout_s=200)


@pytest.mark.timeout(240)
def test_every_mode_gives_the_same_result_on_every_generation(equivalence):
    check_equivalence(equivalence, H)


@pytest.mark.timeout(240)
def test_full_raises_the_same_value_error_on_every_generation_before_communicating(equivalence):
    check_full_errors(equivalence)


@pytest.mark.timeout(240)
def test_ranks_that_disagree_on_the_mode_all_use_basic(equivalence):
    check_skew(equivalence)


# ---------------------------------------------------------------------------------------------- finalize (D)

def _executor(router: Any, payload: Any, experts: ToyExperts, rank: int) -> CombineForwardPayload:
    if payload.expert_x.dim() == 3:
        return low_latency_executor(payload, experts, rank)
    if payload.expert_x.shape[0] == 0:  # rtp-llm skips the executor and passes [0, H] bf16
        return CombineForwardPayload(torch.empty_like(payload.expert_x, dtype=torch.bfloat16))
    return normal_executor(payload, experts, rank, router.num_local_experts)


def _bad_outputs(y: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = y[..., :-1, :] if y.shape[-2] else torch.zeros((1, *y.shape[1:]), dtype=y.dtype, device=y.device)
    return {"rows": rows, "dtype": y.float(), "hidden": y[..., :-1].contiguous()}


def _finalize_worker(rank: int, world: int, hidden: int = H, cuda: bool = False,
                     backends: tuple[str, ...] = GENERATIONS) -> dict:
    if not cuda:
        os.environ["DEEPEP_SWITCH_PROVIDER"] = "reference"
    device = _device(cuda)
    experts = ToyExperts(9, E, hidden, device)
    out: dict = {}
    for mode in Validation:
        for low_latency in (False, True):
            for backend in backends:
                key = (mode.value, "ll" if low_latency else "normal", backend)
                router = _router(rank, world, backend, mode, low_latency, hidden)
                try:
                    assert router.validation is mode
                    for name in ("int64", "empty_batch"):
                        p = crafted_problem(name, hidden)
                        x, ids, w = _local(p, rank, name, device)
                        payload = router.prepare(x, None, None, w, ids)
                        good = _executor(router, payload, experts, rank)
                        args = (payload.expert_topk_weights, payload.expert_topk_ids, False,
                                {"original_num_tokens": x.shape[0]})
                        if rank == 0:  # only rank 0 hands back a wrong output; rank 1 waits at the barrier
                            for bad, y in _bad_outputs(good.fused_expert_output).items():
                                out[key + (name, bad)] = _capture(
                                    lambda: router.finalize(CombineForwardPayload(y), *args))
                            out[key + (name, "still_open")] = router.handle is not None
                            out[key + (name, "prepare")] = _capture(lambda: router.prepare(x, None, None, w, ids))
                            out[key + (name, "expected")] = list(payload.expert_x.shape)
                        dist.barrier()
                        # The retry completes the combine every rank takes part in.
                        out[key + (name, "retry")] = _host(router.finalize(good, *args))
                        out[key + (name, "closed")] = router.handle is None
                        out[key + (name, "next")] = _host(run_moe_layer(router, x, ids, w, experts, rank))
                finally:
                    DeepEPWrapper.reset()
    return out


def check_finalize(results: list[dict], hidden: int, backends: tuple[str, ...] = GENERATIONS) -> None:
    experts = ToyExperts(9, E, hidden)
    for rank, out in enumerate(results):
        for mode in Validation:
            for router in ("normal", "ll"):
                for backend in backends:
                    for name in ("int64", "empty_batch"):
                        key = (mode.value, router, backend, name)
                        label = " ".join(key)
                        p = crafted_problem(name, hidden)
                        dense = dense_reference(p, experts)[p.rank_slice(rank)]
                        _assert_same(out[key + ("retry",)], dense, label + " retry")
                        _assert_same(out[key + ("next",)], dense, label + " next")
                        assert out[key + ("closed",)], label
                        if rank:
                            continue
                        expected = out[key + ("expected",)]
                        for bad in ("rows", "dtype", "hidden"):
                            text = out[key + (bad,)]
                            assert text.startswith("ValueError: finalize") and f"bf16 {expected}" in text, (label, text)
                            assert "got " in text and "still open" in text, (label, text)
                        assert out[key + ("still_open",)], label
                        text = out[key + ("prepare",)]
                        assert text.startswith("RuntimeError") and "rejected the executor's output" in text, text


@pytest.mark.timeout(240)
def test_finalize_rejects_a_wrong_output_before_combining_and_can_be_retried():
    check_finalize(spawn(_finalize_worker, 2, timeout_s=200), H)


# ---------------------------------------------------------------------------------------------- GPUs
# Marked gpu so that ``scripts/gpu-validate.sh validation`` (pytest -m gpu) runs them on the device.

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", [Validation.BASIC, Validation.FULL])
def test_checks_and_id_clean_up_capture_in_a_cuda_graph(mode):
    """basic's host checks and device clean-up, and full under capture, record no host sync: a CUDA graph holds
    them and every replay cleans the ids then in its static input."""
    device = _device(True)
    v = validator_for(mode, GPU_H, K, E, device)
    assert v.kernel == ("triton" if importlib.util.find_spec("triton") else "torch")
    a1 = torch.zeros((64, GPU_H), dtype=torch.bfloat16, device=device)
    w = torch.ones((64, K), device=device)
    ids = torch.zeros((64, K), dtype=torch.int64, device=device)

    def step() -> torch.Tensor:
        v.check_inputs(a1, w, ids)
        v.check_values(a1, w, ids)
        return v.clean_ids(ids)

    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in basic raises
    try:
        if mode is Validation.BASIC:
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        v.clean_ids(ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        new = torch.randint(-20, 2 * E, (64, K), generator=gen)
        new[::2] = torch.randint(-1, 3, (32, K), generator=gen)
        ids.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out.cpu(), clean_reference(new, E))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not importlib.util.find_spec("triton"),
                    reason="needs a CUDA GPU and Triton")
def test_triton_id_clean_up_equals_the_torch_one():
    from deepep_switch.kernels.triton_ids import drop_bad_ids_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    for topk in (2, 4, 8, 9, 32):
        for tokens in (0, 1, 5, 128, 4096, 70000):
            ids = torch.randint(-40, 600, (tokens, topk), device="cuda", generator=gen)
            ids[::2] %= 6  # many repeats
            strided = ids.t().contiguous().t()
            for x in (ids, strided):
                assert torch.equal(drop_bad_ids_triton(x, 256), drop_bad_ids_torch(x, 256)), (topk, tokens)


def _gpu_backends() -> tuple[str, ...]:
    """The generations this process can run on real DeepEP (legacy and elastic on DeepEP 2.1's stack, legacy and ep
    on 2.5's); skip when there are none."""
    backends = runnable()
    if not backends:
        pytest.skip("no DeepEP generation can run in this process")
    return backends


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_every_mode_gives_the_same_result_on_every_runnable_generation():
    backends = _gpu_backends()
    results = spawn(_equivalence_worker, 2, args=(GPU_H, True, backends), backend="nccl", env=_GPU_ENV,
                    timeout_s=560)
    check_equivalence(results, GPU_H, backends)
    check_full_errors(results, backends)
    check_skew(results)


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_finalize_rejects_a_wrong_output_before_combining():
    backends = _gpu_backends()
    check_finalize(spawn(_finalize_worker, 2, args=(GPU_H, True, backends), backend="nccl", env=_GPU_ENV,
                         timeout_s=560), GPU_H, backends)
