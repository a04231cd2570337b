"""Host facts for preflight: the :class:`Check` record, the :class:`Probe` that looks at the host, version helpers.

Kept apart from :mod:`deepep_switch.preflight` so each generation's module (``deepep_switch/backends/*.py``) can
declare its own checks with these primitives without importing the registry that imports it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
from types import ModuleType
from typing import Optional, Protocol

from pydantic import BaseModel, Field

from .backend import Backend

Version = tuple[int, int, int]


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


class Probe(Protocol):
    """How preflight looks at the host. :class:`SystemProbe` is the real one; tests pass fakes."""

    def import_module(self, name: str) -> ModuleType: ...
    def distribution(self, module: str) -> Optional[tuple[str, str]]: ...
    def nccl_runtime_version(self) -> tuple[Optional[Version], str]: ...
    def gpu_count(self) -> int: ...
    def gpu_capability(self) -> Optional[tuple[int, int]]: ...
    def rdma_nics(self) -> list[str]: ...
    def nvlink_active(self) -> Optional[bool]: ...
    def has_torch_distributed(self) -> bool: ...
    def mapped_libnccl(self) -> list[str]: ...
    def nvcc(self, path: Optional[str]) -> tuple[str, Optional[tuple[int, int]], str]: ...


# Which PyPI distributions install each DeepEP import name (first found wins).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "deep_ep": ("sgl-deep-ep", "deep-ep", "deep_ep"),
    "deep_ep_v25": ("sgl-deep-ep-v25",),
}


class SystemProbe:
    """Looks at the real process and host."""

    def import_module(self, name: str) -> ModuleType:
        return importlib.import_module(name)

    def distribution(self, module: str) -> Optional[tuple[str, str]]:
        for name in DISTRIBUTIONS.get(module, (module,)):
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

    def mapped_libnccl(self) -> list[str]:
        """Every distinct libnccl file mapped into this process (``/proc/self/maps``), in map order."""
        return _mapped_libnccl()

    def nvcc(self, path: Optional[str]) -> tuple[str, Optional[tuple[int, int]], str]:
        """Run ``path --version``; with ``path`` None, the ``nvcc`` on the search path, else
        ``/usr/local/cuda/bin/nvcc`` (the end of DeepEP 2.5's JIT look-up).

        Returns ``(the nvcc run, its CUDA release (major, minor) or None, why None)``.
        """
        path = path or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        try:
            output = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60,
                                    check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return path, None, f"cannot run {path} --version ({type(exc).__name__}: {exc})"
        found = re.search(r"release (\d+)\.(\d+)", output)
        if found is None:
            return path, None, f"cannot read a CUDA release in the output of {path} --version"
        return path, (int(found.group(1)), int(found.group(2))), ""


def _mapped_libnccl() -> list[str]:
    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.strip().split(" ")[-1]
                if "libnccl" in os.path.basename(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def _loaded_libnccl() -> Optional[str]:
    mapped = _mapped_libnccl()
    return mapped[0] if mapped else None


def _pip_libnccl() -> Optional[str]:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl") or name.startswith("nvidia_nccl"):
            for file in dist.files or []:
                if "libnccl.so" in str(file):
                    return str(file.locate())
    found = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libnccl.so*"))
    return found[0] if found else None


class Imported(BaseModel):
    """The outcome of importing one library module during preflight."""

    module: Optional[str] = None
    version: Optional[str] = None
    origin: Optional[str] = None
    error: Optional[str] = None
    attributes: tuple[str, ...] = ()


class HostView:
    """One preflight's memoised view of the host, shared by every generation's checks.

    Args:
        probe: how to look at the host.
        internode: whether the EP group spans nodes.
    """

    def __init__(self, probe: Probe, internode: bool) -> None:
        self.probe = probe
        self.internode = internode
        self.facts: dict[str, str] = {}
        """Facts a generation's checks found that the report shows (e.g. ``nccl_build_version``)."""

    @functools.lru_cache(maxsize=None)
    def library(self, module: str) -> Imported:
        """Import ``module`` once. DeepEP raises ImportError for missing prerequisites and AssertionError (or
        RuntimeError) from its import-time NCCL/CUDA checks: every one of them is a fact here, never a crash."""
        try:
            mod = self.probe.import_module(module)
        except Exception as exc:
            return Imported(module=module, error=f"{type(exc).__name__}: {exc}")
        dist = self.probe.distribution(module)
        version = str(getattr(mod, "__version__", None) or (dist[1] if dist else "unknown"))
        return Imported(module=module, version=version, origin=str(getattr(mod, "__file__", "?")),
                        attributes=tuple(a for a in dir(mod) if not a.startswith("_")))

    @functools.cached_property
    def nccl_runtime(self) -> tuple[Optional[Version], str]:
        return self.probe.nccl_runtime_version()

    @functools.cached_property
    def rdma_nics(self) -> list[str]:
        return self.probe.rdma_nics()

    @functools.cached_property
    def mapped_libnccl(self) -> Optional[list[str]]:
        """The libnccl files mapped into this process; None when the probe cannot tell (one written before
        :meth:`Probe.mapped_libnccl` existed)."""
        method = getattr(self.probe, "mapped_libnccl", None)
        return None if method is None else list(method())

    @functools.lru_cache(maxsize=None)
    def nvcc(self, path: Optional[str]) -> tuple[str, Optional[tuple[int, int]], str]:
        """:meth:`Probe.nvcc`, once per path; a probe without it finds nothing."""
        method = getattr(self.probe, "nvcc", None)
        if method is None:
            return path or "nvcc", None, f"{type(self.probe).__name__} cannot run nvcc"
        return method(path)
