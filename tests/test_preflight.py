"""Preflight with faked libraries: versions, the NCCL rules, a V1-only deep_ep, GIN, and the real probe."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import pytest

from deepep_switch.backend import Backend
from deepep_switch.preflight import (CHECK_NAMES, PreflightReport, SystemProbe, decode_nccl_version_code,
                                     parse_version, run_preflight)
from deepep_switch.settings import ProviderChoice, SwitchSettings


@dataclass
class FakeProbe:
    """A host described by fields instead of probed."""

    module: Optional[types.ModuleType] = field(default_factory=lambda: _deep_ep_module(elastic=True))
    import_error: Optional[BaseException] = None
    dist_info: Optional[tuple[str, str]] = ("sgl-deep-ep", "0.1.2.post1")
    nccl: Optional[tuple[int, int, int]] = (2, 30, 7)
    gpus: int = 2
    capability: Optional[tuple[int, int]] = (9, 0)
    nics: list[str] = field(default_factory=list)
    nvlink: Optional[bool] = True

    def import_module(self, name):
        if name != "deep_ep":
            raise ImportError(f"No module named {name!r}")
        if self.import_error is not None:
            raise self.import_error
        return self.module

    def distribution(self, module):
        return self.dist_info if module == "deep_ep" else None

    def nccl_runtime_version(self):
        return self.nccl, "/fake/libnccl.so.2"

    def gpu_count(self):
        return self.gpus

    def gpu_capability(self):
        return self.capability

    def rdma_nics(self):
        return list(self.nics)

    def nvlink_active(self):
        return self.nvlink

    def has_torch_distributed(self):
        return True


def _deep_ep_module(elastic: bool, version: str = "2.1.0") -> types.ModuleType:
    mod = types.ModuleType("deep_ep")
    mod.__version__ = version
    mod.Buffer = object
    if elastic:
        mod.ElasticBuffer = object
    return mod


def _settings(**kw) -> SwitchSettings:
    return SwitchSettings(**kw)


def _failed(report: PreflightReport, backend: Backend) -> set[str]:
    return {c.name for c in report.failures(backend)}


@pytest.mark.parametrize("text,expected", [("2.30.7", (2, 30, 7)), (" 2.31.0 ", (2, 31, 0))])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


@pytest.mark.parametrize("bad", ["2.30", "v2.30.7", "2.30.x", ""])
def test_parse_version_rejects(bad):
    with pytest.raises(ValueError):
        parse_version(bad)


@pytest.mark.parametrize("code,expected", [(23007, (2, 30, 7)), (23104, (2, 31, 4)), (22809, (2, 28, 9)),
                                           (2804, (2, 8, 4))])
def test_decode_nccl_version_code(code, expected):
    assert decode_nccl_version_code(code) == expected


def test_healthy_single_node_host_with_gin_disabled():
    report = run_preflight(_settings(ep_disable_gin=True), FakeProbe())
    assert report.can_run(Backend.LEGACY) and report.can_run(Backend.ELASTIC)
    assert report.deep_ep_version == "2.1.0" and report.nccl_runtime_version == "2.30.7"
    assert report.nccl_build_version == "2.30.7"
    assert [c.name for c in report.checks] == [n for n in CHECK_NAMES if n != "reference_provider"]


@pytest.mark.parametrize("runtime,ok", [((2, 30, 7), True), ((2, 30, 6), False), ((2, 30, 8), False),
                                        ((2, 32, 3), False), ((2, 28, 9), False)])
def test_pypi_build_needs_exactly_nccl_2_30_7(runtime, ok):
    report = run_preflight(_settings(ep_disable_gin=True), FakeProbe(nccl=runtime))
    assert report.can_run(Backend.ELASTIC) is ok
    assert report.can_run(Backend.LEGACY)  # the NCCL rules only gate elastic
    if not ok:
        assert _failed(report, Backend.ELASTIC) & {"nccl_runtime", "nccl_build_match"}


@pytest.mark.parametrize("runtime,build,ok", [
    ((2, 31, 2), None, True),          # unknown build, runtime >= 2.31: runtime-sized devcomm
    ((2, 30, 7), None, False),         # unknown build below 2.31: cannot verify
    ((2, 30, 3), (2, 30, 3), False),   # below the 2.30.4 floor even if equal
    ((2, 31, 5), (2, 31, 1), True),    # built >= 2.31: runtime may be newer
    ((2, 31, 0), (2, 31, 1), False),   # ...but not older
    ((2, 30, 5), (2, 30, 5), True),    # a source build, declared by the operator
])
def test_nccl_rules_for_other_builds(runtime, build, ok):
    settings = _settings(ep_disable_gin=True, nccl_build_version=".".join(map(str, build)) if build else "")
    probe = FakeProbe(nccl=runtime, dist_info=("deep-ep", "2.1.0+src"))
    assert run_preflight(settings, probe).can_run(Backend.ELASTIC) is ok


def test_unknown_runtime_nccl_blocks_elastic_only():
    report = run_preflight(_settings(ep_disable_gin=True), FakeProbe(nccl=None))
    assert _failed(report, Backend.ELASTIC) >= {"nccl_runtime"} and report.can_run(Backend.LEGACY)


def test_v1_only_deep_ep_keeps_legacy():
    report = run_preflight(_settings(ep_disable_gin=True), FakeProbe(module=_deep_ep_module(elastic=False, version="1.2.1")))
    assert report.can_run(Backend.LEGACY) and not report.has_elastic_buffer
    assert _failed(report, Backend.ELASTIC) == {"elastic_api"}
    assert "DeepEP 2.x" in report.failures(Backend.ELASTIC)[0].detail


@pytest.mark.parametrize("error", [ImportError("No module named 'deep_ep'"),
                                   AssertionError("Invalid NCCL versions: a (loaded) v.s. b (expected)")])
def test_deep_ep_import_failure_blocks_both(error):
    report = run_preflight(_settings(ep_disable_gin=True), FakeProbe(import_error=error))
    assert not report.can_run(Backend.LEGACY) and not report.can_run(Backend.ELASTIC)
    detail = report.failures(Backend.LEGACY)[0].detail
    assert type(error).__name__ in detail and "sgl-deep-ep" in detail


def test_no_nic_and_gin_enabled_blocks_elastic_with_actionable_reason():
    report = run_preflight(_settings(), FakeProbe(nics=[]))
    assert _failed(report, Backend.ELASTIC) == {"gin"} and report.can_run(Backend.LEGACY)
    assert "EP_DISABLE_GIN=1" in report.failures(Backend.ELASTIC)[0].detail


def test_nic_present_allows_gin():
    assert run_preflight(_settings(), FakeProbe(nics=["mlx5_0"])).can_run(Backend.ELASTIC)


@pytest.mark.parametrize("nics,disable,ok", [(["mlx5_0"], False, True), (["mlx5_0"], True, False), ([], True, False)])
def test_internode_needs_real_gin(nics, disable, ok):
    report = run_preflight(_settings(ep_disable_gin=disable), FakeProbe(nics=nics), internode=True)
    assert report.can_run(Backend.ELASTIC) is ok


@pytest.mark.parametrize("gpus,capability", [(0, None), (2, (8, 0))])
def test_gpu_requirements_block_both(gpus, capability):
    report = run_preflight(_settings(ep_disable_gin=True), FakeProbe(gpus=gpus, capability=capability))
    assert not report.can_run(Backend.LEGACY) and not report.can_run(Backend.ELASTIC)


def test_nvlink_is_advisory():
    report = run_preflight(_settings(ep_disable_gin=True), FakeProbe(nvlink=False))
    assert report.can_run(Backend.ELASTIC) and report.can_run(Backend.LEGACY)
    assert not next(c for c in report.checks if c.name == "nvlink").passed


def test_failure_mask_names_the_failed_checks():
    report = run_preflight(_settings(), FakeProbe(nccl=(2, 28, 9)))
    mask = report.failure_mask(Backend.ELASTIC)
    assert {n for i, n in enumerate(CHECK_NAMES) if mask >> i & 1} == _failed(report, Backend.ELASTIC)
    assert report.failure_mask(Backend.LEGACY) == 0


def test_reference_provider_can_run_both_without_deep_ep():
    report = run_preflight(_settings(provider=ProviderChoice.REFERENCE), FakeProbe(import_error=ImportError("x")))
    assert report.can_run(Backend.LEGACY) and report.can_run(Backend.ELASTIC)
    assert report.provider is ProviderChoice.REFERENCE


def test_real_probe_on_this_machine_does_not_raise():
    report = run_preflight(_settings(), SystemProbe())
    assert {c.name for c in report.checks} >= {"deep_ep_import", "gin", "nccl_runtime"}
    for check in report.checks:
        assert check.detail  # every check says something a person can act on


def test_real_probe_lists_each_mapped_libnccl_once():
    mapped = SystemProbe().mapped_libnccl()
    assert len(mapped) == len(set(mapped)) and all("libnccl" in m.rsplit("/", 1)[-1] for m in mapped)


def _script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_real_probe_runs_nvcc(tmp_path):
    probe = SystemProbe()
    good = _script(tmp_path, "nvcc", 'echo "Cuda compilation tools, release 13.1, V13.1.80"')
    assert probe.nvcc(good) == (good, (13, 1), "")
    garbled = _script(tmp_path, "nvcc-garbled", "echo hello")
    path, version, why = probe.nvcc(garbled)
    assert version is None and "cannot read a CUDA release" in why
    failing = _script(tmp_path, "nvcc-failing", "exit 3")
    assert probe.nvcc(failing)[1] is None
    missing = str(tmp_path / "no-such-nvcc")
    path, version, why = probe.nvcc(missing)
    assert (path, version) == (missing, None) and missing in why
    path, version, why = probe.nvcc(None)  # PATH, then /usr/local/cuda/bin/nvcc
    assert path and (version is not None or why)
