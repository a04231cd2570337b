"""Preflight: what this machine can run, found cheaply and without allocating any communication buffer.

The checks that gate every generation (a visible GPU, SM90) are here; each generation adds its own from its module
(its library's import and class, and e.g. elastic's NCCL and GIN rules, ep's NCCL, libnccl and nvcc rules). Every
probe of the host goes through a :class:`~deepep_switch.checks.Probe`, so tests can fake a library, a version, a
NIC or a compiler. The result is a :class:`PreflightReport`: one :class:`Check` per fact, each with pass/fail, a
sentence a person can act on, and the generations it gates. Nothing here talks to other ranks;
:mod:`deepep_switch.decision` does that.
"""

from __future__ import annotations

import logging
from typing import Optional

from pydantic import BaseModel, Field

from .backend import Backend
from .backends import registered
from .backends.spec import BackendSpec
from .checks import (Check, HostView, Probe, SystemProbe, Version, decode_nccl_version_code, format_version,
                     parse_version)
from .settings import ProviderChoice, SwitchSettings

logger = logging.getLogger("deepep_switch.preflight")

__all__ = ["CHECK_NAMES", "Check", "PreflightReport", "Probe", "SystemProbe", "Version", "check_names",
           "decode_nccl_version_code", "format_version", "parse_version", "run_preflight"]

def check_names() -> tuple[str, ...]:
    """Every check name, in report order: the bit a failed check takes in a rank's vote (see decision.py)."""
    specs = registered()
    library = [n for s in specs for n in s.all_check_names[:2]]
    host = [n for s in specs for n in s.check_names]
    return tuple(dict.fromkeys(["reference_provider", *library, "cuda_device", "gpu_arch", *host, "nvlink"]))


CHECK_NAMES = check_names()
"""The built-in generations' check names (``check_names()`` also covers generations registered later)."""


class PreflightReport(BaseModel):
    """What this process can run. Produced by :func:`run_preflight`; carried in every BackendDecision."""

    provider: ProviderChoice
    deep_ep_version: Optional[str] = None
    libraries: dict[str, str] = Field(default_factory=dict, description="imported module -> version")
    classes: dict[str, bool] = Field(default_factory=dict, description="generation -> its buffer class was found")
    nccl_runtime_version: Optional[str] = None
    nccl_build_version: Optional[str] = None
    gpu_count: int = 0
    nvlink: Optional[bool] = None
    rdma_nics: list[str] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)

    @property
    def has_buffer(self) -> bool:
        return self.classes.get(Backend.LEGACY.value, False)

    @property
    def has_elastic_buffer(self) -> bool:
        return self.classes.get(Backend.ELASTIC.value, False)

    @property
    def has_ep_buffer(self) -> bool:
        return self.classes.get(Backend.EP.value, False)

    def can_run(self, backend: Backend) -> bool:
        return not self.failures(backend)

    def failures(self, backend: Backend) -> list[Check]:
        return [c for c in self.checks if backend in c.gates and not c.passed]

    def failure_mask(self, backend: Backend) -> int:
        """Bit ``check_names().index(name)`` set for each failed check gating ``backend``."""
        names = check_names()
        return sum(1 << names.index(c.name) for c in self.failures(backend))

    def summary(self, backend: Backend) -> str:
        failed = self.failures(backend)
        if not failed:
            return f"{backend.value}: all preflight checks passed"
        return f"{backend.value} unavailable: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)


def run_preflight(settings: SwitchSettings, probe: Optional[Probe] = None, internode: bool = False) -> PreflightReport:
    """Probe what this process can run with the configured provider.

    Args:
        settings: the effective settings (provider, ``EP_DISABLE_GIN``, ``nccl_build_version``).
        probe: how to look at the host; :class:`SystemProbe` by default.
        internode: whether the EP group spans nodes (GIN is then required even with ``EP_DISABLE_GIN``).
    """
    probe = probe or SystemProbe()
    specs = registered()
    if settings.provider is ProviderChoice.REFERENCE:
        report = _reference_report(probe, specs)
    else:
        report = _deep_ep_report(settings, HostView(probe, internode), specs)
    for check in report.checks:
        logger.debug("preflight %s: %s (%s)", check.name, "pass" if check.passed else "FAIL", check.detail)
    return report


def _reference_report(probe: Probe, specs: tuple[BackendSpec, ...]) -> PreflightReport:
    ok = probe.has_torch_distributed()
    detail = ("pure-PyTorch reference providers over torch.distributed" if ok
              else "torch.distributed is not available in this torch build")
    return PreflightReport(
        provider=ProviderChoice.REFERENCE, classes={s.name: ok for s in specs}, gpu_count=probe.gpu_count(),
        checks=[Check(name="reference_provider", passed=ok, detail=detail, gates=tuple(s.backend for s in specs))],
    )


def _merge(checks: list[Check], new: Check) -> None:
    """Add ``new``; a check of the same name (two generations from one module) gates both."""
    for i, old in enumerate(checks):
        if old.name == new.name:
            checks[i] = old.model_copy(update={"gates": old.gates + tuple(g for g in new.gates if g not in old.gates)})
            return
    checks.append(new)


def _library_checks(spec: BackendSpec, host: HostView, report: PreflightReport) -> list[Check]:
    """The library's import check (some module imports) and class check (an imported module has the class).

    A generation is recognised by the class a module has, never by the module's name (upstream DeepEP 2.5's
    ``deep_ep`` has ``EPBuffer`` and no ``Buffer``); a missing class says which generations' classes the module
    does have, and why the other modules did not import."""
    lib, gates = spec.library, (spec.backend,)
    found = [(host.library(m), m) for m in lib.modules]
    imported = [(i, m) for i, m in found if i.error is None]
    failed = [f"import {m} failed: {i.error}" for i, m in found if i.error is not None]
    for info, module in imported:
        report.libraries[module] = info.version or "unknown"
    if not imported:
        return [Check(name=lib.import_check, passed=False, gates=gates,
                      detail=f"{'; '.join(failed)}. {lib.install_hint}."),
                Check(name=lib.api_check, passed=False, gates=gates, detail=f"{lib.attribute}: no module imported")]
    with_class = [(i, m) for i, m in imported if lib.attribute in i.attributes]
    report.classes[spec.name] = bool(with_class)
    info, module = (with_class or imported)[0]
    checks = [Check(name=lib.import_check, passed=True, gates=gates,
                    detail=f"{module} {info.version} from {info.origin}")]
    if with_class:
        checks.append(Check(name=lib.api_check, passed=True, gates=gates, detail=f"{module}.{lib.attribute} present"))
        return checks
    has = [f"{m} {i.version} has {', '.join(others)}" for i, m in imported
           if (others := [f"{s.library.attribute} ({s.name})" for s in registered()
                          if s is not spec and s.library.attribute in i.attributes])]
    detail = f"{lib.attribute} missing from {', '.join(m for _, m in imported)}"
    detail += "".join(f"; {part}" for part in has + failed)
    checks.append(Check(name=lib.api_check, passed=False, gates=gates, detail=f"{detail}. {lib.install_hint}"))
    return checks


def _deep_ep_report(settings: SwitchSettings, host: HostView, specs: tuple[BackendSpec, ...]) -> PreflightReport:
    report = PreflightReport(provider=ProviderChoice.DEEP_EP)
    checks = report.checks
    everyone = tuple(s.backend for s in specs)
    for spec in specs:
        for check in _library_checks(spec, host, report):
            _merge(checks, check)
    report.deep_ep_version = report.libraries.get("deep_ep")

    report.gpu_count = host.probe.gpu_count()
    checks.append(Check(name="cuda_device", passed=report.gpu_count > 0, gates=everyone, detail=(
        f"{report.gpu_count} CUDA device(s) visible" if report.gpu_count else
        "no CUDA device visible (check CUDA_VISIBLE_DEVICES and the driver); on a CPU-only machine use "
        "DEEPEP_SWITCH_PROVIDER=reference")))
    capability = host.probe.gpu_capability()
    arch_ok = capability is not None and capability >= (9, 0)
    checks.append(Check(name="gpu_arch", passed=arch_ok, gates=everyone, detail=(
        f"compute capability {capability[0]}.{capability[1]}" if capability else "no GPU to query")
        + ("" if arch_ok else "; DeepEP needs SM90 (Hopper) or newer")))

    for spec in specs:
        for check in spec.host_checks(host, settings):
            _merge(checks, check)
    report.nccl_runtime_version = format_version(host.nccl_runtime[0])
    report.nccl_build_version = host.facts.get("nccl_build_version")
    report.rdma_nics = host.rdma_nics

    report.nvlink = host.probe.nvlink_active()
    checks.append(Check(name="nvlink", passed=report.nvlink is True, gates=(), detail={
        True: "NVLink links active on GPU 0",
        False: "no active NVLink on GPU 0: DeepEP intranode kernels expect NVLink between local GPUs",
        None: "NVLink state unknown (no NVML)",
    }[report.nvlink]))
    return report
