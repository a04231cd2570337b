"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/modules/factory/fused_moe/defs/fused_moe.py``.

The router interface: the payload dataclasses (fields in rtp-llm's order, ``expert_ids_are_local`` included),
``FinalizeArgs`` and ``FusedMoeDataRouter``. rtp-llm's ``FusedMoeExpertExecutor`` and ``FusedMoe`` (the layer
that runs prepare -> executor -> finalize) are left out: the ported tests drive the routers directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Final, List, Literal, Optional, TypedDict, Union

import torch

from rtp_llm.models_py.modules.factory.fused_moe.defs.config_adapter import MoEConfigAdapter
from rtp_llm.models_py.modules.factory.fused_moe.defs.quant_config import FusedMoEQuantConfig
from rtp_llm.models_py.modules.factory.fused_moe.defs.type import RouterType

SKIP_TP_ALLREDUCE_ARG: Final[Literal["skip_tp_allreduce"]] = "skip_tp_allreduce"


class FinalizeArgs(TypedDict, total=False):
    """Private, optional arguments ``FusedMoe`` passes to ``finalize``."""

    a1_shape: torch.Size
    original_num_tokens: int
    skip_tp_allreduce: bool


@dataclass
class ExpertTokensMetadata:
    """How many rows each local expert received."""

    expected_m: Optional[int] = None
    expert_num_tokens: Optional[torch.Tensor] = None
    expert_num_tokens_cpu: Optional[Union[List[int], torch.Tensor]] = None


@dataclass
class ExpertForwardPayload:
    """What ``prepare`` hands the executor."""

    expert_x: torch.Tensor
    expert_x_origin_dtype: Optional[torch.dtype] = None
    expert_x_scale: Optional[torch.Tensor] = None
    expert_tokens_meta: Optional[ExpertTokensMetadata] = None
    expert_topk_ids: Optional[torch.Tensor] = None
    expert_topk_weights: Optional[torch.Tensor] = None
    expert_ids_are_local: bool = False


@dataclass
class CombineForwardPayload:
    """What the executor hands ``finalize``."""

    fused_expert_output: torch.Tensor


def should_skip_tp_allreduce(extra_finalize_args: Optional[FinalizeArgs]) -> bool:
    """Whether a pure-TP router should leave the TP all-reduce to its caller."""
    return bool(extra_finalize_args is not None and extra_finalize_args.get(SKIP_TP_ALLREDUCE_ARG, False))


class FusedMoeDataRouter(ABC):
    """Moves tokens to their experts (``prepare``) and back (``finalize``)."""

    def __init__(self, config: MoEConfigAdapter, quant_config: FusedMoEQuantConfig) -> None:
        self.config = config
        self.quant_config = quant_config
        self.tp_size = config.tp_size

    @property
    def tp_collective_size(self) -> int:
        """The size of this router's ``Group.TP`` collective."""
        return self.config.tp_size

    @classmethod
    def router_type(cls) -> RouterType:
        raise NotImplementedError

    @property
    def supports_skip_tp_allreduce(self) -> bool:
        return False

    @classmethod
    def check_conditions(cls, checker: Any, config: MoEConfigAdapter) -> None:
        """Record, on ``checker``, whether this router can serve ``config``."""
        raise NotImplementedError

    @abstractmethod
    def prepare(self, a1: torch.Tensor, a1_scale: Optional[torch.Tensor], a2_scale: Optional[torch.Tensor],
                topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> ExpertForwardPayload:
        raise NotImplementedError

    @abstractmethod
    def finalize(self, payload: CombineForwardPayload, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 apply_router_weight_on_input: bool, extra_finalize_args: Optional[FinalizeArgs]) -> torch.Tensor:
        raise NotImplementedError
