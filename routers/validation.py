"""What the routers check before DeepEP sees a tensor: one validator per ``RTP_LLM_DEEPEP_VALIDATE`` mode.

A router builds its validator once (:func:`validator_for`) and binds its methods; ``prepare`` then calls, in
order and with no mode test of its own:

1. ``check_inputs(a1, topk_weights, topk_ids) -> T``: host-only checks against the layer's cached shape (no
   tensor op, no host sync);
2. ``check_values(a1, topk_weights, topk_ids)``: value checks that synchronise the host (``full`` only);
3. ``clean_ids(ids) -> ids`` on the TP-sliced int64 ids: device-side, graph-safe clean-up (``basic`` and ``full``;
   after ``full``'s checks pass it changes nothing, but it keeps CUDA graphs captured in ``full`` safe). One
   Triton launch on CUDA, a few torch ops elsewhere (:mod:`deepep_switch.kernels.ids`).

Every check runs before any communication. ``finalize`` always runs :func:`check_output` (host-only) against
the shape its ``prepare`` delivered, before the combine communicates.

Why ``basic`` rewrites ids rather than rejecting them: rejecting needs the values on the host (a sync per call,
impossible inside a CUDA graph), while DeepEP's generations disagree on bad ids (legacy ``Buffer``: an id ``== E``
fails with an empty AssertionError or a ~25 TB allocation; ``ElasticBuffer``: the slot is silently dropped; ids
below -1 count as -1 on both; DeepEP V2 faults on a repeated id in a row). Mapping every id outside ``[0, E)``
and every repeat of an earlier id in the same row to -1 on the device makes both generations drop exactly those
slots, identically, and never fault.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from deepep_switch.kernels.ids import id_cleaner_for, repeated_ids
from deepep_switch.settings import Validation

logger = logging.getLogger("routers.validation")

_BF16 = torch.bfloat16
_F32 = torch.float32
_ID_DTYPES = (torch.int32, torch.int64)


def check_output(y: torch.Tensor, expected: torch.Size, device: torch.device) -> None:
    """Host-only check of the executor's output against what this rank's dispatch delivered (every mode).

    Args:
        y: the executor's output (``CombineForwardPayload.fused_expert_output``).
        expected: ``expert_x.shape`` of the payload ``prepare`` returned: normal ``[N_recv, H]`` (``[0, H]`` when
            nothing arrived, as rtp-llm passes it), low-latency ``[E_local, R*N, H]``.
        device: where ``expert_x`` lives.

    Raises:
        ValueError: naming what was expected and what came, before the combine communicates.
    """
    if y.dtype != _BF16 or y.shape != expected or y.device != device:
        raise ValueError(
            f"finalize: the executor's output must be bf16 {list(expected)} on {device} (the layout this rank's "
            f"prepare delivered in expert_x), got {y.dtype} {list(y.shape)} on {y.device}; nothing was combined "
            "and the dispatch is still open: call finalize again with a correct output")


class OffValidator:
    """``off``: trust the caller. Ids reach DeepEP as given (out-of-range or repeated ids then behave as each
    DeepEP generation makes them behave, which differs); shapes and dtypes are left to DeepEP's own asserts.

    Args:
        hidden / num_topk / num_experts: the layer (H, K, E).
        device: where inputs must live (real DeepEP: the current CUDA device), or None for "wherever a1 is".
    """

    mode = Validation.OFF
    clean_ids: Callable[[torch.Tensor], torch.Tensor]
    """int64 ``[T, K]`` TP-sliced ids -> the int64 ``[T, K]`` ids to dispatch; bound per mode at construction."""
    kernel: Optional[str] = None
    """Which id clean-up runs: "triton" (one launch, CUDA), "torch", or None (ids kept)."""

    def __init__(self, hidden: int, num_topk: int, num_experts: int, device: Optional[torch.device]) -> None:
        self.hidden, self.num_topk, self.num_experts, self.device = hidden, num_topk, num_experts, device
        self.clean_ids = self._keep_ids

    def check_inputs(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> int:
        """The batch size T of bf16 ``a1 [T, H]``; nothing is checked."""
        return a1.shape[0]

    def check_values(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Nothing (``full`` only)."""

    @staticmethod
    def _keep_ids(ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[T, K]`` ids, unchanged."""
        return ids


class BasicValidator(OffValidator):
    """``basic`` (default): host-only shape/dtype/device checks, and on the device every id outside ``[0, E)``
    and every repeat of an earlier id in its row becomes -1 (the first occurrence is kept). No host sync."""

    mode = Validation.BASIC

    def __init__(self, hidden: int, num_topk: int, num_experts: int, device: Optional[torch.device]) -> None:
        super().__init__(hidden, num_topk, num_experts, device)
        # The Triton kernel where real DeepEP runs (CUDA), the torch ops elsewhere (reference providers).
        self.kernel, self.clean_ids = id_cleaner_for(device or torch.device("cpu"), num_topk, num_experts)

    def check_inputs(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> int:
        """bf16 ``a1 [T, H]``, float32 ``topk_weights [T, K]``, int32/int64 ``topk_ids [T, K]``, all on the
        router's device; returns T. Tensor metadata only."""
        shape = a1.shape
        if len(shape) != 2 or shape[1] != self.hidden or a1.dtype != _BF16:
            raise ValueError(f"a1 must be bf16 [T, {self.hidden}], got {a1.dtype} {list(shape)}")
        tokens = shape[0]
        if topk_ids.shape != (tokens, self.num_topk) or topk_weights.shape != (tokens, self.num_topk):
            raise ValueError(f"topk_ids/topk_weights must be [{tokens}, {self.num_topk}], got "
                             f"{list(topk_ids.shape)}/{list(topk_weights.shape)}")
        if topk_weights.dtype != _F32:
            raise ValueError(f"topk_weights must be float32, got {topk_weights.dtype}")
        if topk_ids.dtype not in _ID_DTYPES:
            raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        device = self.device or a1.device
        if a1.device != device or topk_ids.device != device or topk_weights.device != device:
            raise ValueError(f"a1, topk_weights and topk_ids must be on {device}, got "
                             f"{a1.device}/{topk_weights.device}/{topk_ids.device}")
        return tokens


def _never() -> bool:
    return False


class FullValidator(BasicValidator):
    """``full``: everything ``basic`` does, then value checks with one host sync per ``prepare``: ids in
    ``[-1, E)``, no expert twice in a row, finite ``a1`` and ``topk_weights``. A violation raises ValueError naming
    the argument, the token (row of the caller's tensors, before TP slicing) and the value.

    A host sync cannot be captured in a CUDA graph: while a stream is capturing, the value checks are skipped
    (one WARNING per validator) and the captured graph keeps ``basic``'s device-side id clean-up, so decode
    graphs still build and replay safely in ``full``; eager calls get the full checks.
    """

    mode = Validation.FULL

    def __init__(self, hidden: int, num_topk: int, num_experts: int, device: Optional[torch.device]) -> None:
        super().__init__(hidden, num_topk, num_experts, device)
        self._capturing: Callable[[], bool] = (torch.cuda.is_current_stream_capturing if torch.cuda.is_available()
                                               else _never)
        self._warned_capture = False

    def check_values(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """bf16 ``a1 [T, H]``, float32 ``topk_weights [T, K]``, int ``topk_ids [T, K]`` (the caller's, unsliced).

        Raises ValueError for, in this order: an id outside ``[-1, E)``, an expert named twice in a row, a
        non-finite ``a1`` value, a non-finite weight. The first offending token is named.
        """
        if self._capturing():
            if not self._warned_capture:
                self._warned_capture = True
                logger.warning("RTP_LLM_DEEPEP_VALIDATE=full cannot synchronise the host inside CUDA graph capture: "
                               "the captured graph drops bad ids on the device as basic does, unchecked")
            return
        experts = self.num_experts
        out_of_range = (topk_ids < -1) | (topk_ids >= experts)
        repeated = repeated_ids(topk_ids) & (topk_ids >= 0)
        bad_x = ~torch.isfinite(a1)
        bad_w = ~torch.isfinite(topk_weights)
        flags = torch.stack([out_of_range.any(), repeated.any(), bad_x.any(), bad_w.any()]).tolist()  # the sync
        if flags[0]:
            t, k = _first(out_of_range)
            raise ValueError(f"topk_ids[{t}, {k}] = {int(topk_ids[t, k])} (token {t}) is outside [-1, {experts}): "
                             f"expert ids must be -1 or name one of the {experts} experts")
        if flags[1]:
            t, k = _first(repeated)
            first = int(torch.nonzero(topk_ids[t, :k] == topk_ids[t, k])[0, 0])
            raise ValueError(f"topk_ids[{t}] (token {t}) names expert {int(topk_ids[t, k])} twice (slots {first} and "
                             f"{k}): DeepEP V2 faults on repeated ids in a row")
        if flags[2]:
            t, c = _first(bad_x)
            raise ValueError(f"a1[{t}, {c}] = {float(a1[t, c])} (token {t}) is not finite")
        if flags[3]:
            t, k = _first(bad_w)
            raise ValueError(f"topk_weights[{t}, {k}] = {float(topk_weights[t, k])} (token {t}) is not finite")


def _first(mask: torch.Tensor) -> tuple[int, int]:
    """Row and column of the first True in a 2-D bool mask (error path only: it syncs the host)."""
    row, col = torch.nonzero(mask)[0].tolist()
    return int(row), int(col)


_VALIDATORS: dict[Validation, type[OffValidator]] = {
    Validation.OFF: OffValidator, Validation.BASIC: BasicValidator, Validation.FULL: FullValidator,
}


def validator_for(mode: Validation, hidden: int, num_topk: int, num_experts: int,
                  device: Optional[torch.device]) -> OffValidator:
    """The validator of ``mode`` for a layer (H, K, E); ``device`` None accepts inputs on any one device."""
    validator = _VALIDATORS[Validation(mode)](hidden, num_topk, num_experts, device)
    logger.debug("router validation: %s (H=%d, K=%d, E=%d)", validator.mode.value, hidden, num_topk, num_experts)
    return validator
