"""``DeepepWrapperConfig`` and ``DeepEPMode``: rtp-llm's wrapper configuration, field for field.

The first eighteen fields, their order, ``from_config_adapter``, ``equal`` and the buckets of
``calc_low_latency_max_token_per_rank`` match ``rtp_llm.models_py.distributed.deepep_wrapper`` so an engine can
hand us the config it already builds. Two fields are ours and default to rtp-llm's behaviour:
``max_tokens_per_rank`` (the elastic capacity in normal mode; legacy normal mode has none) and ``quant`` (the
dispatch quantisation buffers are sized for).
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Optional

from .quant import Quant, quant_for_rtp_method

_PER_TOKEN_METHODS = {
    "FP8_PER_TENSOR_COMPRESSED", "FP8_DYNAMIC_PER_TENSOR",
    "W4A8_INT4_PER_CHANNEL", "W4A8_INT4_PER_CHANNEL_COMPRESSED",
}
_BLOCK_METHODS = {"FP8_PER_BLOCK", "modelopt_fp4"}


class DeepEPMode(IntEnum):
    """Which router family the buffer serves (rtp-llm's enum; ``LOW_LATENCY_M2N`` is ACCL-only, refused here)."""

    NORMAL = 0
    LOW_LATENCY = 1
    LOW_LATENCY_M2N = 2


def allow_mnnvl() -> bool:
    """rtp-llm's rule: multi-node NVLink only on aarch64 Blackwell (SM10x)."""
    if "aarch64" not in platform.machine():
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 10


@dataclass
class DeepepWrapperConfig:
    """Everything that sizes and shapes the one EP buffer of a process.

    Attributes:
        ep_rank / ep_size: this rank and the EP group size (the group is WORLD in rtp-llm).
        tp_size: attention TP size; tokens are sliced by TP rank before dispatch.
        local_rank / world_size: as in rtp-llm's parallelism config.
        hidden_size: H, the token width in elements.
        expert_num: E, experts across all ranks; must divide by ep_size.
        moe_k: top-k experts per token.
        deep_ep_num_sm: rtp-llm's DEEP_EP_NUM_SM: the legacy normal buffer is sized for at least this many SMs
            (engine code dispatches with ``Config(deep_ep_num_sm, ...)``); the kernels' SM count is
            RTP_LLM_DEEPEP_NUM_SMS.
        use_deepep_low_latency: build for the low-latency (decode) router instead of the normal one.
        use_deepep_internode: the EP group spans nodes.
        ll_num_max_token: rtp-llm's raw low-latency token budget (before TP and bucketing).
        enable_ffn_disaggregate, attention_tp_size, attention_dp_size, ffn_tp_size, ffn_dp_size: FFN
            disaggregation (M2N), which needs ACCL-EP and is refused here.
        ll_num_max_token_per_rank: N, low-latency tokens per rank per dispatch (the LL buffer's capacity).
        max_tokens_per_rank: normal-mode elastic capacity (tokens per rank per dispatch).
        quant: the dispatch quantisation (FP8 payloads size the elastic buffer smaller).
    """

    ep_rank: int
    ep_size: int
    tp_size: int
    local_rank: int
    world_size: int
    hidden_size: int
    expert_num: int
    moe_k: int
    deep_ep_num_sm: int
    use_deepep_low_latency: bool
    use_deepep_internode: bool
    ll_num_max_token: int
    enable_ffn_disaggregate: bool = False
    attention_tp_size: int = 0
    attention_dp_size: int = 0
    ffn_tp_size: int = 0
    ffn_dp_size: int = 0
    ll_num_max_token_per_rank: int = 0
    max_tokens_per_rank: int = 4096
    quant: Quant = Quant.NONE

    def equal(self, other: Any, ignore: tuple[str, ...] = ()) -> bool:
        """Field-by-field equality (but the fields named in ``ignore``). ``other`` may be rtp-llm's own config (its
        eighteen fields): fields it lacks must hold their defaults here."""
        missing = object()
        for f in fields(self):
            if f.name in ignore:
                continue
            theirs = getattr(other, f.name, missing)
            if theirs is missing:
                theirs = f.default
            if getattr(self, f.name) != theirs:
                return False
        return True

    @property
    def use_fp8_dispatch(self) -> bool:
        """Payloads are FP8 ``(x, scales)`` (``quant`` is an FP8 member)."""
        return self.quant.is_fp8

    @property
    def mode(self) -> DeepEPMode:
        if self.use_deepep_low_latency:
            return DeepEPMode.LOW_LATENCY_M2N if self.enable_ffn_disaggregate else DeepEPMode.LOW_LATENCY
        return DeepEPMode.NORMAL

    def validate(self) -> None:
        """Raise ValueError for a config no buffer can serve. Runs before any communication."""
        problems = []
        if self.ep_size < 1 or not 0 <= self.ep_rank < self.ep_size:
            problems.append(f"ep_rank={self.ep_rank} is not in [0, ep_size={self.ep_size})")
        if self.tp_size < 1:
            problems.append(f"tp_size={self.tp_size} must be >= 1")
        if self.hidden_size <= 0 or self.hidden_size % 128:
            problems.append(f"hidden_size={self.hidden_size} must be a positive multiple of 128")
        if self.expert_num <= 0 or self.expert_num % max(self.ep_size, 1):
            problems.append(f"expert_num={self.expert_num} must be a positive multiple of ep_size={self.ep_size}")
        if not 1 <= self.moe_k <= min(32, max(self.expert_num, 1)):
            problems.append(f"moe_k={self.moe_k} must be in [1, min(32, expert_num)]")
        if self.enable_ffn_disaggregate:
            problems.append("FFN disaggregation (LOW_LATENCY_M2N) needs ACCL-EP and is not supported")
        if self.use_deepep_low_latency and self.ll_num_max_token_per_rank <= 0:
            problems.append("low-latency mode needs ll_num_max_token_per_rank > 0")
        if not self.use_deepep_low_latency and self.max_tokens_per_rank <= 0:
            problems.append("normal mode needs max_tokens_per_rank > 0")
        if problems:
            raise ValueError("invalid DeepepWrapperConfig: " + "; ".join(problems))

    @staticmethod
    def calc_low_latency_max_token_per_rank(ll_num_max_token: int, tp_size: int,
                                            quant_config: Optional[Any] = None) -> int:
        """rtp-llm's bucketing of the per-rank low-latency capacity (DeepGEMM masked GEMM needs max_m >= 64)."""
        m = math.ceil(ll_num_max_token / tp_size)
        if m > 128:
            return math.ceil(m / 128) * 128
        method = quant_config.get_method() if quant_config is not None and quant_config.is_quanted() else None
        if method is None or method in _BLOCK_METHODS:
            buckets = [128] if allow_mnnvl() else [64, 128]
        elif method in _PER_TOKEN_METHODS:
            buckets = list(range(16, 129, 8))
        else:
            raise ValueError(f"unsupported quant method for DeepEP low latency: {method}")
        return next(b for b in buckets if b >= m)

    @classmethod
    def from_config_adapter(cls, adapter: Any, ll_num_max_token_per_rank: int = 0) -> "DeepepWrapperConfig":
        """Build from rtp-llm's ``MoEConfigAdapter`` (duck-typed: no rtp_llm import).

        ``quant`` follows the model's quant method (FP8 methods size the buffer for FP8 payloads);
        ``max_tokens_per_rank`` keeps its default (override with ``RTP_LLM_DEEPEP_MAX_TOKENS_PER_RANK``).
        """
        par, model, moe = adapter.parallelism_config, adapter.model_config, adapter.moe_config
        ffn = getattr(par, "ffn_disaggregate_config", None)
        quant = getattr(model, "quant_config", None)
        method = quant.get_method() if quant is not None and quant.is_quanted() else None
        return cls(
            ep_rank=par.ep_rank, ep_size=par.ep_size, tp_size=par.tp_size, local_rank=par.local_rank,
            world_size=par.world_size, hidden_size=model.hidden_size, expert_num=model.expert_num,
            moe_k=model.moe_k, deep_ep_num_sm=moe.deep_ep_num_sm,
            use_deepep_low_latency=moe.use_deepep_low_latency, use_deepep_internode=moe.use_deepep_internode,
            ll_num_max_token=adapter.ll_num_max_token,
            enable_ffn_disaggregate=bool(getattr(ffn, "enable_ffn_disaggregate", False)),
            attention_tp_size=getattr(ffn, "attention_tp_size", 0), attention_dp_size=getattr(ffn, "attention_dp_size", 0),
            ffn_tp_size=getattr(ffn, "ffn_tp_size", 0), ffn_dp_size=getattr(ffn, "ffn_dp_size", 0),
            ll_num_max_token_per_rank=ll_num_max_token_per_rank, quant=quant_for_rtp_method(method),
        )
