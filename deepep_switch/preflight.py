"""Preflight: what this machine can run, found cheaply and without allocating any communication buffer.

Every probe of the host goes through a :class:`Probe`, so tests can fake a library, a version or a NIC. The
result is a :class:`PreflightReport`: one :class:`Check` per fact, each with pass/fail, a sentence a person can
act on, and the backends it gates. Nothing here talks to other ranks; :mod:`deepep_switch.decision` does that.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.metadata
import logging
import os
from types import ModuleType
from typing import Optional, Protocol

from pydantic import BaseModel, Field

from .backend import Backend
from .settings import ProviderChoice, SwitchSettings

logger = logging.getLogger("deepep_switch.preflight")

Version = tuple[int, int, int]

# ElasticBuffer needs NCCL >= 2.30.4 at run time (DeepEP README).
MIN_ELASTIC_NCCL: Version = (2, 30, 4)
# DeepEP built against NCCL < 2.31 asserts that the runtime NCCL is exactly the build one (csrc nccl backend).
EXACT_MATCH_BELOW: Version = (2, 31, 0)
# NCCL that known DeepEP binary distributions were compiled against.
KNOWN_BUILDS: dict[tuple[str, str], Version] = {
    ("sgl-deep-ep", "0.1.2.post1"): (2, 30, 7),
}
DEEP_EP_DISTRIBUTIONS = ("sgl-deep-ep", "deep-ep", "deep_ep")

BOTH = (Backend.LEGACY, Backend.ELASTIC)
ELASTIC_ONLY = (Backend.ELASTIC,)
ADVISORY: tuple[Backend, ...] = ()

# Stable order of every check name: the bit a check takes in a rank's vote (see decision.py).
CHECK_NAMES = (
    "reference_provider", "deep_ep_import", "buffer_api", "elastic_api", "cuda_device", "gpu_arch",
    "nccl_runtime", "nccl_build_match", "gin", "nvlink",
)


def format_version(version: Optional[Version]) -> Optional[str]:
    return None if version is None else ".".join(map(str, version))


def parse_version(text: str) -> Version:
    """``"2.30.7"`` -> ``(2, 30, 7)``; raises ValueError on anything else."""
    parts = text.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a MAJOR.MINOR.PATCH version: {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def decode_nccl_version_code(code: int) -> Version:
    """Decode ``ncclGetVersion``'s integer: ``MAJOR*10000+MINOR*100+PATCH`` since 2.9, ``*1000`` before."""
    if code >= 10000:
        return code // 10000, (code % 10000) // 100, code % 100
    return code // 1000, (code % 1000) // 100, code % 100


class Check(BaseModel):
    """One preflight fact."""

    name: str
    passed: bool
    detail: str = Field(description="What was found and, on failure, what to do about it.")
    gates: tuple[Backend, ...] = Field(description="Backends that cannot run unless this passes; () = advisory.")


class PreflightReport(BaseModel):
    """What this process can run. Produced by :func:`run_preflight`; carried in every BackendDecision."""

    provider: ProviderChoice
    deep_ep_version: Optional[str] = None
    has_buffer: bool = False
    has_elastic_buffer: bool = False
    nccl_runtime_version: Optional[str] = None
    nccl_build_version: Optional[str] = None
    gpu_count: int = 0
    nvlink: Optional[bool] = None
    rdma_nics: list[str] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)

    def can_run(self, backend: Backend) -> bool:
        return not self.failures(backend)

    def failures(self, backend: Backend) -> list[Check]:
        return [c for c in self.checks if backend in c.gates and not c.passed]

    def failure_mask(self, backend: Backend) -> int:
        """Bit ``CHECK_NAMES.index(name)`` set for each failed check gating ``backend``."""
        return sum(1 << CHECK_NAMES.index(c.name) for c in self.failures(backend))

    def summary(self, backend: Backend) -> str:
        failed = self.failures(backend)
        if not failed:
            return f"{backend.value}: all preflight checks passed"
        return f"{backend.value} unavailable: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)


class Probe(Protocol):
    """How preflight looks at the host. :class:`SystemProbe` is the real one; tests pass fakes."""

    def import_deep_ep(self) -> ModuleType: ...
    def deep_ep_distribution(self) -> Optional[tuple[str, str]]: ...
    def nccl_runtime_version(self) -> tuple[Optional[Version], str]: ...
    def gpu_count(self) -> int: ...
    def gpu_capability(self) -> Optional[tuple[int, int]]: ...
    def rdma_nics(self) -> list[str]: ...
    def nvlink_active(self) -> Optional[bool]: ...
    def has_torch_distributed(self) -> bool: ...


class SystemProbe:
    """Looks at the real process and host."""

    def import_deep_ep(self) -> ModuleType:
        return importlib.import_module("deep_ep")

    def deep_ep_distribution(self) -> Optional[tuple[str, str]]:
        for name in DEEP_EP_DISTRIBUTIONS:
            try:
                return name, importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def nccl_runtime_version(self) -> tuple[Optional[Version], str]:
        """``ncclGetVersion`` of the libnccl loaded in this process (else the pip one torch would load)."""
        path = _loaded_libnccl() or _pip_libnccl()
        if path is None:
            return None, "no libnccl is loaded and no nvidia-nccl package was found"
        try:
            lib = ctypes.CDLL(path)
            code = ctypes.c_int(0)
            if lib.ncclGetVersion(ctypes.byref(code)) != 0:
                return None, f"ncclGetVersion failed in {path}"
        except (OSError, AttributeError) as exc:
            return None, f"cannot call ncclGetVersion in {path}: {exc}"
        return decode_nccl_version_code(code.value), path

    def gpu_count(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def gpu_capability(self) -> Optional[tuple[int, int]]:
        import torch

        return tuple(torch.cuda.get_device_capability(0)) if self.gpu_count() else None  # type: ignore[return-value]

    def rdma_nics(self) -> list[str]:
        root = "/sys/class/infiniband"
        return sorted(os.listdir(root)) if os.path.isdir(root) else []

    def nvlink_active(self) -> Optional[bool]:
        try:
            import pynvml  # nvidia-ml-py, a dependency of sgl-deep-ep
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                active = 0
                for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                    try:
                        active += int(pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED)
                    except pynvml.NVMLError:
                        break
                return active > 0
            finally:
                pynvml.nvmlShutdown()
        except Exception:  # NVML missing or no GPU: NVLink is simply unknown
            return None

    def has_torch_distributed(self) -> bool:
        import torch.distributed as dist

        return dist.is_available()


def _loaded_libnccl() -> Optional[str]:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.strip().split(" ")[-1]
                if "libnccl" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def _pip_libnccl() -> Optional[str]:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl") or name.startswith("nvidia_nccl"):
            for file in dist.files or []:
                if "libnccl.so" in str(file):
                    return str(file.locate())
    found = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libnccl.so*"))
    return found[0] if found else None


def run_preflight(settings: SwitchSettings, probe: Optional[Probe] = None, internode: bool = False) -> PreflightReport:
    """Probe what this process can run with the configured provider.

    Args:
        settings: the effective settings (provider, ``EP_DISABLE_GIN``, ``nccl_build_version``).
        probe: how to look at the host; :class:`SystemProbe` by default.
        internode: whether the EP group spans nodes (GIN is then required even with ``EP_DISABLE_GIN``).
    """
    probe = probe or SystemProbe()
    if settings.provider is ProviderChoice.REFERENCE:
        report = _reference_report(probe)
    else:
        report = _deep_ep_report(settings, probe, internode)
    for check in report.checks:
        logger.debug("preflight %s: %s (%s)", check.name, "pass" if check.passed else "FAIL", check.detail)
    return report


def _reference_report(probe: Probe) -> PreflightReport:
    ok = probe.has_torch_distributed()
    detail = ("pure-PyTorch reference providers over torch.distributed" if ok
              else "torch.distributed is not available in this torch build")
    return PreflightReport(
        provider=ProviderChoice.REFERENCE, has_buffer=ok, has_elastic_buffer=ok, gpu_count=probe.gpu_count(),
        checks=[Check(name="reference_provider", passed=ok, detail=detail, gates=BOTH)],
    )


def _deep_ep_report(settings: SwitchSettings, probe: Probe, internode: bool) -> PreflightReport:
    report = PreflightReport(provider=ProviderChoice.DEEP_EP)
    checks = report.checks

    module: Optional[ModuleType] = None
    try:
        module = probe.import_deep_ep()
    except Exception as exc:  # ImportError, or DeepEP's own import-time assertions (NCCL mismatch, CUDA major)
        checks.append(Check(name="deep_ep_import", passed=False, gates=BOTH, detail=(
            f"import deep_ep failed: {type(exc).__name__}: {exc}. Install the gpu extra "
            "(pip install 'deepep-switch[gpu]', i.e. sgl-deep-ep==0.1.2.post1) on a CUDA 13 host.")))
    else:
        dist = probe.deep_ep_distribution()
        report.deep_ep_version = str(getattr(module, "__version__", None) or (dist[1] if dist else "unknown"))
        checks.append(Check(name="deep_ep_import", passed=True, gates=BOTH,
                            detail=f"deep_ep {report.deep_ep_version} from {getattr(module, '__file__', '?')}"))
    report.has_buffer = module is not None and hasattr(module, "Buffer")
    report.has_elastic_buffer = module is not None and hasattr(module, "ElasticBuffer")
    checks.append(Check(name="buffer_api", passed=report.has_buffer, gates=(Backend.LEGACY,), detail=(
        "deep_ep.Buffer present" if report.has_buffer else "deep_ep.Buffer missing from this deep_ep")))
    checks.append(Check(name="elastic_api", passed=report.has_elastic_buffer, gates=ELASTIC_ONLY, detail=(
        "deep_ep.ElasticBuffer present" if report.has_elastic_buffer else
        "deep_ep.ElasticBuffer missing: this deep_ep predates DeepEP 2.x (V1 only); install sgl-deep-ep>=0.1.2")))

    report.gpu_count = probe.gpu_count()
    checks.append(Check(name="cuda_device", passed=report.gpu_count > 0, gates=BOTH, detail=(
        f"{report.gpu_count} CUDA device(s) visible" if report.gpu_count else
        "no CUDA device visible (check CUDA_VISIBLE_DEVICES and the driver)")))
    capability = probe.gpu_capability()
    arch_ok = capability is not None and capability >= (9, 0)
    checks.append(Check(name="gpu_arch", passed=arch_ok, gates=BOTH, detail=(
        f"compute capability {capability[0]}.{capability[1]}" if capability else "no GPU to query")
        + ("" if arch_ok else "; DeepEP needs SM90 (Hopper) or newer")))

    runtime, where = probe.nccl_runtime_version()
    report.nccl_runtime_version = format_version(runtime)
    runtime_ok = runtime is not None and runtime >= MIN_ELASTIC_NCCL
    checks.append(Check(name="nccl_runtime", passed=runtime_ok, gates=ELASTIC_ONLY, detail=(
        f"runtime NCCL {report.nccl_runtime_version} ({where})" if runtime else f"runtime NCCL unknown: {where}")
        + ("" if runtime_ok else f"; ElasticBuffer needs NCCL >= {format_version(MIN_ELASTIC_NCCL)} at run time")))

    build = _build_nccl(settings, probe)
    report.nccl_build_version = format_version(build)
    checks.append(_build_match_check(runtime, build))

    checks.append(_gin_check(settings, probe, report, internode))

    report.nvlink = probe.nvlink_active()
    checks.append(Check(name="nvlink", passed=report.nvlink is True, gates=ADVISORY, detail={
        True: "NVLink links active on GPU 0",
        False: "no active NVLink on GPU 0: DeepEP intranode kernels expect NVLink between local GPUs",
        None: "NVLink state unknown (no NVML)",
    }[report.nvlink]))
    return report


def _build_nccl(settings: SwitchSettings, probe: Probe) -> Optional[Version]:
    if settings.nccl_build_version:
        return parse_version(settings.nccl_build_version)
    dist = probe.deep_ep_distribution()
    return KNOWN_BUILDS.get(dist) if dist else None


def _build_match_check(runtime: Optional[Version], build: Optional[Version]) -> Check:
    name, gates = "nccl_build_match", ELASTIC_ONLY
    if build is None:
        if runtime is not None and runtime >= EXACT_MATCH_BELOW:
            return Check(name=name, passed=True, gates=gates,
                         detail="build NCCL unknown; runtime >= 2.31 uses NCCL's runtime-version devcomm")
        return Check(name=name, passed=False, gates=gates, detail=(
            "cannot tell which NCCL this DeepEP was compiled against; below NCCL 2.31 it must equal the runtime. "
            "Set RTP_LLM_DEEPEP_NCCL_BUILD_VERSION=MAJOR.MINOR.PATCH"))
    if build >= EXACT_MATCH_BELOW:
        ok = runtime is not None and runtime >= build
        return Check(name=name, passed=ok, gates=gates, detail=(
            f"DeepEP built with NCCL {format_version(build)}, runtime {format_version(runtime)}"
            + ("" if ok else f"; upgrade the runtime NCCL to >= {format_version(build)}")))
    ok = runtime == build
    return Check(name=name, passed=ok, gates=gates, detail=(
        f"DeepEP built with NCCL {format_version(build)}, runtime {format_version(runtime)}"
        + ("" if ok else f"; below 2.31 they must be equal: install nvidia-nccl-cu13=={format_version(build)}")))


def _gin_check(settings: SwitchSettings, probe: Probe, report: PreflightReport, internode: bool) -> Check:
    report.rdma_nics = probe.rdma_nics()
    name, gates = "gin", ELASTIC_ONLY
    if internode:
        ok = bool(report.rdma_nics) and not settings.ep_disable_gin
        return Check(name=name, passed=ok, gates=gates, detail=(
            f"internode EP over RDMA NICs {report.rdma_nics}" if ok else
            "internode ElasticBuffer needs NCCL GIN over an RDMA NIC: "
            + ("unset EP_DISABLE_GIN" if settings.ep_disable_gin else "no RDMA NIC in /sys/class/infiniband")))
    if report.rdma_nics:
        return Check(name=name, passed=True, gates=gates, detail=f"RDMA NICs {report.rdma_nics} (GIN possible)")
    if settings.ep_disable_gin:
        return Check(name=name, passed=True, gates=gates,
                     detail="no RDMA NIC; EP_DISABLE_GIN=1 (single-node NVLink ElasticBuffer)")
    return Check(name=name, passed=False, gates=gates, detail=(
        "no RDMA NIC, so ElasticBuffer would fail with 'NCCL GIN is unavailable'; "
        "set EP_DISABLE_GIN=1 for single-node NVLink"))
