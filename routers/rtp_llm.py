"""rtp-llm drop-in: ``FusedMoeDataRouter`` subclasses with rtp-llm's names and signatures over deepep-switch's
routers, rtp-llm's ``init_deepep_wrapper``, and :func:`install`, which makes rtp-llm's own symbols resolve to
ours. rtp-llm itself is behind a guarded import.

Matched against alibaba/rtp-llm @ 4b8d39cd (``models_py/distributed/deepep_wrapper.py``,
``modules/factory/fused_moe/impl/cuda/routers/deepep_{normal,low_latency}_router.py``); ``destroy_buffer`` /
``rebuild_buffer`` follow branch ``feat/dsv4_on_dev_sleep`` @ 323f6ba4. ``docs/rtp-llm.md`` lists every symbol.

Importing this module never fails because rtp-llm is missing: it then sets ``RTP_LLM_AVAILABLE = False`` and
``ROUTERS = ()`` and removes the router classes (so ``from routers.rtp_llm import X`` raises ImportError, which
makes rtp-llm's ``MoeStrategy.can_handle`` skip the strategy).

======================================  =======================  ===============================================
class (``install()`` also binds it as)  ``router_type()``        behaviour
======================================  =======================  ===============================================
``SwitchDeepepNormalRouterBase``        ``DEEPEP_NORMAL``        ``(config, quant_config, expert_alignment)``
``SwitchDeepepNormalRouterNoQuant``     ``DEEPEP_NORMAL``        bf16, alignment 1, global ids (-1 -> dummy)
``SwitchDeepepNormalRouterFp8PerBlock`` ``DEEPEP_NORMAL``        FP8 block scales, alignment 128, local ids
``SwitchDeepEpLowLatencyRouter``        ``DEEPEP_LOW_LATENCY``   bf16 or FP8 block; ``_ll_num_max_token_per_rank``
======================================  =======================  ===============================================

As in rtp-llm, the normal routers hand the executor local expert ids when the activations are FP8 or the model is
``modelopt_fp4`` and global ids otherwise, and never set ``expert_ids_are_local`` (rtp-llm's CUDA routers leave it
False). ``router.handle`` is indexable the way rtp-llm's code reads it on every backend (see
``docs/rtp-llm.md``, "The handle").
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from types import SimpleNamespace
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from deepep_switch.config import DeepEPMode, DeepepWrapperConfig
from deepep_switch.quant import quant_for_fused_moe
from deepep_switch.wrapper import DeepEPWrapper

from .base import RouterBase, RouterOptions
from .low_latency import LowLatencyRouter
from .normal import NormalRouter

logger = logging.getLogger("routers.rtp_llm")

try:
    from rtp_llm.models_py.modules.factory.fused_moe.defs.fused_moe import (
        ExpertForwardPayload as RtpExpertForwardPayload, ExpertTokensMetadata as RtpExpertTokensMetadata,
        FusedMoeDataRouter)
    from rtp_llm.models_py.modules.factory.fused_moe.defs.type import RouterType
    from rtp_llm.models_py.modules.factory.fused_moe.utils.config_resolver import MoeConfigResolver
    from rtp_llm.models_py.utils.arch import get_sm
except ImportError as _exc:
    RTP_LLM_AVAILABLE = False
    logger.debug("rtp_llm is not importable (%s); the rtp-llm routers are not defined", _exc)

    class FusedMoeDataRouter:  # type: ignore[no-redef]
        """Lets the class statements below run without rtp-llm; the classes are removed again at the end."""
else:
    RTP_LLM_AVAILABLE = True

__all__ = ["RTP_LLM_AVAILABLE", "ROUTERS", "init_deepep_wrapper", "install", "wrapper_config_for"]

_CUDA_ROUTERS = "rtp_llm.models_py.modules.factory.fused_moe.impl.cuda.routers"
_WRAPPER_MODULE = "rtp_llm.models_py.distributed.deepep_wrapper"


def _tp_group(tp_size: int) -> Optional[dist.ProcessGroup]:
    """Return rtp-llm's attention-TP process group, or None when ``tp_size == 1``."""
    if tp_size == 1:
        return None
    try:
        from rtp_llm.models_py.distributed.collective_torch import Group, _get_group
    except ImportError as exc:
        raise RuntimeError(f"tp_size={tp_size} needs rtp-llm's TP process group "
                           "(rtp_llm.models_py.distributed.collective_torch)") from exc
    return _get_group(Group.TP)


def _deep_gemm_e8m0_used() -> bool:
    """rtp-llm's ``is_deep_gemm_e8m0_used()``, or False when that module is missing."""
    try:
        from rtp_llm.models_py.kernels.cuda.deepgemm_wrapper import is_deep_gemm_e8m0_used
    except ImportError:
        return False
    return bool(is_deep_gemm_e8m0_used())


def _quant_method(config: Any) -> Optional[str]:
    quant = getattr(config.model_config, "quant_config", None)
    return quant.get_method() if quant is not None and quant.is_quanted() else None


def wrapper_config_for(adapter: Any, low_latency: bool) -> DeepepWrapperConfig:
    """The ``DeepepWrapperConfig`` rtp-llm's routers rebuild from a ``MoEConfigAdapter`` (duck-typed)."""
    if not low_latency:
        return DeepepWrapperConfig.from_config_adapter(adapter)
    per_rank = DeepepWrapperConfig.calc_low_latency_max_token_per_rank(
        adapter.ll_num_max_token, adapter.tp_size, adapter.quant_config)
    return DeepepWrapperConfig.from_config_adapter(adapter, per_rank)


def low_latency_token_budget(engine_config: Any) -> int:
    """rtp-llm's low-latency budget: ``runtime_config.max_generate_batch_size``, times ``gen_num_per_cycle + 1``
    under speculative decoding (``sp_config.type`` other than NONE)."""
    budget = int(engine_config.runtime_config.max_generate_batch_size)
    sp = getattr(engine_config, "sp_config", None)
    sp_type = getattr(sp, "type", None)
    if sp_type is not None and str(getattr(sp_type, "name", sp_type)).upper() != "NONE":
        budget *= int(sp.gen_num_per_cycle) + 1
    return budget


def init_deepep_wrapper(engine_config: Any, model_config: Any = None) -> Optional[DeepEPWrapper]:
    """rtp-llm's ``init_deepep_wrapper(engine_config, model_config)``: build the process's wrapper (collective).

    As rtp-llm does: returns None with a warning when no DeepEP is usable; the low-latency capacity is
    ``calc_low_latency_max_token_per_rank(budget, raw tp_size, model quant config)`` with
    :func:`low_latency_token_budget`; the wrapper config comes from a ``MoEConfigAdapter`` view of the two configs.
    ``init_deepep_wrapper(adapter)`` (deepep-switch 0.1) still works: the config the adapter routers look up.
    """
    if model_config is None:
        adapter = engine_config
        return DeepEPWrapper.create(wrapper_config_for(adapter, bool(adapter.moe_config.use_deepep_low_latency)))
    if not DeepEPWrapper.supported():
        logger.warning("deepep-switch: no DeepEP provider is usable here; DeepEP wrapper not initialized")
        return None
    par, moe = engine_config.parallelism_config, engine_config.moe_config
    adapter = SimpleNamespace(parallelism_config=par, model_config=model_config, moe_config=moe,
                              ll_num_max_token=moe.ll_num_max_token)
    per_rank = 0
    if moe.use_deepep_low_latency:
        per_rank = DeepepWrapperConfig.calc_low_latency_max_token_per_rank(
            low_latency_token_budget(engine_config), par.tp_size, getattr(model_config, "quant_config", None))
    return DeepEPWrapper.create(DeepepWrapperConfig.from_config_adapter(adapter, per_rank))


class _SwitchDeepEPRouter(FusedMoeDataRouter):
    """Shared adapter code: rtp-llm's router surface around a :class:`~routers.NormalRouter` or
    :class:`~routers.LowLatencyRouter` (``self.switch_router``)."""

    router_class: ClassVar[type[RouterBase]] = NormalRouter
    low_latency: ClassVar[bool] = False

    def __init__(self, config: Any, quant_config: Any, expert_alignment: int = 1) -> None:
        super().__init__(config, quant_config)
        quant = quant_for_fused_moe(quant_config, _deep_gemm_e8m0_used(), who=type(self).__name__)
        # rtp-llm: local ids for FP8 activations and for modelopt_fp4 models, global ids otherwise.
        global_ids = not self.low_latency and not (quant.is_fp8 or _quant_method(config) == "modelopt_fp4")
        options = RouterOptions(
            quant=quant, expert_alignment=expert_alignment, global_expert_ids=global_ids,
            tp_rank=config.tp_rank, tp_size=config.tp_size, tp_group=_tp_group(config.tp_size))
        wrapper_config = self.wrapper_config(config)
        self.wrapper = DeepEPWrapper.get_instance(wrapper_config)
        self.expert_alignment = expert_alignment
        self.switch_router: RouterBase = self.router_class(self.wrapper, options)

    @classmethod
    def wrapper_config(cls, config: Any) -> DeepepWrapperConfig:
        """The config rtp-llm's own router passes to ``DeepEPWrapper.get_instance``."""
        return wrapper_config_for(config, cls.low_latency)

    @classmethod
    def router_type(cls) -> Any:
        return RouterType.DEEPEP_LOW_LATENCY if cls.low_latency else RouterType.DEEPEP_NORMAL

    @classmethod
    def check_conditions(cls, checker: Any, config: Any) -> None:
        resolver = MoeConfigResolver()
        sm = get_sm()
        checker.check(sm[0] >= 9, sm=sm)
        checker.check(resolver.is_ep_enabled(config), ep_size=config.ep_size)
        checker.check(resolver.use_low_latency(config) == cls.low_latency, router=cls.__name__)
        checker.check(DeepEPWrapper.supported(), backend="deepep-switch")

    @property
    def handle(self) -> Any:
        """The open dispatch handle between ``prepare`` and ``finalize``, else None. Indexable as rtp-llm reads
        it on every backend (legacy: DeepEP's tuple; elastic: a compatibility view)."""
        return self.switch_router.handle

    def prepare(self, a1: torch.Tensor, a1_scale: Optional[torch.Tensor], a2_scale: Optional[torch.Tensor],
                topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Any:
        """Call ``RouterBase.prepare`` and return the payload as rtp-llm's ``ExpertForwardPayload``."""
        payload = self.switch_router.prepare(a1, a1_scale, a2_scale, topk_weights, topk_ids)
        return _to_rtp_payload(payload)

    def finalize(self, payload: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 apply_router_weight_on_input: bool, extra_finalize_args: Optional[dict[str, Any]] = None,
                 skip_allreduce: bool = False, **kwargs: Any) -> torch.Tensor:
        """Call ``RouterBase.finalize`` (bf16 ``[original_num_tokens, H]``), passing every argument on."""
        return self.switch_router.finalize(payload, topk_weights, topk_ids, apply_router_weight_on_input,
                                           extra_finalize_args, skip_allreduce=skip_allreduce, **kwargs)


def _to_rtp_payload(payload: Any) -> Any:
    """Our payload as rtp-llm's dataclasses: only the fields rtp-llm's version has, ``expert_ids_are_local`` left
    at rtp-llm's default (its CUDA routers never set it)."""
    known = {f.name for f in dataclasses.fields(RtpExpertForwardPayload)}
    fields = {f.name: getattr(payload, f.name) for f in dataclasses.fields(payload)
              if f.name in known and f.name != "expert_ids_are_local"}
    meta = payload.expert_tokens_meta
    if meta is not None:
        fields["expert_tokens_meta"] = RtpExpertTokensMetadata(
            **{f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)})
    return RtpExpertForwardPayload(**fields)


class SwitchDeepepNormalRouterBase(_SwitchDeepEPRouter):
    """rtp-llm's ``DeepepNormalRouterBase(config, quant_config, expert_alignment)``: the normal (prefill) router
    with any alignment; FP8 when ``quant_config`` is FP8 with block scales."""

    def __init__(self, config: Any, quant_config: Any, expert_alignment: int) -> None:
        super().__init__(config, quant_config, expert_alignment)


class SwitchDeepepNormalRouterNoQuant(SwitchDeepepNormalRouterBase):
    """Normal (prefill) router for bf16. The executor gets global ids, with a zero-weight dummy expert for -1."""

    def __init__(self, config: Any, quant_config: Any) -> None:
        super().__init__(config, quant_config, expert_alignment=1)

    @classmethod
    def check_conditions(cls, checker: Any, config: Any) -> None:
        super().check_conditions(checker, config)
        quant_method = MoeConfigResolver().get_quant_method(config)
        checker.check(quant_method is None, quant_method=quant_method)


class SwitchDeepepNormalRouterFp8PerBlock(SwitchDeepepNormalRouterBase):
    """Normal (prefill) router for FP8 per-block. It pads each expert's rows to 128 and keeps local ids."""

    def __init__(self, config: Any, quant_config: Any) -> None:
        super().__init__(config, quant_config, expert_alignment=128)

    @classmethod
    def check_conditions(cls, checker: Any, config: Any) -> None:
        super().check_conditions(checker, config)
        quant_method = MoeConfigResolver().get_quant_method(config)
        checker.check(quant_method == "FP8_PER_BLOCK", quant_method=quant_method)


class SwitchDeepEpLowLatencyRouter(_SwitchDeepEPRouter):
    """Low-latency (decode, CUDA-graph) router. It dispatches FP8 when ``quant_config`` is FP8 block, else bf16."""

    router_class = LowLatencyRouter
    low_latency = True

    def __init__(self, config: Any, quant_config: Any) -> None:
        super().__init__(config, quant_config)
        self._ll_num_max_token_per_rank = self.wrapper.ll_num_max_token_per_rank


ROUTERS: tuple[type, ...] = (SwitchDeepepNormalRouterNoQuant, SwitchDeepepNormalRouterFp8PerBlock,
                             SwitchDeepEpLowLatencyRouter)

# What install() binds in rtp-llm's modules: module -> {rtp-llm name: ours}.
REPLACED: dict[str, dict[str, Any]] = {
    _WRAPPER_MODULE: {"DeepEPWrapper": DeepEPWrapper, "DeepepWrapperConfig": DeepepWrapperConfig,
                      "DeepEPMode": DeepEPMode, "init_deepep_wrapper": init_deepep_wrapper},
    f"{_CUDA_ROUTERS}.deepep_normal_router": {"DeepepNormalRouterBase": SwitchDeepepNormalRouterBase,
                                              "DeepepNormalRouterNoQuant": SwitchDeepepNormalRouterNoQuant,
                                              "DeepepNormalRouterFp8PerBlock": SwitchDeepepNormalRouterFp8PerBlock},
    f"{_CUDA_ROUTERS}.deepep_low_latency_router": {"DeepEpLowLatencyRouter": SwitchDeepEpLowLatencyRouter},
}


def install() -> dict[str, list[str]]:
    """Make rtp-llm's own wrapper and DeepEP routers resolve to deepep-switch's, once per process.

    Call it before rtp-llm builds its model and before ``server/backend_manager.py`` calls
    ``init_deepep_wrapper``: from then on ``deepep_wrapper.DeepEPWrapper`` (and its ``_instance``),
    ``init_deepep_wrapper`` and the DeepEP router classes rtp-llm's strategies import are ours, so one buffer
    exists per process and code reading ``DeepEPWrapper._instance`` sees it. Names bound with ``from X import Y``
    *before* the call keep the old objects. Returns what was replaced; ImportError without rtp-llm.
    """
    if not RTP_LLM_AVAILABLE:
        raise ImportError("routers.rtp_llm.install() needs rtp-llm (rtp_llm is not importable)")
    replaced: dict[str, list[str]] = {}
    for module_name, names in REPLACED.items():
        module = importlib.import_module(module_name)
        for name, ours in names.items():
            setattr(module, name, ours)
        replaced[module_name] = sorted(names)
    logger.info("deepep-switch installed into rtp-llm: %s", replaced)
    return replaced


if RTP_LLM_AVAILABLE:
    __all__ += [cls.__name__ for cls in (SwitchDeepepNormalRouterBase, *ROUTERS)]
else:
    # rtp-llm's MoeStrategy.can_handle skips a strategy whose ``from routers.rtp_llm import X`` raises
    # ImportError: with rtp-llm's modules unimportable (a partial install) the classes must not exist.
    ROUTERS = ()
    del _SwitchDeepEPRouter, SwitchDeepepNormalRouterBase, SwitchDeepepNormalRouterNoQuant
    del SwitchDeepepNormalRouterFp8PerBlock, SwitchDeepEpLowLatencyRouter
