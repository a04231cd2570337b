"""The elastic generation: ``deep_ep.ElasticBuffer`` (DeepEP 2.1's V2 API), one NCCL-based dispatch/combine.

* import: ``deep_ep.ElasticBuffer`` (sgl-deep-ep 0.1.2.post1 = DeepEP 2.1.0);
* preflight: runtime NCCL >= 2.30.4, NCCL build == runtime below 2.31, GIN (or ``EP_DISABLE_GIN=1`` on one node);
* sizing: ``ElasticBuffer.get_buffer_size_hint(group, M, H, K, fp8, hybrid, multiple_reduction)``;
* deadlines: ``num_cpu_timeout_secs`` (the host wait of a CPU-synced dispatch) and ``num_gpu_timeout_secs``
  (every kernel's wait for peers, graph replays included) = ``RTP_LLM_DEEPEP_TIMEOUT_S`` rounded up; the
  reference provider also gets ``timeout_s``. The normal path's ``dispatch`` is guarded by the watchdog;
* normal path: ``dispatch(do_cpu_sync=True)`` + ``combine``, received weights zeroed where the id is -1 (V2
  keeps the sender's weight there);
* low-latency path (:mod:`.elastic_ll`): quantise (DeepEP's FP8 recipe; V2 never quantises) -> ``dispatch(
  do_cpu_sync=False)``, non-expand (default ``token`` layout: deepep-switch expands the rows into ``[E_local, R*N,
  H]`` and folds the outputs back with the top-k weighting) or expand (DeepEP's expanded rows packed into that
  layout, unpacked with the weighting) -> ``combine`` (which sums but never weights). No host sync:
  graph-capturable;
* reference: :class:`~deepep_switch.providers.reference.ReferenceElasticBuffer`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from ..backend import Backend
from ..checks import Check, HostView, Version, format_version, parse_version
from ..config import DeepEPMode, DeepepWrapperConfig
from ..kernels.layout import row_weighter_for
from ..quant import Quant, quantize_fp8, quantizer_for
from ..settings import SwitchSettings
from ..watchdog import Guard
from .baselines import Bf16Outputs
from .contracts import Capabilities, NormalDispatch, PathContext, RawRoundTrip, WeightsAppliedBy, XType
from .elastic_ll import (ElasticLowLatencyHandle, ElasticLowLatencyPath, ElasticTokenHandle,  # noqa: F401
                         check_hidden)
from .registry import register
from .spec import BackendSpec, BufferPlan, Library, accepted_kwargs

# ElasticBuffer needs NCCL >= 2.30.4 at run time (DeepEP README).
MIN_NCCL: Version = (2, 30, 4)
# DeepEP built against NCCL < 2.31 asserts that the runtime NCCL is exactly the build one (csrc nccl backend).
EXACT_MATCH_BELOW: Version = (2, 31, 0)
# NCCL that known DeepEP binary distributions were compiled against.
KNOWN_BUILDS: dict[tuple[str, str], Version] = {
    ("sgl-deep-ep", "0.1.2.post1"): (2, 30, 7),
}


# ---------------------------------------------------------------------------------------------- preflight
def host_checks(host: HostView, settings: SwitchSettings) -> list[Check]:
    """NCCL runtime, NCCL build/runtime pairing and GIN: the facts ElasticBuffer's constructor asserts on."""
    gates = (SPEC.backend,)
    runtime, where = host.nccl_runtime
    runtime_ok = runtime is not None and runtime >= MIN_NCCL
    checks = [Check(name="nccl_runtime", passed=runtime_ok, gates=gates, detail=(
        f"runtime NCCL {format_version(runtime)} ({where})" if runtime else f"runtime NCCL unknown: {where}")
        + ("" if runtime_ok else f"; ElasticBuffer needs NCCL >= {format_version(MIN_NCCL)} at run time"))]
    build = build_nccl(host, settings)
    if build is not None:
        host.facts["nccl_build_version"] = format_version(build) or ""
    checks.append(_build_match_check(runtime, build))
    checks.append(gin_check(host, settings, gates))
    return checks


def build_nccl(host: HostView, settings: SwitchSettings) -> Optional[Version]:
    """The NCCL this DeepEP was compiled against: the operator's setting, else a known PyPI build."""
    if settings.nccl_build_version:
        return parse_version(settings.nccl_build_version)
    dist_info = host.probe.distribution("deep_ep")
    return KNOWN_BUILDS.get(dist_info) if dist_info else None


def _build_match_check(runtime: Optional[Version], build: Optional[Version]) -> Check:
    name, gates = "nccl_build_match", (SPEC.backend,)
    if build is None:
        if runtime is not None and runtime >= EXACT_MATCH_BELOW:
            return Check(name=name, passed=True, gates=gates,
                         detail="build NCCL unknown; runtime >= 2.31 uses NCCL's runtime-version devcomm")
        return Check(name=name, passed=False, gates=gates, detail=(
            "cannot tell which NCCL this DeepEP was compiled against; below NCCL 2.31 it must equal the runtime. "
            "Set RTP_LLM_DEEPEP_NCCL_BUILD_VERSION=MAJOR.MINOR.PATCH"))
    seen = f"DeepEP built with NCCL {format_version(build)}, runtime {format_version(runtime)}"
    if build >= EXACT_MATCH_BELOW:
        ok = runtime is not None and runtime >= build
        return Check(name=name, passed=ok, gates=gates,
                     detail=seen + ("" if ok else f"; upgrade the runtime NCCL to >= {format_version(build)}"))
    ok = runtime == build
    return Check(name=name, passed=ok, gates=gates, detail=seen + (
        "" if ok else f"; below 2.31 they must be equal: install nvidia-nccl-cu13=={format_version(build)} (DeepEP "
                      "2.5's EPBuffer needs NCCL >= 2.32.3, so elastic and ep never run in one process)"))


def gin_check(host: HostView, settings: SwitchSettings, gates: tuple[Backend, ...]) -> Check:
    """NCCL GIN, which DeepEP's NCCL-based buffers (2.1's ElasticBuffer, 2.5's EPBuffer) assert at construction
    unless ``EP_DISABLE_GIN=1``. One fact of the host: every generation that needs it returns it as ``gin``."""
    name, nics = "gin", host.rdma_nics
    if host.internode:
        ok = bool(nics) and not settings.ep_disable_gin
        return Check(name=name, passed=ok, gates=gates, detail=(
            f"internode EP over RDMA NICs {nics}" if ok else
            "internode DeepEP buffers need NCCL GIN over an RDMA NIC: "
            + ("unset EP_DISABLE_GIN" if settings.ep_disable_gin else "no RDMA NIC in /sys/class/infiniband")))
    if nics:
        return Check(name=name, passed=True, gates=gates, detail=f"RDMA NICs {nics} (GIN possible)")
    if settings.ep_disable_gin:
        return Check(name=name, passed=True, gates=gates,
                     detail="no RDMA NIC; EP_DISABLE_GIN=1 (single-node NVLink)")
    return Check(name=name, passed=False, gates=gates, detail=(
        "no RDMA NIC, so DeepEP's ElasticBuffer/EPBuffer would fail with 'NCCL GIN is unavailable'; "
        "set EP_DISABLE_GIN=1 for single-node NVLink"))


# ---------------------------------------------------------------------------------------------- sizing
def capacity(config: DeepepWrapperConfig, settings: SwitchSettings) -> int:
    """M, the ElasticBuffer's tokens per rank: the LL budget, or the normal-mode capacity (setting wins)."""
    if config.mode is DeepEPMode.LOW_LATENCY:
        return config.ll_num_max_token_per_rank
    return settings.max_tokens_per_rank or config.max_tokens_per_rank


def plan(buffer_cls: Any, group: dist.ProcessGroup, config: DeepepWrapperConfig,
         settings: SwitchSettings) -> BufferPlan:
    """Size an ``ElasticBuffer``. ``get_buffer_size_hint`` reads the group's NCCL communicator."""
    tokens = capacity(config, settings)
    fp8 = config.quant.is_fp8
    num_bytes = int(buffer_cls.get_buffer_size_hint(
        group, tokens, config.hidden_size, num_topk=config.moe_k, use_fp8_dispatch=fp8,
        allow_hybrid_mode=settings.elastic_allow_hybrid,
        allow_multiple_reduction=settings.elastic_allow_multiple_reduction))
    kwargs = dict(num_bytes=num_bytes, num_max_tokens_per_rank=tokens, hidden=config.hidden_size,
                  num_topk=config.moe_k, use_fp8_dispatch=fp8,
                  deterministic=settings.elastic_deterministic, allow_hybrid_mode=settings.elastic_allow_hybrid,
                  allow_multiple_reduction=settings.elastic_allow_multiple_reduction,
                  prefer_overlap_with_compute=settings.elastic_prefer_overlap, explicitly_destroy=True,
                  **deadline_kwargs(buffer_cls, settings))
    return BufferPlan(SPEC.backend, kwargs, {"elastic": num_bytes}, tokens)


def deadline_kwargs(buffer_cls: Any, settings: SwitchSettings) -> dict[str, Any]:
    """The deadline as ``ElasticBuffer`` takes it (whole seconds, CPU and GPU side), plus ``timeout_s`` for the
    reference provider; only what ``buffer_cls`` accepts."""
    whole = max(1, math.ceil(settings.timeout_s))
    return accepted_kwargs(buffer_cls, {"num_cpu_timeout_secs": whole, "num_gpu_timeout_secs": whole,
                                        "timeout_s": settings.timeout_s})


# ---------------------------------------------------------------------------------------------- paths
class ElasticNormalHandle:
    """The elastic normal path's dispatch handle: DeepEP's ``EPHandle`` (``native``), plus rtp-llm's view of a
    legacy normal handle, ``handle[0]`` = the rank prefix matrix (see :attr:`rank_prefix_matrix`)."""

    __slots__ = ("native", "_group", "_timeout_s", "_prefix")

    def __init__(self, native: Any, group: Any, timeout_s: float) -> None:
        self.native, self._group, self._timeout_s, self._prefix = native, group, timeout_s, None

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 0:
            return self.rank_prefix_matrix
        raise IndexError(f"legacy normal handle field {index} has no meaning on ElasticBuffer (only [0], the rank "
                         "prefix matrix, is provided as a compatibility view)")

    @property
    def rank_prefix_matrix(self) -> torch.Tensor:
        """int32 ``[R, R]``: ``[i, j]`` = rows rank ``j`` received from ranks ``0..i``, as legacy's ``handle[0]``.

        Rows are grouped by source rank on both generations, so ``[i-1, rank]:[i, rank]`` are the rows from
        rank ``i`` here too. Built on first read from every rank's ``psum_num_recv_tokens_per_scaleup_rank``:
        **a collective** (one bounded all-gather of R ints), so every rank of the group must read it.
        """
        if self._prefix is None:
            from ..consensus import all_gather_ints

            local = self.native.psum_num_recv_tokens_per_scaleup_rank
            columns = all_gather_ints([int(v) for v in local.tolist()], self._group, self._timeout_s,
                                      what="rank prefix matrix (compatibility view)")
            self._prefix = torch.tensor(columns, dtype=torch.int32, device=local.device).t().contiguous()
        return self._prefix


class ElasticNormalPath:
    """``ElasticBuffer`` with a host-synchronised layout (exact row counts); rows in arbitrary order per source
    rank unless ``RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC=1``."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        host_sync=True, graph_capturable=False, weights=WeightsAppliedBy.EXECUTOR)
    buffer_name: ClassVar[str] = "ElasticBuffer"

    def __init__(self, buffer: Any, num_experts: int, expert_alignment: int, num_sms: int,
                 num_local_experts: int, dispatch_guard: Guard, group: Any = None, timeout_s: float = 60.0) -> None:
        self.buffer, self.num_experts, self.expert_alignment = buffer, num_experts, expert_alignment
        self.num_sms, self.num_local_experts = num_sms, num_local_experts
        self._dispatch_guard = dispatch_guard
        self.group, self.timeout_s = group, timeout_s

    @classmethod
    def build(cls, ctx: PathContext) -> "ElasticNormalPath":
        check_hidden(ctx, cls.buffer_name)
        return cls(ctx.buffer, ctx.num_experts, ctx.expert_alignment, ctx.num_sms, ctx.num_local_experts,
                   ctx.deadline.guard("dispatch"), ctx.group, ctx.deadline.timeout_s)

    def dispatch(self, x: XType, ids: torch.Tensor, weights: torch.Tensor) -> NormalDispatch:
        with self._dispatch_guard:  # the host waits for the counts (up to num_cpu_timeout_secs, then raises)
            recv_x, recv_ids, recv_w, handle, _ = self.buffer.dispatch(
                x, topk_idx=ids, topk_weights=weights, num_experts=self.num_experts,
                expert_alignment=self.expert_alignment, num_sms=self.num_sms, do_cpu_sync=True)
        recv_w.masked_fill_(recv_ids < 0, 0.0)  # V2 keeps the sender's weight where the id is -1 (ours to edit)
        counts = list(handle.num_recv_tokens_per_expert_list) or [0] * self.num_local_experts
        rows, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        return NormalDispatch(rows, scales, recv_ids, recv_w, counts,
                              ElasticNormalHandle(handle, self.group, self.timeout_s))

    def combine(self, y: torch.Tensor, handle: ElasticNormalHandle) -> torch.Tensor:
        out, _, _ = self.buffer.combine(y, handle.native, num_sms=handle.native.num_sms)
        return out


def raw_round_trip(buffer: Any, low_latency: bool, capacity: int, num_experts: int, x: torch.Tensor,
                   ids: torch.Tensor, weights: torch.Tensor, quant: Quant) -> RawRoundTrip:
    """Bench baseline: raw ``ElasticBuffer`` calls, an identity executor that costs nothing (FP8: a preallocated
    bf16 output), FP8 quantised once outside the round trip. Low-latency: expand, no CPU sync, and no top-k
    weighting, which V2's combine never does and a real integration must add (see :func:`raw_weighted_round_trip`)."""
    del capacity  # the buffer's own num_max_tokens_per_rank applies
    payload = quantize_fp8(x, quant.round_scale) if quant.is_fp8 else x
    outputs = Bf16Outputs()

    def trip() -> Any:
        recv, _, _, handle, _ = buffer.dispatch(payload, topk_idx=ids, topk_weights=weights, num_experts=num_experts,
                                                do_cpu_sync=not low_latency, do_expand=low_latency)
        y = outputs(recv[0]) if quant.is_fp8 else recv
        return buffer.combine(y, handle)[0]
    return trip


def raw_weighted_round_trip(buffer: Any, low_latency: bool, capacity: int, num_experts: int, x: torch.Tensor,
                            ids: torch.Tensor, weights: torch.Tensor, quant: Quant) -> Optional[RawRoundTrip]:
    """Bench baseline for low-latency (None in normal mode): the cheapest *correct* hand-written elastic decode
    round trip: quantise (FP8: V2 never quantises; the same Triton quantiser the router uses) ->
    ``dispatch(do_expand=True, do_cpu_sync=False)`` -> identity executor -> the top-k weighting of the expanded rows
    in place (one Triton launch over the valid rows on CUDA) -> ``combine``. Its ``name`` attribute says which
    weighting ran."""
    del capacity
    if not low_latency:
        return None
    device = x.device
    _, quantize = quantizer_for(quant, device)
    name, weigh = row_weighter_for(device)
    outputs = Bf16Outputs()

    def trip() -> Any:
        recv, _, recv_w, handle, _ = buffer.dispatch(quantize(x), topk_idx=ids, topk_weights=weights,
                                                     num_experts=num_experts, do_cpu_sync=False, do_expand=True)
        y = outputs(recv[0]) if quant.is_fp8 else recv
        weigh(y, recv_w, handle.psum_num_recv_tokens_per_expert[-1:])
        return buffer.combine(y, handle)[0]
    trip.name = name  # type: ignore[attr-defined]
    return trip


def _reference() -> type:
    from ..providers.reference import ReferenceElasticBuffer

    return ReferenceElasticBuffer


SPEC: BackendSpec = register(BackendSpec(
    name="elastic",
    summary="deep_ep.ElasticBuffer (DeepEP 2.1 V2 API): one NCCL-based dispatch/combine",
    library=Library(
        modules=("deep_ep",), attribute="ElasticBuffer", import_check="deep_ep_import", api_check="elastic_api",
        install_hint="ElasticBuffer is DeepEP 2.1's (install sgl-deep-ep==0.1.2.post1); a deep_ep without it is "
                     "either older (V1 Buffer only) or DeepEP 2.5, whose EPBuffer replaced it "
                     "(RTP_LLM_DEEPEP_BACKEND=ep)"),
    reference=_reference,
    plan=plan,
    normal_path=ElasticNormalPath,
    low_latency_path=ElasticLowLatencyPath,
    host_checks=host_checks,
    check_names=("nccl_runtime", "nccl_build_match", "gin"),
    raw_round_trip=raw_round_trip,
    raw_weighted_round_trip=raw_weighted_round_trip,
    auto_priority=10,
))
