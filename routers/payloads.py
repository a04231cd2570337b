"""The payloads a router hands the expert executor, with rtp-llm's field names and meanings.

Both backends fill them identically (see ``docs/payload-contract.md``); the executor cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypedDict, Union

import torch


class FinalizeArgs(TypedDict, total=False):
    """Optional arguments ``FusedMoe`` passes to ``finalize``: the caller's token count before TP slicing."""

    a1_shape: torch.Size
    original_num_tokens: int
    skip_tp_allreduce: bool


@dataclass
class ExpertTokensMetadata:
    """How many received rows each local expert owns.

    Attributes:
        expected_m: low-latency only: ``max(1, T_tp * R * K // E)``, a GEMM shape hint.
        expert_num_tokens: int32 ``[E_local]`` on the device. Normal mode: counts aligned to the router's
            ``expert_alignment``. Low-latency mode: the valid rows of each expert in ``expert_x[e]``.
        expert_num_tokens_cpu: normal mode: the same aligned counts as a Python list; low-latency: None.
    """

    expected_m: Optional[int] = None
    expert_num_tokens: Optional[torch.Tensor] = None
    expert_num_tokens_cpu: Optional[Union[list[int], torch.Tensor]] = None


@dataclass
class ExpertForwardPayload:
    """What ``prepare`` returns.

    Normal router: ``expert_x`` ``[N_recv, H]`` (bf16, or float8_e4m3fn with ``expert_x_scale`` float32
    ``[N_recv, H/128]``), one row per (source token, this rank); ``expert_topk_ids`` int64 ``[N_recv, K]`` local
    expert ids with -1 for experts elsewhere (or global ids when the router was built with ``global_expert_ids``);
    ``expert_topk_weights`` float32 ``[N_recv, K]``, 0.0 wherever the id is -1.

    Low-latency router: ``expert_x`` ``[E_local, R*N, H]`` (bf16, or fp8 with scales ``[E_local, R*N, H/128]``
    whose token dimension is contiguous); only ``expert_x[e, :expert_num_tokens[e]]`` is valid;
    ``expert_topk_ids``/``expert_topk_weights`` are this rank's TP-sliced global routing ``[T, K]``.
    """

    expert_x: torch.Tensor
    expert_x_origin_dtype: Optional[torch.dtype] = None
    expert_x_scale: Optional[torch.Tensor] = None
    expert_tokens_meta: Optional[ExpertTokensMetadata] = None
    expert_topk_ids: Optional[torch.Tensor] = None
    expert_topk_weights: Optional[torch.Tensor] = None
    expert_ids_are_local: bool = False


@dataclass
class CombineForwardPayload:
    """What the executor returns: bf16 rows in ``expert_x``'s layout (``[N_recv, H]`` or ``[E_local, R*N, H]``)."""

    fused_expert_output: torch.Tensor
