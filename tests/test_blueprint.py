"""The blueprint: what every rank must build identically (the wrapper config but its per-rank fields, and the
environment DeepEP reads while building), carried in the decision's all-gather and compared there."""

from __future__ import annotations

import dataclasses

import pytest

from deepep_switch.blueprint import ABSENT, Blueprint, disagreements, encode_env_value, mismatch, show
from deepep_switch.decision import Vote, agree
from deepep_switch.quant import Quant
from deepep_switch.settings import DEEP_EP_BUILD_ENV, read_deep_ep_environment
from deepep_switch.testing import layer_config
from test_decision import vote

NO_ENV = {name: None for name in DEEP_EP_BUILD_ENV}


def blueprint(rank: int, world: int = 4, env: dict | None = None, **over) -> Blueprint:
    config = dataclasses.replace(layer_config(rank, world, hidden=7168, experts=256, topk=8, capacity=128), **over)
    return Blueprint.local(config, {**NO_ENV, **(env or {})})


def test_per_rank_fields_are_not_compared_everything_else_is():
    assert mismatch([blueprint(r) for r in range(4)]) is None  # ep_rank and local_rank differ by design
    names = Blueprint.names()
    assert "ep_rank" not in names and "local_rank" not in names
    for field in ("hidden_size", "expert_num", "moe_k", "tp_size", "use_deepep_low_latency", "use_deepep_internode",
                  "ll_num_max_token_per_rank", "max_tokens_per_rank", "quant", "EP_DISABLE_GIN"):
        assert field in names


def test_a_difference_names_the_field_the_values_and_the_ranks():
    table = [blueprint(0), blueprint(1, quant=Quant.FP8_BLOCK), blueprint(2), blueprint(3, moe_k=4)]
    assert disagreements(table) == {"moe_k": {"8": [0, 1, 2], "4": [3]},
                                    "quant": {"NONE": [0, 2, 3], "FP8_BLOCK": [1]}}
    message = mismatch(table)
    assert "moe_k: 8 on ranks [0, 1, 2], 4 on ranks [3]" in message
    assert "quant: NONE on ranks [0, 2, 3], FP8_BLOCK on ranks [1]" in message
    assert mismatch(list(reversed(table))) != message  # ranks are named by position, so order matters


@pytest.mark.parametrize("raw", [None, "", "0", "1", "true", "1024", "é", "a" * 7, "b" * 8, "x" * 300])
def test_environment_values_travel_exactly_or_as_a_digest(raw):
    code = encode_env_value(raw)
    assert -(1 << 63) <= code < (1 << 63) and code != ABSENT
    shown = show("EP_DISABLE_GIN", code)
    if raw is None:
        assert shown == "unset"
    elif len(raw.encode()) <= 7:
        assert shown == repr(raw)
    else:
        assert "longer than 7 bytes" in shown and encode_env_value(raw + "!") != code


def test_environment_differences_are_named_like_config_ones():
    table = [blueprint(0, env={"EP_DISABLE_GIN": "1"}), blueprint(1), blueprint(2, env={"EP_DISABLE_GIN": "1"}),
             blueprint(3, env={"EP_DISABLE_GIN": "true"})]
    assert disagreements(table) == {"EP_DISABLE_GIN": {"'1'": [0, 2], "unset": [1], "'true'": [3]}}


def test_the_environment_is_read_when_asked(monkeypatch):
    monkeypatch.setenv("EP_DISABLE_GIN", "1")
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "2048")
    monkeypatch.setenv("ep_disable_gin", "0")  # DeepEP's names are case-sensitive
    env = read_deep_ep_environment()
    assert list(env) == list(DEEP_EP_BUILD_ENV)
    assert env["EP_DISABLE_GIN"] == "1" and env["NVSHMEM_QP_DEPTH"] == "2048" and env["EP_REUSE_NCCL_COMM"] is None
    monkeypatch.delenv("EP_DISABLE_GIN")
    assert read_deep_ep_environment()["EP_DISABLE_GIN"] is None  # never cached


def test_the_vote_carries_the_blueprint_and_agree_reports_the_mismatch():
    same = [dataclasses.replace(vote("elastic"), blueprint=blueprint(r).values) for r in range(3)]
    assert all(Vote.from_ints(v.to_ints()) == v for v in same)
    assert agree(same).mismatch is None
    odd = same[:2] + [dataclasses.replace(same[2], blueprint=blueprint(2, expert_num=128).values)]
    a = agree(odd)
    assert a.mismatch and "expert_num: 256 on ranks [0, 1], 128 on ranks [2]" in a.mismatch
    assert a.error is None  # a different kind of failure: ValueError, raised before anything else
    assert agree([vote("legacy")] * 2).mismatch is None  # no wrapper config: nothing to compare
