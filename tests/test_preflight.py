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
    """A host described by fields instead of probed. ``module``/``import_error`` are ``deep_ep``'s,
    ``v25_module``/``v25_import_error`` ``deep_ep_v25``'s (absent by default)."""

    module: Optional[types.ModuleType] = field(default_factory=lambda: _deep_ep_module(elastic=True))
    import_error: Optional[BaseException] = None
    dist_info: Optional[tuple[str, str]] = ("sgl-deep-ep", "0.1.2.post1")
    nccl: Optional[tuple[int, int, int]] = (2, 30, 7)
    gpus: int = 2
    capability: Optional[tuple[int, int]] = (9, 0)
    nics: list[str] = field(default_factory=list)
    nvlink: Optional[bool] = True
    v25_module: Optional[types.ModuleType] = None
    v25_import_error: Optional[BaseException] = None
    libnccl: list[str] = field(default_factory=lambda: ["/fake/libnccl.so.2"])
    nvcc_releases: dict = field(default_factory=lambda: {None: (13, 5)})  # path asked (None: PATH) -> release
    nvcc_asked: list = field(default_factory=list)

    def import_module(self, name):
        if name == "deep_ep_v25":
            if self.v25_import_error is not None:
                raise self.v25_import_error
            if self.v25_module is None:
                raise ImportError("No module named 'deep_ep_v25'")
            return self.v25_module
        if name != "deep_ep":
            raise ImportError(f"No module named {name!r}")
        if self.import_error is not None:
            raise self.import_error
        if self.module is None:
            raise ImportError("No module named 'deep_ep'")
        return self.module

    def distribution(self, module):
        if module == "deep_ep_v25":
            return ("sgl-deep-ep-v25", "0.1.0rc0") if self.v25_module is not None else None
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

    def mapped_libnccl(self):
        return list(self.libnccl)

    def nvcc(self, path):
        self.nvcc_asked.append(path)
        release = self.nvcc_releases.get(path)
        where = path or "/usr/local/cuda/bin/nvcc"
        return where, release, "" if release else f"cannot run {where} --version (FileNotFoundError)"


def _module(name: str, version: str, *classes: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__version__ = version
    for cls in classes:
        setattr(mod, cls, type(cls, (), {}))
    return mod


def _deep_ep_module(elastic: bool, version: str = "2.1.0") -> types.ModuleType:
    return _module("deep_ep", version, "Buffer", *(["ElasticBuffer"] if elastic else []))


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
    detail = report.failures(Backend.ELASTIC)[0].detail
    assert "deep_ep 1.2.1 has Buffer (legacy)" in detail and "sgl-deep-ep==0.1.2.post1" in detail


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


# ---------------------------------------------------------------------------------------------- DeepEP 2.5 (ep)
V21 = dict(module=_deep_ep_module(elastic=True), dist_info=("sgl-deep-ep", "0.1.2.post1"))
INSTALLS = {
    # name: (FakeProbe fields, generations whose library checks pass)
    "v1_only_deep_ep": (dict(module=_deep_ep_module(elastic=False, version="1.2.1"), dist_info=("deep-ep", "1.2.1")),
                        {Backend.LEGACY}),
    "sgl_deep_ep_2_1": (V21, {Backend.LEGACY, Backend.ELASTIC}),
    "sgl_deep_ep_v25_only": (dict(module=None, dist_info=None, v25_module=_module("deep_ep_v25", "2.5.0", "EPBuffer")),
                             {Backend.EP}),
    "upstream_deep_ep_2_5": (dict(module=_module("deep_ep", "2.5.0", "EPBuffer", "EPHandle"),
                                  dist_info=("deep-ep", "2.5.0")), {Backend.EP}),
    "sgl_2_1_and_v25": (dict(V21, v25_module=_module("deep_ep_v25", "2.5.0", "EPBuffer")),
                        {Backend.LEGACY, Backend.ELASTIC, Backend.EP}),
}
LIBRARY_CHECKS = {"deep_ep_import", "buffer_api", "elastic_api", "ep_import", "ep_api"}
NCCL_2_1, NCCL_2_5 = (2, 30, 7), (2, 32, 3)
# What each install runs on a host that is otherwise fit (GPUs, one libnccl, nvcc 13.5, EP_DISABLE_GIN=1), with the
# NCCL 2.1's ElasticBuffer needs (2.30.7) or the one 2.5 needs (2.32.3), and what auto then picks.
RUNS = {
    ("v1_only_deep_ep", NCCL_2_1): ({Backend.LEGACY}, Backend.LEGACY),
    ("v1_only_deep_ep", NCCL_2_5): ({Backend.LEGACY}, Backend.LEGACY),
    ("sgl_deep_ep_2_1", NCCL_2_1): ({Backend.LEGACY, Backend.ELASTIC}, Backend.ELASTIC),
    ("sgl_deep_ep_2_1", NCCL_2_5): ({Backend.LEGACY}, Backend.LEGACY),
    ("sgl_deep_ep_v25_only", NCCL_2_1): (set(), Backend.LEGACY),
    ("sgl_deep_ep_v25_only", NCCL_2_5): ({Backend.EP}, Backend.EP),
    ("upstream_deep_ep_2_5", NCCL_2_1): (set(), Backend.LEGACY),
    ("upstream_deep_ep_2_5", NCCL_2_5): ({Backend.EP}, Backend.EP),
    ("sgl_2_1_and_v25", NCCL_2_1): ({Backend.LEGACY, Backend.ELASTIC}, Backend.ELASTIC),
    ("sgl_2_1_and_v25", NCCL_2_5): ({Backend.LEGACY, Backend.EP}, Backend.EP),
}


def _fit_probe(**fields) -> FakeProbe:
    return FakeProbe(**{"nccl": NCCL_2_5, **fields})


@pytest.mark.parametrize("install", list(INSTALLS))
def test_each_install_offers_the_generations_whose_class_it_has(install):
    fields, expected = INSTALLS[install]
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**fields))
    libraries_ok = {b for b in (Backend.LEGACY, Backend.ELASTIC, Backend.EP)
                    if not {c.name for c in report.failures(b)} & LIBRARY_CHECKS}
    assert libraries_ok == expected
    assert (report.has_buffer, report.has_elastic_buffer, report.has_ep_buffer) == \
        tuple(b in expected for b in (Backend.LEGACY, Backend.ELASTIC, Backend.EP))
    for backend in {Backend.LEGACY, Backend.ELASTIC, Backend.EP} - expected:  # what to install, in words
        assert any("install" in c.detail.lower() for c in report.failures(backend) if c.name in LIBRARY_CHECKS)


@pytest.mark.parametrize("install,nccl", list(RUNS), ids=[f"{i}-nccl{'.'.join(map(str, n))}" for i, n in RUNS])
def test_each_install_and_nccl_resolves_the_fastest_runnable_generation(install, nccl):
    from deepep_switch.decision import Vote, agree
    from deepep_switch.settings import load_settings

    fields, _ = INSTALLS[install]
    runnable, auto = RUNS[(install, nccl)]
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**{**fields, "nccl": nccl}))
    assert {b for b in (Backend.LEGACY, Backend.ELASTIC, Backend.EP) if report.can_run(b)} == runnable
    loaded = load_settings(backend_raw="auto", ep_disable_gin=True)
    assert agree([Vote.local(loaded, report)] * 2).resolved is auto
    if Backend.ELASTIC in runnable:  # elastic and ep exclude each other in one process (NCCL)
        assert Backend.EP not in runnable


def test_upstream_deep_ep_2_5_is_ep_only_and_says_so():
    fields, _ = INSTALLS["upstream_deep_ep_2_5"]
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**fields))
    assert report.can_run(Backend.EP) and report.libraries == {"deep_ep": "2.5.0"}
    legacy = {c.name: c.detail for c in report.failures(Backend.LEGACY)}
    assert set(legacy) == {"buffer_api"}
    assert "Buffer missing from deep_ep; deep_ep 2.5.0 has EPBuffer (ep)" in legacy["buffer_api"]
    assert "DeepEP 2.5 dropped Buffer" in legacy["buffer_api"]
    elastic = {c.name: c.detail for c in report.failures(Backend.ELASTIC)}
    assert "elastic_api" in elastic and "has EPBuffer (ep)" in elastic["elastic_api"]  # never taken for ElasticBuffer
    assert "RTP_LLM_DEEPEP_BACKEND=ep" in elastic["elastic_api"]
    assert next(c for c in report.checks if c.name == "ep_api").detail == "deep_ep.EPBuffer present"


def test_sgl_v25_beside_2_1_prefers_deep_ep_v25_and_names_both_modules():
    fields, _ = INSTALLS["sgl_2_1_and_v25"]
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**fields))
    assert report.libraries == {"deep_ep": "2.1.0", "deep_ep_v25": "2.5.0"}
    assert next(c for c in report.checks if c.name == "ep_api").detail == "deep_ep_v25.EPBuffer present"
    assert report.deep_ep_version == "2.1.0"


@pytest.mark.parametrize("error", [
    ImportError("DeepEP 2.5 needs NCCL 2.32.3 or newer, but /x has 2.30.7. See ... for host prerequisites"),
    AssertionError("Duplicate NCCL runtime found in the current system: /a/libnccl.so.2 and /b/libnccl.so.2"),
])
def test_a_failing_deep_ep_v25_import_is_shown_even_when_deep_ep_imports(error):
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**V21, v25_import_error=error))
    ep = {c.name: c.detail for c in report.failures(Backend.EP)}
    assert set(ep) >= {"ep_api"}
    assert f"import deep_ep_v25 failed: {type(error).__name__}: {error}" in ep["ep_api"]
    assert "deep_ep 2.1.0 has Buffer (legacy), ElasticBuffer (elastic)" in ep["ep_api"]
    assert report.can_run(Backend.LEGACY)
    alone = run_preflight(_settings(ep_disable_gin=True), _fit_probe(module=None, v25_import_error=error))
    detail = next(c for c in alone.failures(Backend.EP) if c.name == "ep_import").detail
    assert type(error).__name__ in detail and "sgl-deep-ep-v25" in detail


@pytest.mark.parametrize("runtime,ok", [((2, 32, 3), True), ((2, 33, 0), True), ((2, 32, 2), False),
                                        ((2, 30, 7), False), (None, False)])
def test_ep_needs_nccl_2_32_3(runtime, ok):
    fields, _ = INSTALLS["sgl_deep_ep_v25_only"]
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**{**fields, "nccl": runtime}))
    assert report.can_run(Backend.EP) is ok
    if not ok:
        failed = {c.name: c.detail for c in report.failures(Backend.EP)}
        assert set(failed) == {"ep_nccl_runtime"} and "2.32.3" in failed["ep_nccl_runtime"]


@pytest.mark.parametrize("mapped,ok,fragment", [
    (["/site/nvidia/nccl/lib/libnccl.so.2"], True, "one libnccl mapped"),
    ([], False, "no libnccl is mapped"),
    (["/site/nvidia/nccl/lib/libnccl.so.2", "/usr/lib/libnccl.so.2"], False, "2 libnccl files are mapped"),
])
def test_ep_needs_exactly_one_libnccl(mapped, ok, fragment):
    fields, _ = INSTALLS["sgl_deep_ep_v25_only"]
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**fields, libnccl=mapped))
    check = next(c for c in report.checks if c.name == "ep_single_libnccl")
    assert check.passed is ok and report.can_run(Backend.EP) is ok and fragment in check.detail
    assert check.gates == (Backend.EP,)
    if len(mapped) > 1:
        assert all(m in check.detail for m in mapped) and "LD_LIBRARY_PATH" in check.detail


NVCC = "/opt/cuda-13.5/bin/nvcc"


@pytest.mark.parametrize("settings,asked,source", [
    (dict(ep_jit_nvcc_compiler=NVCC, dj_jit_nvcc_compiler="/dj/nvcc", cuda_home="/cuda"), NVCC, "EP_JIT_NVCC_COMPILER"),
    (dict(dj_jit_nvcc_compiler=NVCC, cuda_home="/cuda"), NVCC, "DJ_JIT_NVCC_COMPILER"),
    (dict(cuda_home="/opt/cuda-13.5", cuda_path="/cuda"), NVCC, "$CUDA_HOME/bin/nvcc"),
    (dict(cuda_path="/opt/cuda-13.5"), NVCC, "$CUDA_PATH/bin/nvcc"),
    (dict(), None, "PATH or /usr/local/cuda"),
])
def test_ep_looks_for_nvcc_where_deep_ep_25_does(settings, asked, source):
    fields, _ = INSTALLS["sgl_deep_ep_v25_only"]
    probe = _fit_probe(**fields, nvcc_releases={asked: (13, 5)})
    report = run_preflight(_settings(ep_disable_gin=True, **settings), probe)
    check = next(c for c in report.checks if c.name == "ep_nvcc")
    assert probe.nvcc_asked == [asked] and check.passed and report.can_run(Backend.EP)
    assert f"(from {source})" in check.detail and "nvcc 13.5" in check.detail


@pytest.mark.parametrize("release,ok", [((13, 1), True), ((13, 5), True), ((13, 0), False), ((12, 9), False),
                                        ((14, 0), False), (None, False)])
def test_ep_needs_nvcc_13_1_within_cuda_13(release, ok):
    fields, _ = INSTALLS["sgl_deep_ep_v25_only"]
    report = run_preflight(_settings(ep_disable_gin=True), _fit_probe(**fields, nvcc_releases={None: release}))
    check = next(c for c in report.checks if c.name == "ep_nvcc")
    assert check.passed is ok and report.can_run(Backend.EP) is ok
    if not ok:
        assert "EP_JIT_NVCC_COMPILER" in check.detail and "13.1" in check.detail


def test_a_set_cuda_home_without_nvcc_says_deep_ep_looks_no_further():
    fields, _ = INSTALLS["sgl_deep_ep_v25_only"]
    report = run_preflight(_settings(ep_disable_gin=True, cuda_home="/opt/cuda-12.4"),
                           _fit_probe(**fields, nvcc_releases={None: (13, 5)}))
    detail = next(c for c in report.failures(Backend.EP) if c.name == "ep_nvcc").detail
    assert "/opt/cuda-12.4/bin/nvcc" in detail and "$CUDA_HOME/bin/nvcc is set" in detail
    assert "EP_JIT_NVCC_COMPILER" in detail


def test_gin_is_one_check_gating_elastic_and_ep():
    report = run_preflight(_settings(), _fit_probe(**INSTALLS["sgl_2_1_and_v25"][0]))
    gin = [c for c in report.checks if c.name == "gin"]
    assert len(gin) == 1 and set(gin[0].gates) == {Backend.ELASTIC, Backend.EP} and not gin[0].passed
    assert "gin" in _failed(report, Backend.EP) and report.can_run(Backend.LEGACY)


def test_a_probe_written_before_the_ep_checks_still_works():
    class OldProbe(FakeProbe):
        mapped_libnccl = None  # what a probe without the method looks like to HostView
        nvcc = None

    report = run_preflight(_settings(ep_disable_gin=True),
                           OldProbe(**{**INSTALLS["sgl_2_1_and_v25"][0], "nccl": NCCL_2_1}))
    assert report.can_run(Backend.LEGACY) and report.can_run(Backend.ELASTIC)
    assert _failed(report, Backend.EP) >= {"ep_single_libnccl", "ep_nvcc"}


def test_every_check_names_a_generation_or_is_advisory_and_says_what_to_do():
    report = run_preflight(_settings(), FakeProbe(nccl=None, libnccl=[], nvcc_releases={}, gpus=0, capability=None))
    assert [c.name for c in report.checks] == [n for n in CHECK_NAMES if n != "reference_provider"]
    for check in report.checks:
        assert check.detail and (check.passed or len(check.detail) > 40), check
