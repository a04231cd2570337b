"""``AutoRouter``: normal or low-latency per batch, as SGLang's ``--deepep-mode auto`` does, over a wrapper that owns
both modes (:meth:`deepep_switch.DeepEPWrapper.create_both`).

**The choice must be identical on every EP rank.** The two modes are different collectives: ranks that choose
differently wait for each other until the deadline. So the choice is made only from what the caller passes, and
the caller must pass rank-identical quantities:

* ``is_prefill``: the forward batch's phase, agreed over the EP group (SGLang gathers ``is_extend_in_batch``
  over its DP ranks for this reason);
* ``global_max_tokens``: the largest token count any EP rank passes to ``prepare`` this step (e.g. the maximum of
  the data-parallel attention metadata's per-rank counts) - never this rank's own ``a1.shape[0]`` unless every
  rank's batch has the same size by construction.

:class:`ModeChooser` holds the rule: a prefill batch goes through the normal router; any other batch goes through
the low-latency router when ``global_max_tokens`` (per rank, after the attention-TP slice) is at most the
threshold (default: the low-latency capacity), else through the normal router; a decode batch given without a
token count goes low-latency. The choice is a few integer comparisons on the host: no collective and no host sync
beyond what the chosen router needs. ``verify=True`` adds one bounded all-gather per batch that checks the
choice on every rank (RuntimeError naming the ranks per mode, before any dispatch): for debugging, not for
production (a host sync on NCCL groups, and it cannot run inside a CUDA graph capture).

Both modes have their own buffer, so unlike SGLang's single V1 buffer in ``auto`` mode nothing needs cleaning
between a normal and a low-latency batch, and each mode may run a different generation
(``RTP_LLM_DEEPEP_BACKEND_NORMAL`` / ``_LOW_LATENCY``). Payloads are exactly the chosen router's: 2-D
``expert_x [N_recv, H]`` from the normal router, 3-D ``[E_local, R*N, H]`` from the low-latency one;
:attr:`AutoRouter.active` says which router holds the open dispatch, so the executor can pick its kernel.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from deepep_switch.config import DeepEPMode
from deepep_switch.consensus import all_gather_ints
from deepep_switch.wrapper import DeepEPWrapper

from .base import RouterBase, RouterOptions
from .low_latency import LowLatencyRouter
from .normal import NormalRouter
from .payloads import CombineForwardPayload, ExpertForwardPayload, FinalizeArgs


class ModeChooser:
    """The per-batch rule (see the module docstring), pure and rank-independent.

    Args:
        low_latency_capacity: the low-latency buffer's tokens per rank per dispatch (``N``).
        threshold: the most tokens per rank a batch may have to go low-latency; default ``N``; at most ``N``.
        tp_size: attention TP size: a TP group's batch of ``T`` tokens dispatches ``ceil(T / tp)`` per rank.
    """

    def __init__(self, low_latency_capacity: int, threshold: Optional[int] = None, tp_size: int = 1) -> None:
        threshold = low_latency_capacity if threshold is None else threshold
        if not 0 <= threshold <= low_latency_capacity:
            raise ValueError(f"threshold={threshold} must be in [0, the low-latency capacity "
                             f"{low_latency_capacity}]: a larger batch does not fit the low-latency buffer")
        if tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        self.threshold = threshold
        self.tp_size = tp_size

    def choose(self, is_prefill: Optional[bool] = None, global_max_tokens: Optional[int] = None) -> DeepEPMode:
        """NORMAL or LOW_LATENCY for one batch; both arguments must be identical on every EP rank.

        Raises ValueError (before any communication) when neither is given.
        """
        if is_prefill:
            return DeepEPMode.NORMAL
        if global_max_tokens is not None:
            per_rank = -(-global_max_tokens // self.tp_size)
            return DeepEPMode.LOW_LATENCY if per_rank <= self.threshold else DeepEPMode.NORMAL
        if is_prefill is None:
            raise ValueError("AutoRouter needs is_prefill (the batch's phase) or global_max_tokens (the largest "
                             "per-rank token count of this step over every EP rank), identical on every rank")
        return DeepEPMode.LOW_LATENCY


class AutoRouter:
    """A :class:`NormalRouter` and a :class:`LowLatencyRouter` on one two-mode wrapper, picked per batch.

    Args:
        wrapper: a wrapper that owns both modes (:meth:`DeepEPWrapper.create_both`).
        options: :class:`RouterOptions` for both routers (``expert_alignment`` and ``global_expert_ids`` apply to
            the normal router only).
        threshold: see :class:`ModeChooser`.
        verify: check every choice against every rank (one bounded all-gather per batch; debugging only).
    """

    def __init__(self, wrapper: DeepEPWrapper, options: Optional[RouterOptions] = None, *,
                 threshold: Optional[int] = None, verify: bool = False) -> None:
        options = options or RouterOptions()
        self.wrapper = wrapper
        self.normal = NormalRouter(wrapper, options)
        self.low_latency = LowLatencyRouter(wrapper, options)
        capacity = self.low_latency.capacity
        assert capacity is not None, "a low-latency buffer always has a capacity"
        self.chooser = ModeChooser(capacity, threshold, options.tp_size)
        # Indexed by DeepEPMode (an IntEnum): NORMAL = 0, LOW_LATENCY = 1.
        self._by_mode: tuple[RouterBase, RouterBase] = (self.normal, self.low_latency)
        self._open: Optional[RouterBase] = None
        self._verify = verify
        self.num_local_experts = self.normal.num_local_experts
        self.ep_rank, self.ep_size = self.normal.ep_rank, self.normal.ep_size

    def choose(self, is_prefill: Optional[bool] = None, global_max_tokens: Optional[int] = None) -> RouterBase:
        """The router :meth:`prepare` would use for these (rank-identical) arguments."""
        return self._by_mode[self.chooser.choose(is_prefill, global_max_tokens)]

    def prepare(self, a1: torch.Tensor, a1_scale: Optional[torch.Tensor], a2_scale: Optional[torch.Tensor],
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, is_prefill: Optional[bool] = None,
                global_max_tokens: Optional[int] = None, **fork_kwargs: Any) -> ExpertForwardPayload:
        """Dispatch through the chosen router (its ``prepare``: bf16 ``a1 [T, H]``, float32 ``topk_weights
        [T, K]``, int ``topk_ids [T, K]``); ``is_prefill`` / ``global_max_tokens`` as in :class:`ModeChooser`."""
        if self._open is not None:
            raise RuntimeError("prepare() called twice without finalize(): the previous dispatch is still open")
        router = self._by_mode[self.chooser.choose(is_prefill, global_max_tokens)]
        if self._verify:
            self._check_agreement(router.mode)
        payload = router.prepare(a1, a1_scale, a2_scale, topk_weights, topk_ids, **fork_kwargs)
        self._open = router
        return payload

    def finalize(self, payload: CombineForwardPayload, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 apply_router_weight_on_input: bool, extra_finalize_args: Optional[FinalizeArgs] = None,
                 skip_allreduce: bool = False, **fork_kwargs: Any) -> torch.Tensor:
        """Combine through the router that dispatched (its ``finalize``): bf16 ``[original_num_tokens, H]``.
        A ``finalize`` the router refuses before communicating leaves the dispatch open, to be finalized again."""
        router = self._open
        if router is None:
            raise RuntimeError("finalize() without a matching prepare()")
        try:
            return router.finalize(payload, topk_weights, topk_ids, apply_router_weight_on_input, extra_finalize_args,
                                   skip_allreduce, **fork_kwargs)
        finally:
            if router.handle is None:
                self._open = None

    @property
    def active(self) -> Optional[RouterBase]:
        """The router holding the open dispatch (between ``prepare`` and ``finalize``), else None."""
        return self._open

    @property
    def handle(self) -> Any:
        return None if self._open is None else self._open.handle

    def _check_agreement(self, mode: DeepEPMode) -> None:
        slot = self.wrapper.slot(mode)
        rows = all_gather_ints([int(mode)], slot.group, slot.deadline.timeout_s, what="AutoRouter mode choice")
        if len({row[0] for row in rows}) > 1:
            by_mode: dict[str, list[int]] = {}
            for rank, row in enumerate(rows):
                by_mode.setdefault(DeepEPMode(row[0]).name, []).append(rank)
            raise RuntimeError(f"AutoRouter: the ranks chose different modes for this batch {by_mode}: pass "
                               "is_prefill / global_max_tokens identical on every rank")
