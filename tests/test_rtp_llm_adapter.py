"""``routers.rtp_llm`` against a minimal stand-in of rtp-llm's router interface (alibaba/rtp-llm@4b8d39cd).

The stand-in provides only what the adapter imports. It is installed in ``sys.modules``: through monkeypatch in
this process, and directly in the spawned ranks of the end-to-end test.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

import routers
from deepep_switch.wrapper import DeepEPWrapper

FUSED_MOE = "rtp_llm.models_py.modules.factory.fused_moe"


# ---------------------------------------------------------------------------------------------- the stand-in
class RouterType(Enum):
    BATCHED_DATA = 0
    DEEPGEMM_CONTINUOUS = 1
    DEEPEP_NORMAL = 2
    DEEPEP_LOW_LATENCY = 4
    PURE_TP = 5
    MORI_EP_INTRANODE = 6
    MORI_EP_INTERNODE = 7


@dataclass
class ExpertTokensMetadata:
    expected_m: Optional[int] = None
    expert_num_tokens: Optional[torch.Tensor] = None
    expert_num_tokens_cpu: Optional[Any] = None


@dataclass
class ExpertForwardPayload:
    expert_x: torch.Tensor
    expert_x_origin_dtype: Optional[torch.dtype] = None
    expert_x_scale: Optional[torch.Tensor] = None
    expert_tokens_meta: Optional[ExpertTokensMetadata] = None
    expert_topk_ids: Optional[torch.Tensor] = None
    expert_topk_weights: Optional[torch.Tensor] = None
    expert_ids_are_local: bool = False


@dataclass
class CombineForwardPayload:
    fused_expert_output: torch.Tensor


class FusedMoeDataRouter(ABC):
    def __init__(self, config: Any, quant_config: Any) -> None:
        self.config = config
        self.quant_config = quant_config
        self.tp_size = config.tp_size

    @property
    def tp_collective_size(self) -> int:
        return self.config.tp_size

    @classmethod
    def router_type(cls) -> RouterType:
        raise NotImplementedError

    @property
    def supports_skip_tp_allreduce(self) -> bool:
        return False

    @classmethod
    def check_conditions(cls, checker: Any, config: Any) -> None:
        raise NotImplementedError

    @abstractmethod
    def prepare(self, a1, a1_scale, a2_scale, topk_weights, topk_ids) -> ExpertForwardPayload:
        raise NotImplementedError

    @abstractmethod
    def finalize(self, payload, topk_weights, topk_ids, apply_router_weight_on_input, extra_finalize_args):
        raise NotImplementedError


class ConditionChecker:
    def __init__(self, name: str = "test") -> None:
        self.name = name
        self.results: list[tuple[bool, dict[str, Any]]] = []

    def check(self, result: bool, **details: Any) -> bool:
        self.results.append((bool(result), details))
        return result

    def all_passed(self) -> bool:
        return all(r for r, _ in self.results)


class MoeConfigResolver:
    @staticmethod
    def get_quant_method(config: Any) -> Optional[str]:
        qc = config.model_config.quant_config
        return None if qc is None else qc.get_method()

    @staticmethod
    def is_ep_enabled(config: Any) -> bool:
        return config.ep_size > 1

    @staticmethod
    def use_low_latency(config: Any) -> bool:
        return config.moe_config.use_deepep_low_latency


class Group(Enum):
    DP = "DP"
    TP = "TP"
    DP_AND_TP = "DP_AND_TP"


def _get_group(group: Group) -> dist.ProcessGroup:
    assert group is Group.TP
    return dist.group.WORLD  # the end-to-end test's attention-TP group is the whole (2-rank) world


SM = {"value": (9, 0)}


def get_sm() -> tuple[int, int]:
    return SM["value"]


@dataclass
class FusedMoEQuantConfig:
    quant_dtype: Any = None
    per_act_token_quant: bool = False
    block_shape: Optional[list[int]] = None

    @property
    def is_quantized(self) -> bool:
        return self.quant_dtype is not None

    @property
    def is_block_quantized(self) -> bool:
        return self.block_shape is not None

    @property
    def is_per_act_token(self) -> bool:
        return self.per_act_token_quant


@dataclass
class QuantizationConfig:
    method: str

    def get_method(self) -> str:
        return self.method

    def is_quanted(self) -> bool:
        return True


NO_QUANT = FusedMoEQuantConfig()
FP8_BLOCK = FusedMoEQuantConfig(quant_dtype=torch.float8_e4m3fn, block_shape=[128, 128])


def standin_modules() -> dict[str, types.ModuleType]:
    """Every module path the adapter imports, plus its parent packages."""
    contents: dict[str, dict[str, Any]] = {
        f"{FUSED_MOE}.defs.fused_moe": dict(
            FusedMoeDataRouter=FusedMoeDataRouter, ExpertForwardPayload=ExpertForwardPayload,
            ExpertTokensMetadata=ExpertTokensMetadata, CombineForwardPayload=CombineForwardPayload),
        f"{FUSED_MOE}.defs.type": dict(RouterType=RouterType),
        f"{FUSED_MOE}.defs.quant_config": dict(FusedMoEQuantConfig=FusedMoEQuantConfig),
        f"{FUSED_MOE}.utils.config_resolver": dict(MoeConfigResolver=MoeConfigResolver),
        f"{FUSED_MOE}.utils.condition_checker": dict(ConditionChecker=ConditionChecker),
        "rtp_llm.models_py.utils.arch": dict(get_sm=get_sm),
        "rtp_llm.models_py.distributed.collective_torch": dict(Group=Group, _get_group=_get_group),
    }
    modules: dict[str, types.ModuleType] = {}
    for path, attrs in contents.items():
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in modules:
                modules[name] = types.ModuleType(name)
                modules[name].__path__ = []  # type: ignore[attr-defined]  # a package, so children import
                if i > 1:
                    setattr(modules[".".join(parts[:i - 1])], parts[i - 1], modules[name])
        modules[path].__dict__.update(attrs)
    return modules


def make_config(*, ep_size: int = 2, ep_rank: int = 0, tp_size: int = 1, tp_rank: int = 0, low_latency: bool = False,
                quant_method: Optional[str] = None, hidden: int = 256, experts: int = 8, topk: int = 2,
                ll_num_max_token: int = 16) -> types.SimpleNamespace:
    """A ``MoEConfigAdapter`` look-alike with the attributes the adapter and ``from_config_adapter`` read."""
    quant = QuantizationConfig(quant_method) if quant_method else None
    world = max(ep_size, tp_size)
    return types.SimpleNamespace(
        ep_size=ep_size, ep_rank=ep_rank, tp_size=tp_size, tp_rank=tp_rank, world_size=world, expert_num=experts,
        moe_k=topk, hidden_size=hidden, ll_num_max_token=ll_num_max_token, quant_config=quant,
        model_config=types.SimpleNamespace(hidden_size=hidden, expert_num=experts, moe_k=topk, quant_config=quant),
        parallelism_config=types.SimpleNamespace(ep_rank=ep_rank, ep_size=ep_size, tp_size=tp_size, tp_rank=tp_rank,
                                                 local_rank=ep_rank, world_size=world),
        moe_config=types.SimpleNamespace(deep_ep_num_sm=0, use_deepep_low_latency=low_latency,
                                         use_deepep_internode=False, use_deepep_moe=True),
    )


def load_adapter() -> types.ModuleType:
    """Import ``routers.rtp_llm`` afresh (after the stand-in, or its absence, is in place)."""
    sys.modules.pop("routers.rtp_llm", None)
    return importlib.import_module("routers.rtp_llm")


# ---------------------------------------------------------------------------------------------- fixtures
def install_standin(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, module in standin_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(SM, "value", (9, 0))


@pytest.fixture
def restore_adapter():
    """Undo this test's import of ``routers.rtp_llm`` afterwards (module cache and package attribute)."""
    saved = sys.modules.pop("routers.rtp_llm", None), routers.__dict__.pop("rtp_llm", None)
    yield
    sys.modules.pop("routers.rtp_llm", None)
    routers.__dict__.pop("rtp_llm", None)
    if saved[0] is not None:
        sys.modules["routers.rtp_llm"] = saved[0]
    if saved[1] is not None:
        routers.rtp_llm = saved[1]  # type: ignore[attr-defined]


@pytest.fixture
def adapter(monkeypatch: pytest.MonkeyPatch, restore_adapter: None) -> types.ModuleType:
    install_standin(monkeypatch)
    monkeypatch.setattr(DeepEPWrapper, "supported", classmethod(lambda cls: True))
    return load_adapter()


def checks(router_cls: type, config: Any) -> list[bool]:
    checker = ConditionChecker(router_cls.__name__)
    router_cls.check_conditions(checker, config)
    return [r for r, _ in checker.results]


# ---------------------------------------------------------------------------------------------- import
def test_without_rtp_llm_the_module_imports_cleanly(monkeypatch: pytest.MonkeyPatch, restore_adapter: None) -> None:
    monkeypatch.setitem(sys.modules, "rtp_llm", None)  # makes `import rtp_llm...` raise ImportError
    module = load_adapter()
    assert module.RTP_LLM_AVAILABLE is False
    assert module.ROUTERS == ()
    assert module.__all__ == ["RTP_LLM_AVAILABLE", "ROUTERS", "init_deepep_wrapper", "install", "wrapper_config_for"]
    for name in ("SwitchDeepepNormalRouterNoQuant", "SwitchDeepepNormalRouterFp8PerBlock",
                 "SwitchDeepEpLowLatencyRouter"):
        assert not hasattr(module, name)
    with pytest.raises(ImportError):  # what makes rtp-llm's MoeStrategy.can_handle skip the strategy
        exec("from routers.rtp_llm import SwitchDeepepNormalRouterNoQuant", {})


def test_with_the_standin_the_routers_subclass_fused_moe_data_router(adapter: types.ModuleType) -> None:
    assert adapter.RTP_LLM_AVAILABLE is True
    names = ["SwitchDeepepNormalRouterNoQuant", "SwitchDeepepNormalRouterFp8PerBlock", "SwitchDeepEpLowLatencyRouter"]
    assert [c.__name__ for c in adapter.ROUTERS] == names
    assert set(names) <= set(adapter.__all__)
    for cls in adapter.ROUTERS:
        assert issubclass(cls, FusedMoeDataRouter)
        assert cls.__module__ == "routers.rtp_llm" and getattr(adapter, cls.__qualname__) is cls
        assert not getattr(cls, "__abstractmethods__", None)  # prepare and finalize are implemented
    assert adapter.SwitchDeepepNormalRouterNoQuant.router_type() is RouterType.DEEPEP_NORMAL
    assert adapter.SwitchDeepepNormalRouterFp8PerBlock.router_type() is RouterType.DEEPEP_NORMAL
    assert adapter.SwitchDeepEpLowLatencyRouter.router_type() is RouterType.DEEPEP_LOW_LATENCY
    assert adapter.SwitchDeepepNormalRouterNoQuant.router_type().value == 2
    assert adapter.SwitchDeepEpLowLatencyRouter.router_type().value == 4


def test_routers_are_top_level_classes_reading_rtp_llm_names(adapter: types.ModuleType,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter, "get_sm", lambda: (10, 0))  # a Blackwell GPU passes the SM check too
    assert all(checks(adapter.SwitchDeepEpLowLatencyRouter, make_config(low_latency=True)))
    monkeypatch.setattr(adapter, "get_sm", lambda: (8, 0))
    assert not checks(adapter.SwitchDeepEpLowLatencyRouter, make_config(low_latency=True))[0]


# ---------------------------------------------------------------------------------------------- check_conditions
def test_conditions_pass_for_the_matching_router(adapter: types.ModuleType) -> None:
    normal, fp8, ll = (adapter.SwitchDeepepNormalRouterNoQuant, adapter.SwitchDeepepNormalRouterFp8PerBlock,
                       adapter.SwitchDeepEpLowLatencyRouter)
    assert checks(normal, make_config()) == [True] * 5
    assert checks(fp8, make_config(quant_method="FP8_PER_BLOCK")) == [True] * 5
    assert checks(ll, make_config(low_latency=True)) == [True] * 4
    assert checks(ll, make_config(low_latency=True, quant_method="FP8_PER_BLOCK")) == [True] * 4


def test_conditions_fail_without_ep(adapter: types.ModuleType) -> None:
    for cls, cfg in ((adapter.SwitchDeepepNormalRouterNoQuant, make_config(ep_size=1)),
                     (adapter.SwitchDeepepNormalRouterFp8PerBlock,
                      make_config(ep_size=1, quant_method="FP8_PER_BLOCK")),
                     (adapter.SwitchDeepEpLowLatencyRouter, make_config(ep_size=1, low_latency=True))):
        results = checks(cls, cfg)
        assert results[1] is False and results.count(False) == 1, (cls.__name__, results)


def test_conditions_follow_the_low_latency_flag(adapter: types.ModuleType) -> None:
    assert checks(adapter.SwitchDeepepNormalRouterNoQuant,
                  make_config(low_latency=True)) == [True, True, False, True, True]
    assert checks(adapter.SwitchDeepepNormalRouterFp8PerBlock,
                  make_config(low_latency=True, quant_method="FP8_PER_BLOCK"))[2] is False
    assert checks(adapter.SwitchDeepEpLowLatencyRouter, make_config(low_latency=False)) == [True, True, False, True]


def test_conditions_check_the_quant_method(adapter: types.ModuleType) -> None:
    normal, fp8 = adapter.SwitchDeepepNormalRouterNoQuant, adapter.SwitchDeepepNormalRouterFp8PerBlock
    assert checks(normal, make_config(quant_method="FP8_PER_BLOCK")) == [True, True, True, True, False]
    assert checks(fp8, make_config()) == [True, True, True, True, False]
    assert checks(fp8, make_config(quant_method="FP8_PER_TENSOR_COMPRESSED"))[-1] is False
    checker = ConditionChecker()
    fp8.check_conditions(checker, make_config(quant_method="FP8_PER_TENSOR_COMPRESSED"))
    assert checker.results[-1][1] == {"quant_method": "FP8_PER_TENSOR_COMPRESSED"}


def test_conditions_need_sm90(adapter: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SM, "value", (8, 0))
    for cls, cfg in ((adapter.SwitchDeepepNormalRouterNoQuant, make_config()),
                     (adapter.SwitchDeepEpLowLatencyRouter, make_config(low_latency=True))):
        assert checks(cls, cfg)[0] is False and checks(cls, cfg).count(False) == 1
    monkeypatch.setitem(SM, "value", (9, 0))
    assert all(checks(adapter.SwitchDeepepNormalRouterNoQuant, make_config()))


def test_conditions_need_a_supported_provider(adapter: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeepEPWrapper, "supported", classmethod(lambda cls: False))
    assert checks(adapter.SwitchDeepepNormalRouterNoQuant, make_config()) == [True, True, True, False, True]
    assert checks(adapter.SwitchDeepEpLowLatencyRouter, make_config(low_latency=True)) == [True, True, True, False]


def test_the_reference_provider_counts_as_supported(monkeypatch: pytest.MonkeyPatch, restore_adapter: None) -> None:
    from deepep_switch.settings import reload_settings

    install_standin(monkeypatch)
    monkeypatch.setenv("DEEPEP_SWITCH_PROVIDER", "reference")
    reload_settings()
    adapter = load_adapter()
    assert DeepEPWrapper.supported() is True
    assert all(checks(adapter.SwitchDeepepNormalRouterNoQuant, make_config()))


# ---------------------------------------------------------------------------------------------- construction
def test_wrapper_configs_match_rtp_llm(adapter: types.ModuleType) -> None:
    cfg = make_config(low_latency=True, ll_num_max_token=100, tp_size=2)
    ll = adapter.SwitchDeepEpLowLatencyRouter.wrapper_config(cfg)
    assert ll.use_deepep_low_latency and ll.ll_num_max_token == 100 and ll.tp_size == 2
    assert ll.ll_num_max_token_per_rank == 64  # ceil(100 / 2) = 50 -> bucket 64
    normal = adapter.SwitchDeepepNormalRouterNoQuant.wrapper_config(make_config())
    assert normal.ll_num_max_token_per_rank == 0 and not normal.use_deepep_low_latency


def test_construction_needs_a_created_wrapper(adapter: types.ModuleType) -> None:
    assert DeepEPWrapper._instance is None
    with pytest.raises(RuntimeError, match="not initialized"):
        adapter.SwitchDeepepNormalRouterNoQuant(make_config(), NO_QUANT)


def test_per_token_fp8_is_refused(adapter: types.ModuleType) -> None:
    per_token = FusedMoEQuantConfig(quant_dtype=torch.float8_e4m3fn, per_act_token_quant=True)
    with pytest.raises(ValueError, match="per-token"):
        adapter.SwitchDeepEpLowLatencyRouter(make_config(low_latency=True), per_token)


def test_tensor_parallelism_needs_rtp_llm_collectives(adapter: types.ModuleType,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rtp_llm.models_py.distributed.collective_torch", None)
    with pytest.raises(RuntimeError, match="TP process group"):
        adapter.SwitchDeepepNormalRouterNoQuant(make_config(tp_size=2), NO_QUANT)
    assert adapter._tp_group(1) is None


def test_prepare_and_finalize_delegate(adapter: types.ModuleType) -> None:
    from routers.payloads import ExpertForwardPayload as OurPayload, ExpertTokensMetadata as OurMeta

    calls: list[tuple[str, tuple, dict]] = []
    ours = OurPayload(expert_x=torch.zeros(2, 4), expert_tokens_meta=OurMeta(expected_m=3),
                      expert_ids_are_local=True)

    class Inner:
        handle = "open"

        def prepare(self, *args: Any, **kwargs: Any) -> OurPayload:
            calls.append(("prepare", args, kwargs))
            return ours

        def finalize(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(("finalize", args, kwargs))
            return torch.ones(1)

    cls = adapter.SwitchDeepEpLowLatencyRouter
    router = cls.__new__(cls)
    router.switch_router = Inner()
    assert router.handle == "open"
    payload = router.prepare("a1", None, None, "w", "ids")
    assert type(payload) is ExpertForwardPayload and type(payload.expert_tokens_meta) is ExpertTokensMetadata
    # rtp-llm's CUDA routers never set expert_ids_are_local; the adapter leaves it at rtp-llm's default.
    assert payload.expert_tokens_meta.expected_m == 3 and payload.expert_ids_are_local is False
    assert payload.expert_x is ours.expert_x
    router.finalize("p", "w", "ids", False, {"original_num_tokens": 1}, skip_allreduce=True, opt_level=1)
    assert calls[0] == ("prepare", ("a1", None, None, "w", "ids"), {})
    assert calls[1] == ("finalize", ("p", "w", "ids", False, {"original_num_tokens": 1}),
                        {"skip_allreduce": True, "opt_level": 1})


# ---------------------------------------------------------------------------------------------- end to end
CASES = [  # (adapter class, quant method, FusedMoEQuantConfig, tp_size)
    ("SwitchDeepepNormalRouterNoQuant", None, NO_QUANT, 1),
    ("SwitchDeepepNormalRouterFp8PerBlock", "FP8_PER_BLOCK", FP8_BLOCK, 1),
    ("SwitchDeepEpLowLatencyRouter", None, NO_QUANT, 1),
    ("SwitchDeepEpLowLatencyRouter", "FP8_PER_BLOCK", FP8_BLOCK, 1),
    ("SwitchDeepepNormalRouterNoQuant", None, NO_QUANT, 2),
    ("SwitchDeepEpLowLatencyRouter", None, NO_QUANT, 2),
]


def e2e_worker(rank: int, world: int) -> list[dict[str, Any]]:
    """One rank: build every case's wrapper and adapter router, then run prepare -> executor -> finalize."""
    from deepep_switch.config import DeepepWrapperConfig
    from deepep_switch.testing import (ToyExperts, dense_reference, low_latency_executor, make_problem,
                                       normal_executor, relative_error)

    sys.modules.update(standin_modules())
    adapter = load_adapter()
    assert adapter.RTP_LLM_AVAILABLE
    hidden, experts_num, topk = 256, 8, 2
    experts = ToyExperts(0, experts_num, hidden)
    results = []
    for name, method, quant_config, tp_size in CASES:
        cls = getattr(adapter, name)
        fp8 = method is not None
        if tp_size == 1:  # EP only: uneven tokens per rank
            problem = make_problem(1, [7, 4], hidden, experts_num, topk)
            x, ids, weights = problem.local(rank)
            reference = dense_reference(problem, experts, fp8=fp8)[problem.rank_slice(rank)]
        else:  # attention TP over both ranks: each holds the same batch and dispatches half of it
            problem = make_problem(2, [9], hidden, experts_num, topk)
            x, ids, weights = problem.local(0)
            reference = dense_reference(problem, experts, fp8=fp8)
        config = make_config(ep_size=world, ep_rank=rank, tp_size=tp_size, tp_rank=rank % tp_size,
                             low_latency=cls.low_latency, quant_method=method, hidden=hidden, experts=experts_num,
                             topk=topk, ll_num_max_token=16)
        checker = ConditionChecker(name)
        cls.check_conditions(checker, config)
        assert checker.all_passed(), checker.results
        # What the engine does at start-up, in place of rtp-llm's init_deepep_wrapper.
        wrapper = adapter.init_deepep_wrapper(config)
        per_rank = (DeepepWrapperConfig.calc_low_latency_max_token_per_rank(16, tp_size, config.quant_config)
                    if cls.low_latency else 0)
        assert wrapper.config.equal(DeepepWrapperConfig.from_config_adapter(config, per_rank))
        assert wrapper.config.use_fp8_dispatch is fp8
        try:
            router = cls(config, quant_config)
            assert router.handle is None and router.tp_size == tp_size
            payload = router.prepare(x, None, None, weights, ids.to(torch.int32))
            assert type(payload) is ExpertForwardPayload and router.handle is not None
            if cls.low_latency:
                combined = low_latency_executor(payload, experts, rank)
            elif payload.expert_x.numel() == 0:  # as rtp-llm's FusedMoe does
                combined = CombineForwardPayload(torch.empty_like(payload.expert_x, dtype=torch.bfloat16))
            else:
                # rtp-llm's executors know the id convention from the quantisation (FP8: local ids), not the flag.
                combined = normal_executor(dataclasses.replace(payload, expert_ids_are_local=fp8), experts, rank,
                                           experts_num // world)
            out = router.finalize(combined, payload.expert_topk_weights, payload.expert_topk_ids, False,
                                  {"original_num_tokens": x.shape[0], "skip_tp_allreduce": False})
            assert router.handle is None
            assert out.shape == x.shape and out.dtype == torch.bfloat16
            opts = router.switch_router.options
            results.append(dict(
                case=(name, method, tp_size), error=relative_error(out, reference),
                backend=router.wrapper.backend.value,
                use_fp8=opts.use_fp8, alignment=opts.expert_alignment, global_ids=opts.global_expert_ids,
                tp_group=opts.tp_group is not None, scale=payload.expert_x_scale is not None,
                ids_flag=payload.expert_ids_are_local,
                ids_range=(int(payload.expert_topk_ids.min()), int(payload.expert_topk_ids.max()))
                if payload.expert_topk_ids.numel() else None,
                counts_cpu=payload.expert_tokens_meta.expert_num_tokens_cpu))
        finally:
            DeepEPWrapper.reset()
    return results


@pytest.mark.parametrize("backend", ["legacy", "elastic"])
def test_end_to_end_on_the_reference_provider(backend: str) -> None:
    from deepep_switch.launch import spawn

    env = {"DEEPEP_SWITCH_PROVIDER": "reference", "RTP_LLM_DEEPEP_BACKEND": backend}
    per_rank = spawn(e2e_worker, 2, env=env, timeout_s=120)
    for results in per_rank:
        assert [r["case"] for r in results] == [(n, m, t) for n, m, _, t in CASES]
        for r in results:
            name, method, tp = r["case"]
            assert r["error"] <= 1e-2, r
            assert r["backend"] == backend, r
            assert r["use_fp8"] is (method is not None) and r["scale"] is (method is not None), r
            assert r["tp_group"] is (tp > 1), r
            assert r["ids_flag"] is False, r  # as rtp-llm's CUDA routers
            if name == "SwitchDeepepNormalRouterNoQuant":  # global ids, -1 mapped to a zero-weight dummy
                assert r["global_ids"] and r["alignment"] == 1, r
                assert r["ids_range"] is None or r["ids_range"][0] >= 0, r
            if name == "SwitchDeepepNormalRouterFp8PerBlock":  # local ids with -1
                assert not r["global_ids"] and r["alignment"] == 128, r
                assert r["ids_range"] is None or r["ids_range"][1] < 8 // 2, r
                assert all(c % 128 == 0 for c in r["counts_cpu"]), r
            if name == "SwitchDeepEpLowLatencyRouter":
                assert r["counts_cpu"] is None, r
