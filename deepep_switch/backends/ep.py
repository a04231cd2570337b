"""The ep generation: DeepEP 2.5's ``EPBuffer``, the successor of 2.1's ElasticBuffer (validated on 2 H200s).

* import: the first of ``deep_ep_v25`` (PyPI ``sgl-deep-ep-v25``) and ``deep_ep`` (upstream DeepEP 2.5 wheels) that
  has ``EPBuffer``. The generation is told by the class a module has, never by its name: sgl-deep-ep 2.1's
  ``deep_ep`` has ``Buffer`` and ``ElasticBuffer`` but no ``EPBuffer``; upstream 2.5's ``deep_ep`` has ``EPBuffer``
  and neither of the others;
* preflight: runtime NCCL >= 2.32.3; exactly one libnccl mapped in the process (2.5's import asserts it); nvcc
  >= 13.1 within CUDA 13 where 2.5's run-time compiler looks for it; NCCL GIN or ``EP_DISABLE_GIN=1`` (the same
  ``gin`` check as elastic). sgl-deep-ep 2.1's ElasticBuffer needs its build NCCL (2.30.7) exactly, so elastic and
  ep never run in one process with it; its legacy ``Buffer`` runs beside ``EPBuffer``;
* sizing: ``EPBuffer.get_buffer_size_hint(group, M, H, K, fp8, hybrid, multiple_reduction)`` (2.1's signature);
  the constructor gets only keywords 2.5 takes (:data:`EP_BUFFER_KWARGS`; 2.1's ``num_cpu_bytes`` is gone) and
  the ``RTP_LLM_DEEPEP_ELASTIC_*`` knobs apply to it as to ElasticBuffer;
* paths: elastic's. Every ``dispatch``/``combine`` keyword they pass exists in 2.5 with the same meaning, and 2.5
  moves tokens as 2.1 does (``docs/architecture.md``); the one change is that the top-k ids go to 2.5 as a private
  copy: 2.5 keeps ``topk_idx`` by reference in its handle (``do_handle_copy`` must be False) and asserts if the
  tensor changes before the combine, where 2.1 copied it, so callers may keep reusing their ids tensor;
* reference: :class:`~deepep_switch.providers.reference.ReferenceEPBuffer`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..backend import Backend
from ..checks import Check, HostView, Version, format_version
from ..config import DeepepWrapperConfig
from ..settings import SwitchSettings, env_name
from . import elastic
from .contracts import LowLatencyDispatch, NormalDispatch, XType
from .registry import register
from .spec import BackendSpec, BufferPlan, Library

# DeepEP 2.5 needs NCCL >= 2.32.3 (its import checks nccl.h; EPBuffer runs on the runtime library).
MIN_NCCL: Version = (2, 32, 3)
# Its run-time compiler: nvcc 13.1 or newer within CUDA 13 (the wheels are CUDA 13 builds).
NVCC_CUDA_MAJOR, NVCC_MIN_MINOR = 13, 1
# Every keyword EPBuffer's constructor takes (deep_ep_v25/buffers/ep.py); plans pass no others.
EP_BUFFER_KWARGS = frozenset({
    "num_bytes", "num_max_tokens_per_rank", "hidden", "num_topk", "use_fp8_dispatch",
    "lb_allocation_plan_or_num_bytes", "deterministic", "allow_hybrid_mode", "allow_multiple_reduction",
    "prefer_overlap_with_compute", "sl_idx", "num_allocated_qps", "num_cpu_timeout_secs", "num_gpu_timeout_secs",
    "explicitly_destroy",
})
_SET_NVCC = ("set EP_JIT_NVCC_COMPILER to an nvcc >= 13.1 (CUDA 13), or CUDA_HOME to a CUDA 13.1+ toolkit; "
             "DeepEP 2.5 compiles its kernels at run time")


# ---------------------------------------------------------------------------------------------- preflight
def host_checks(host: HostView, settings: SwitchSettings) -> list[Check]:
    """The facts DeepEP 2.5 asserts on at import or construction: NCCL version, one libnccl, nvcc, GIN."""
    gates = (SPEC.backend,)
    return [_nccl_check(host, gates), _one_libnccl_check(host, gates), _nvcc_check(host, settings, gates),
            elastic.gin_check(host, settings, gates)]


def _nccl_check(host: HostView, gates: tuple[Backend, ...]) -> Check:
    runtime, where = host.nccl_runtime
    ok = runtime is not None and runtime >= MIN_NCCL
    found = f"runtime NCCL {format_version(runtime)} ({where})" if runtime else f"runtime NCCL unknown: {where}"
    return Check(name="ep_nccl_runtime", passed=ok, gates=gates, detail=found + ("" if ok else (
        f"; EPBuffer needs NCCL >= {format_version(MIN_NCCL)}: install nvidia-nccl-cu13>="
        f"{format_version(MIN_NCCL)} (2.1's ElasticBuffer then cannot run in this process; its legacy Buffer can)")))


def _one_libnccl_check(host: HostView, gates: tuple[Backend, ...]) -> Check:
    name, mapped = "ep_single_libnccl", host.mapped_libnccl
    if mapped is None:
        return Check(name=name, passed=False, gates=gates, detail=(
            f"{type(host.probe).__name__} cannot list the libnccl files mapped in this process; DeepEP 2.5 "
            "asserts there is exactly one"))
    if len(mapped) == 1:
        return Check(name=name, passed=True, gates=gates, detail=f"one libnccl mapped: {mapped[0]}")
    if not mapped:
        return Check(name=name, passed=False, gates=gates, detail=(
            "no libnccl is mapped in this process: DeepEP 2.5 runs on the NCCL torch loads (a CUDA build of torch "
            "maps it on import) and asserts there is exactly one, the nvidia-nccl package's"))
    return Check(name=name, passed=False, gates=gates, detail=(
        f"{len(mapped)} libnccl files are mapped ({', '.join(mapped)}); DeepEP 2.5 asserts exactly one, identical to "
        "the nvidia-nccl package's: make torch and DeepEP load the same one (check LD_LIBRARY_PATH and "
        "LD_PRELOAD)"))


def nvcc_choice(settings: SwitchSettings) -> tuple[Optional[str], str]:
    """The nvcc DeepEP 2.5's run-time compiler picks, in its order, and where that choice came from:
    ``EP_JIT_NVCC_COMPILER``, ``DJ_JIT_NVCC_COMPILER``, ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``; None
    leaves the rest to the probe (``nvcc`` on the search path, then ``/usr/local/cuda/bin/nvcc``)."""
    for field in ("ep_jit_nvcc_compiler", "dj_jit_nvcc_compiler"):
        value = getattr(settings, field)
        if value:
            return value, env_name(field)
    for field in ("cuda_home", "cuda_path"):
        value = getattr(settings, field)
        if value:
            return os.path.join(value, "bin", "nvcc"), f"${env_name(field)}/bin/nvcc"
    return None, "PATH or /usr/local/cuda"


def _nvcc_check(host: HostView, settings: SwitchSettings, gates: tuple[Backend, ...]) -> Check:
    name = "ep_nvcc"
    chosen, source = nvcc_choice(settings)
    path, version, why = host.nvcc(chosen)
    if version is None:
        stop = (f" ({source} is set, so DeepEP 2.5 uses it and looks no further)" if chosen is not None else "")
        return Check(name=name, passed=False, gates=gates, detail=f"no usable nvcc: {why}{stop}; {_SET_NVCC}")
    seen = f"nvcc {version[0]}.{version[1]} at {path} (from {source})"
    ok = version[0] == NVCC_CUDA_MAJOR and version[1] >= NVCC_MIN_MINOR
    return Check(name=name, passed=ok, gates=gates, detail=seen + ("" if ok else f"; {_SET_NVCC}"))


# ---------------------------------------------------------------------------------------------- sizing
def plan(buffer_cls: Any, group: dist.ProcessGroup, config: DeepepWrapperConfig,
         settings: SwitchSettings) -> BufferPlan:
    """Size an ``EPBuffer`` from its own hint. 2.5 kept the hint's signature and every constructor keyword
    elastic's plan passes, so that plan serves, under this generation's name."""
    base = elastic.plan(buffer_cls, group, config, settings)
    # timeout_s reaches only classes whose signature takes it (the reference providers; see accepted_kwargs).
    unknown = set(base.kwargs) - EP_BUFFER_KWARGS - {"timeout_s"}
    assert not unknown, f"EPBuffer takes no {sorted(unknown)}"
    return BufferPlan(SPEC.backend, base.kwargs, {"ep": base.bytes["elastic"]}, base.capacity)


# ---------------------------------------------------------------------------------------------- paths
class EPNormalPath(elastic.ElasticNormalPath):
    """:class:`~deepep_switch.backends.elastic.ElasticNormalPath` on ``EPBuffer``, giving 2.5 its own copy of
    the top-k ids (its handle keeps them by reference until the combine)."""

    buffer_name = "EPBuffer"

    def dispatch(self, x: XType, ids: torch.Tensor, weights: torch.Tensor) -> NormalDispatch:
        return super().dispatch(x, ids.clone(), weights)


class EPLowLatencyPath(elastic.ElasticLowLatencyPath):
    """:class:`~deepep_switch.backends.elastic.ElasticLowLatencyPath` on ``EPBuffer`` (token or expand layout, no
    host sync), giving 2.5 its own copy of the top-k ids."""

    buffer_name = "EPBuffer"

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> LowLatencyDispatch:
        return super().dispatch(x, ids.clone(), weights)


def _reference() -> type:
    from ..providers.reference import ReferenceEPBuffer

    return ReferenceEPBuffer


SPEC: BackendSpec = register(BackendSpec(
    name="ep",
    summary="EPBuffer (DeepEP 2.5: deep_ep_v25 or upstream deep_ep): ElasticBuffer's successor, compiled at run time",
    library=Library(
        modules=("deep_ep_v25", "deep_ep"), attribute="EPBuffer", import_check="ep_import", api_check="ep_api",
        install_hint="EPBuffer is DeepEP 2.5's: install sgl-deep-ep-v25 (imported as deep_ep_v25, beside "
                     "sgl-deep-ep's deep_ep) or an upstream DeepEP 2.5 wheel (deep_ep); it needs NCCL >= 2.32.3 and "
                     "nvcc >= 13.1 at run time"),
    reference=_reference,
    plan=plan,
    normal_path=EPNormalPath,
    low_latency_path=EPLowLatencyPath,
    host_checks=host_checks,
    check_names=("ep_nccl_runtime", "ep_single_libnccl", "ep_nvcc", "gin"),
    raw_round_trip=elastic.raw_round_trip,  # its calls are 2.5's too; the bench's ids are never changed
    raw_weighted_round_trip=elastic.raw_weighted_round_trip,
    auto_priority=20,
))
