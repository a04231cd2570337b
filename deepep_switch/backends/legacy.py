"""The legacy generation: ``deep_ep.Buffer`` (DeepEP's V1 API), normal and low-latency kernels.

* import: ``deep_ep.Buffer`` (sgl-deep-ep 2.1, DeepEP <= 2.1, or DeepEP's ``legacy`` branch);
* sizing: normal mode ``num_nvl_bytes`` = max of the dispatch and combine ``Config`` NVL hints for the rank
  count (sized for bf16, which also fits FP8 rows and scales), RDMA hints when internode, at the larger of the
  SM count the kernels use (``Buffer.num_sms``, after ``RTP_LLM_DEEPEP_NUM_SMS``) and the engine's
  ``deep_ep_num_sm`` (rtp-llm code dispatches with ``Config(deep_ep_num_sm, ...)`` on the buffer directly);
  low-latency ``get_low_latency_rdma_size_hint(N, H, R, E)`` with ``num_qps_per_rank = E // R``;
* deadlines: ``Buffer`` takes none (its CPU wait gives up after a compiled-in 100 s, its kernels after ~100 s of
  GPU cycles); the reference provider gets ``timeout_s``. The normal ``dispatch`` (host-blocking) is guarded by
  the watchdog;
* paths: ``get_dispatch_layout`` + ``dispatch`` + ``combine`` (normal), ``low_latency_dispatch`` /
  ``low_latency_combine`` (decode; the kernel quantises FP8 and the combine applies the top-k weights);
* reference: :class:`~deepep_switch.providers.reference.ReferenceBuffer`.

It is the registry's fallback: every failed or disagreeing request ends here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..config import DeepEPMode, DeepepWrapperConfig
from ..quant import Quant, quantize_fp8
from ..settings import SwitchSettings
from ..watchdog import Guard
from .baselines import Bf16Outputs
from .contracts import (Capabilities, LowLatencyDispatch, NormalDispatch, PathContext, RawRoundTrip,
                        WeightsAppliedBy, XType)
from .registry import register
from .spec import BackendSpec, BufferPlan, Library, accepted_kwargs

# DeepEP 2.1.0 legacy low-latency kernels are compiled for these hidden sizes (the sgl-deep-ep wheel adds 3584).
LL_HIDDEN = frozenset({2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192})
LL_MAX_TOPK = 11
LL_MAX_TOKENS = 511  # NVSHMEM_QP_DEPTH (1024) >= 2 * (N + 1)


def plan(buffer_cls: Any, group: dist.ProcessGroup, config: DeepepWrapperConfig,
         settings: SwitchSettings) -> BufferPlan:
    """Size a ``Buffer`` for ``config.mode`` from the class's hints. ValueError for rank counts it has no config for."""
    del group  # the legacy hints depend on the rank count only
    ranks, hidden, experts = config.ep_size, config.hidden_size, config.expert_num
    if settings.num_sms:
        buffer_cls.set_num_sms(settings.num_sms)  # class-wide in DeepEP: one value per process
    if config.mode is DeepEPMode.LOW_LATENCY:
        tokens = config.ll_num_max_token_per_rank
        rdma = int(buffer_cls.get_low_latency_rdma_size_hint(tokens, hidden, ranks, experts))
        kwargs = dict(num_nvl_bytes=0, num_rdma_bytes=rdma, low_latency_mode=True,
                      num_qps_per_rank=experts // ranks, allow_nvlink_for_low_latency_mode=True,
                      explicitly_destroy=True, **deadline_kwargs(buffer_cls, settings))
        return BufferPlan(SPEC.backend, kwargs, {"rdma": rdma}, tokens)
    configs = sizing_configs(buffer_cls, ranks, config.deep_ep_num_sm)
    hidden_bytes = hidden * 2  # bf16 sizing also fits FP8 rows and their scales
    nvl = max(int(c.get_nvl_buffer_size_hint(hidden_bytes, ranks)) for c in configs)
    internode = config.use_deepep_internode
    rdma = max(int(c.get_rdma_buffer_size_hint(hidden_bytes, ranks)) for c in configs) if internode else 0
    qps = max(1, buffer_cls.num_sms // 2) if internode else 1
    kwargs = dict(num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=False, num_qps_per_rank=qps,
                  explicitly_destroy=True, **deadline_kwargs(buffer_cls, settings))
    return BufferPlan(SPEC.backend, kwargs, {"nvl": nvl, "rdma": rdma}, None)


def sizing_sms(buffer_cls: Any, deep_ep_num_sm: int) -> int:
    """The SM count the normal buffer is sized for: the larger of the class-wide ``Buffer.num_sms`` (what the
    routers' dispatches use: DeepEP's default ``Config`` is built from it) and the engine's ``deep_ep_num_sm``
    rounded up to even (what rtp-llm code passes as ``Config(deep_ep_num_sm, ...)`` when it calls the buffer
    itself, e.g. its ``deepep_test``). A Config with more SMs than the buffer was sized for makes DeepEP assert
    ``... <= num_nvl_bytes`` in dispatch; sizing for more only costs memory."""
    return max(int(buffer_cls.num_sms), deep_ep_num_sm + deep_ep_num_sm % 2)


def sizing_configs(buffer_cls: Any, ranks: int, deep_ep_num_sm: int) -> list[Any]:
    """DeepEP's own dispatch and combine ``Config`` for ``ranks`` at :func:`sizing_sms` SMs.

    A real ``deep_ep.Config`` exposes no fields (its pybind class has only the constructor and the two hints), so
    the chunk sizes cannot be read and re-used with another SM count. ``get_dispatch_config`` /
    ``get_combine_config`` read the class-wide ``Buffer.num_sms`` when called: it is raised to the sizing count
    for these two calls and put back, so the kernels' SM count is unchanged. ValueError for rank counts DeepEP has
    no config for."""
    kernel_sms, sms = int(buffer_cls.num_sms), sizing_sms(buffer_cls, deep_ep_num_sm)
    if sms != kernel_sms:
        buffer_cls.set_num_sms(sms)
    try:
        return [buffer_cls.get_dispatch_config(ranks), buffer_cls.get_combine_config(ranks)]
    except AssertionError as exc:
        raise ValueError(f"legacy normal mode has no DeepEP config for ep_size={ranks}: {exc}") from exc
    finally:
        if sms != kernel_sms:
            buffer_cls.set_num_sms(kernel_sms)


def deadline_kwargs(buffer_cls: Any, settings: SwitchSettings) -> dict[str, Any]:
    """``timeout_s`` for the reference provider; nothing for ``deep_ep.Buffer``, whose waits are compiled in."""
    return accepted_kwargs(buffer_cls, {"timeout_s": settings.timeout_s})


class LegacyNormalPath:
    """``Buffer`` normal-mode kernels (NVLink intranode, NVLink+RDMA internode); rows in (source rank, token) order."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        host_sync=True, graph_capturable=False, weights=WeightsAppliedBy.EXECUTOR)

    def __init__(self, buffer: Any, num_experts: int, expert_alignment: int, dispatch_guard: Guard) -> None:
        self.buffer, self.num_experts, self.expert_alignment = buffer, num_experts, expert_alignment
        self._dispatch_guard = dispatch_guard

    @classmethod
    def build(cls, ctx: PathContext) -> "LegacyNormalPath":
        return cls(ctx.buffer, ctx.num_experts, ctx.expert_alignment, ctx.deadline.guard("dispatch"))

    def dispatch(self, x: XType, ids: torch.Tensor, weights: torch.Tensor) -> NormalDispatch:
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(ids, self.num_experts)
        with self._dispatch_guard:  # the host waits for the receive counts (DeepEP gives up after 100 s itself)
            recv_x, recv_ids, recv_w, counts, handle, _ = self.buffer.dispatch(
                x, None, per_rank, per_rdma_rank, in_rank, per_expert, ids, weights,
                expert_alignment=self.expert_alignment)
        rows, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        return NormalDispatch(rows, scales, recv_ids, recv_w, counts, handle)

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        out, _, _ = self.buffer.combine(y, handle)
        return out


class LegacyLowLatencyPath:
    """``Buffer`` low-latency kernels (IBGDA/NVLink, all SMs, graph-safe). Nothing here blocks the host, so
    nothing is guarded: the kernels' own ~100 s GPU timeout bounds them, graph replays included."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        host_sync=False, graph_capturable=True, weights=WeightsAppliedBy.PATH)

    def __init__(self, buffer: Any, num_experts: int, capacity: int, quant: Quant) -> None:
        self.buffer, self.num_experts, self.capacity = buffer, num_experts, capacity
        self.use_fp8, self.round_scale = quant.is_fp8, quant.round_scale

    @classmethod
    def build(cls, ctx: PathContext) -> "LegacyLowLatencyPath":
        assert ctx.capacity is not None, "low-latency buffers always have a capacity"
        if ctx.real_deep_ep:
            check_low_latency_limits(ctx.hidden, ctx.num_topk, ctx.capacity, ctx.num_ranks, ctx.quant)
        return cls(ctx.buffer, ctx.num_experts, ctx.capacity, ctx.quant)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> LowLatencyDispatch:
        recv, counts, handle, _, _ = self.buffer.low_latency_dispatch(
            x, ids, self.capacity, self.num_experts, use_fp8=self.use_fp8, round_scale=self.round_scale,
            async_finish=False, return_recv_hook=False)
        expert_x, scales = recv if self.use_fp8 else (recv, None)
        return LowLatencyDispatch(expert_x, scales, counts, handle)

    def combine(self, y: torch.Tensor, handle: Any, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out, _, _ = self.buffer.low_latency_combine(y, ids, weights, handle, zero_copy=False, async_finish=False,
                                                    return_recv_hook=False)
        return out


def check_low_latency_limits(hidden: int, topk: int, capacity: int, ranks: int, quant: Quant) -> None:
    """The shapes DeepEP 2.1.0's compiled low-latency kernels accept; ValueError naming every violation."""
    problems = []
    if hidden not in LL_HIDDEN:
        problems.append(f"hidden {hidden} not in {sorted(LL_HIDDEN)}")
    if quant.is_fp8 and hidden % 512:
        problems.append("FP8 needs hidden % 512 == 0")
    if topk > LL_MAX_TOPK:
        problems.append(f"topk {topk} > {LL_MAX_TOPK}")
    if capacity > LL_MAX_TOKENS or (ranks * capacity) % 4:
        problems.append(f"tokens per rank {capacity} must be <= {LL_MAX_TOKENS} with R*N % 4 == 0")
    if problems:
        raise ValueError("legacy low-latency DeepEP cannot serve this layer: " + "; ".join(problems))


def raw_round_trip(buffer: Any, low_latency: bool, capacity: int, num_experts: int, x: torch.Tensor,
                   ids: torch.Tensor, weights: torch.Tensor, quant: Quant) -> RawRoundTrip:
    """Bench baseline: the raw ``Buffer`` calls a hand-written integration makes (expert output = input for bf16;
    FP8: a preallocated bf16 output, so that no side pays for an executor)."""
    fp8 = quant.is_fp8
    outputs = Bf16Outputs()  # FP8: the identity executor's bf16 output, preallocated (no conversion pass)

    def as_bf16(recv: Any) -> torch.Tensor:
        return outputs(recv[0]) if fp8 else recv

    if low_latency:
        def low_latency_trip() -> Any:
            recv, _, handle, _, _ = buffer.low_latency_dispatch(x, ids, capacity, num_experts, use_fp8=fp8,
                                                                round_scale=quant.round_scale)
            return buffer.low_latency_combine(as_bf16(recv), ids, weights, handle)[0]
        return low_latency_trip
    payload = quantize_fp8(x, quant.round_scale) if fp8 else x

    def normal_trip() -> Any:
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(ids, num_experts)
        recv, _, _, _, handle, _ = buffer.dispatch(payload, None, per_rank, per_rdma, in_rank, per_expert, ids, weights)
        return buffer.combine(as_bf16(recv), handle)[0]
    return normal_trip


def _reference() -> type:
    from ..providers.reference import ReferenceBuffer

    return ReferenceBuffer


SPEC: BackendSpec = register(BackendSpec(
    name="legacy",
    summary="deep_ep.Buffer (V1 API): normal and low-latency kernels",
    library=Library(
        modules=("deep_ep",), attribute="Buffer", import_check="deep_ep_import", api_check="buffer_api",
        install_hint="Install the gpu extra (pip install 'deepep-switch[gpu]', i.e. sgl-deep-ep==0.1.2.post1) on a "
                     "CUDA 13 host; DeepEP 2.5 dropped Buffer (it lives on in sgl-deep-ep 2.1 and DeepEP's legacy "
                     "branch)"),
    reference=_reference,
    plan=plan,
    normal_path=LegacyNormalPath,
    low_latency_path=LegacyLowLatencyPath,
    raw_round_trip=raw_round_trip,
    auto_priority=0,
))
