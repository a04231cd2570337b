"""rtp-llm ``FusedMoeDataRouter`` subclasses over deepep-switch's routers (rtp-llm itself behind a guarded import).

Importing this module never fails because rtp-llm is missing: it then sets ``RTP_LLM_AVAILABLE = False`` and
``ROUTERS = ()`` and removes the three classes below (so ``from routers.rtp_llm import X`` raises ImportError, which
makes rtp-llm's ``MoeStrategy.can_handle`` skip the strategy). When rtp-llm imports, each one subclasses rtp-llm's ``FusedMoeDataRouter`` and passes the work to a
:class:`~routers.NormalRouter` or :class:`~routers.LowLatencyRouter`:

========================================  ======================  ==============================================
class                                     ``router_type()``       replaces rtp-llm's
========================================  ======================  ==============================================
``SwitchDeepepNormalRouterNoQuant``       ``DEEPEP_NORMAL``       ``DeepepNormalRouterNoQuant`` (bf16, global ids)
``SwitchDeepepNormalRouterFp8PerBlock``   ``DEEPEP_NORMAL``       ``DeepepNormalRouterFp8PerBlock`` (alignment 128)
``SwitchDeepEpLowLatencyRouter``          ``DEEPEP_LOW_LATENCY``  ``DeepEpLowLatencyRouter`` (bf16 or FP8 block)
========================================  ======================  ==============================================

``check_conditions(checker, config)`` applies the same checks as rtp-llm's routers:

* SM major >= 9;
* EP is on (``ep_size > 1``);
* ``moe_config.use_deepep_low_latency`` matches the router;
* :meth:`deepep_switch.DeepEPWrapper.supported`;
* for the normal routers, the quant method: None for NoQuant, ``"FP8_PER_BLOCK"`` for Fp8PerBlock.

How an engine uses them:

1. Create deepep-switch's wrapper once per process, before the model is built. Use the config that the routers
   will rebuild, because ``get_instance`` requires an equal one:
   :func:`init_deepep_wrapper` (``routers.rtp_llm.init_deepep_wrapper(adapter)``) does exactly that and takes
   the place of rtp-llm's own ``init_deepep_wrapper``.
2. Name these classes as ``router_class`` in the strategies' attributes, for example in
   ``impl/cuda/strategy/no_quant.py``::

       from routers.rtp_llm import SwitchDeepepNormalRouterNoQuant
       return StrategyAttributes(router_class=SwitchDeepepNormalRouterNoQuant,
                                 executor_class=TritonFusedMoeExecutor,
                                 quant_config=FusedMoEQuantConfig(quant_dtype=None))

   rtp-llm's ``MoeStrategy.can_handle`` skips a strategy whose ``get_attributes`` raises ImportError.

rtp-llm builds each router as ``router_cls(config, quant_config)``. ``prepare`` returns rtp-llm's own
``ExpertForwardPayload`` and ``ExpertTokensMetadata``, copied field by field from ours.
With ``config.tp_size > 1``, the TP group comes from ``collective_torch._get_group(Group.TP)``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from deepep_switch.config import DeepepWrapperConfig
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
    logger.debug("rtp_llm is not importable (%s); the rtp-llm routers are inert", _exc)

    class FusedMoeDataRouter:  # type: ignore[no-redef]
        """Lets the class statements below run without rtp-llm; the classes are removed again at the end."""
else:
    RTP_LLM_AVAILABLE = True

__all__ = ["RTP_LLM_AVAILABLE", "ROUTERS", "init_deepep_wrapper", "wrapper_config_for"]


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


def wrapper_config_for(adapter: Any, low_latency: bool) -> DeepepWrapperConfig:
    """The ``DeepepWrapperConfig`` rtp-llm's routers rebuild from a ``MoEConfigAdapter`` (duck-typed)."""
    if not low_latency:
        return DeepepWrapperConfig.from_config_adapter(adapter)
    per_rank = DeepepWrapperConfig.calc_low_latency_max_token_per_rank(
        adapter.ll_num_max_token, adapter.tp_size, adapter.quant_config)
    return DeepepWrapperConfig.from_config_adapter(adapter, per_rank)


def init_deepep_wrapper(adapter: Any) -> DeepEPWrapper:
    """Engine start-up: build deepep-switch's wrapper from rtp-llm's ``MoEConfigAdapter``.

    This replaces rtp-llm's ``init_deepep_wrapper``: call it once per process, before the model is built, on
    every rank (it is collective). It uses exactly the config the adapter routers look up with ``get_instance``.
    """
    return DeepEPWrapper.create(wrapper_config_for(adapter, bool(adapter.moe_config.use_deepep_low_latency)))


class _SwitchDeepEPRouter(FusedMoeDataRouter):
    """Shared adapter code. Subclasses set the class attributes below and add checks of their own."""

    router_class: ClassVar[type[RouterBase]] = NormalRouter
    low_latency: ClassVar[bool] = False
    expert_alignment: ClassVar[int] = 1
    global_expert_ids: ClassVar[bool] = False

    def __init__(self, config: Any, quant_config: Any) -> None:
        super().__init__(config, quant_config)
        quant = quant_for_fused_moe(quant_config, _deep_gemm_e8m0_used(), who=type(self).__name__)
        options = RouterOptions(
            quant=quant, expert_alignment=self.expert_alignment, global_expert_ids=self.global_expert_ids,
            tp_rank=config.tp_rank, tp_size=config.tp_size, tp_group=_tp_group(config.tp_size))
        self.wrapper = DeepEPWrapper.get_instance(self.wrapper_config(config))
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
        """The open dispatch handle between ``prepare`` and ``finalize`` (the backend's own type), else None."""
        return self.switch_router.handle

    def prepare(self, a1: torch.Tensor, a1_scale: Optional[torch.Tensor], a2_scale: Optional[torch.Tensor],
                topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Any:
        """Call ``RouterBase.prepare`` and return the payload as rtp-llm's ``ExpertForwardPayload``."""
        payload = self.switch_router.prepare(a1, a1_scale, a2_scale, topk_weights, topk_ids)
        fields = {f.name: getattr(payload, f.name) for f in dataclasses.fields(payload)}
        meta = payload.expert_tokens_meta
        if meta is not None:
            fields["expert_tokens_meta"] = RtpExpertTokensMetadata(
                **{f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)})
        return RtpExpertForwardPayload(**fields)

    def finalize(self, payload: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 apply_router_weight_on_input: bool, extra_finalize_args: Optional[dict[str, Any]] = None,
                 skip_allreduce: bool = False, **kwargs: Any) -> torch.Tensor:
        """Call ``RouterBase.finalize`` (bf16 ``[original_num_tokens, H]``), passing every argument on."""
        return self.switch_router.finalize(payload, topk_weights, topk_ids, apply_router_weight_on_input,
                                           extra_finalize_args, skip_allreduce=skip_allreduce, **kwargs)


class SwitchDeepepNormalRouterNoQuant(_SwitchDeepEPRouter):
    """Normal (prefill) router for bf16. The executor gets global ids, with a zero-weight dummy expert for -1."""

    global_expert_ids = True

    @classmethod
    def check_conditions(cls, checker: Any, config: Any) -> None:
        super().check_conditions(checker, config)
        quant_method = MoeConfigResolver().get_quant_method(config)
        checker.check(quant_method is None, quant_method=quant_method)


class SwitchDeepepNormalRouterFp8PerBlock(_SwitchDeepEPRouter):
    """Normal (prefill) router for FP8 per-block. It pads each expert's rows to 128 and keeps local ids."""

    expert_alignment = 128

    @classmethod
    def check_conditions(cls, checker: Any, config: Any) -> None:
        super().check_conditions(checker, config)
        quant_method = MoeConfigResolver().get_quant_method(config)
        checker.check(quant_method == "FP8_PER_BLOCK", quant_method=quant_method)


class SwitchDeepEpLowLatencyRouter(_SwitchDeepEPRouter):
    """Low-latency (decode, CUDA-graph) router. It dispatches FP8 when ``quant_config`` is FP8 block, else bf16."""

    router_class = LowLatencyRouter
    low_latency = True


ROUTERS: tuple[type, ...] = (SwitchDeepepNormalRouterNoQuant, SwitchDeepepNormalRouterFp8PerBlock,
                             SwitchDeepEpLowLatencyRouter)
if RTP_LLM_AVAILABLE:
    __all__ += [cls.__name__ for cls in ROUTERS]
else:
    # rtp-llm's MoeStrategy.can_handle skips a strategy whose ``from routers.rtp_llm import X`` raises
    # ImportError: with rtp-llm's modules unimportable (a partial install) the classes must not exist.
    ROUTERS = ()
    del _SwitchDeepEPRouter, SwitchDeepepNormalRouterNoQuant, SwitchDeepepNormalRouterFp8PerBlock
    del SwitchDeepEpLowLatencyRouter
