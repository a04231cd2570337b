"""Settings: RTP_LLM_DEEPEP_BACKEND never raises, unknown values warn exactly once, knobs are typed."""

from __future__ import annotations

import logging
import pathlib
import random
import string

import pytest

from deepep_switch.settings import (BackendChoice, ProviderChoice, SwitchSettings, Validation, env_name,
                                    get_settings, load_settings, parse_backend, reload_settings)

VALID = {"legacy": BackendChoice.LEGACY, "elastic": BackendChoice.ELASTIC, "ep": BackendChoice.EP,
         "auto": BackendChoice.AUTO}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("deepep_switch")]


def test_defaults_without_environment():
    loaded = load_settings()
    s = loaded.settings
    assert s.backend is BackendChoice.LEGACY and not s.strict and s.provider is ProviderChoice.DEEP_EP
    assert (s.num_sms, s.max_tokens_per_rank) == (0, 0)
    assert loaded.problems == []


@pytest.mark.parametrize("raw,expected", [
    ("legacy", "legacy"), ("elastic", "elastic"), ("ep", "ep"), (" EP\n", "ep"), ("auto", "auto"),
    (" Elastic ", "elastic"), ("\tAUTO\n", "auto"), ("LEGACY", "legacy"), ("", "legacy"), ("   ", "legacy"),
])
def test_accepted_values_are_case_and_space_insensitive(monkeypatch, caplog, raw, expected):
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", raw)
    with caplog.at_level(logging.WARNING):
        loaded = load_settings()
    assert loaded.settings.backend is VALID[expected]
    assert _warnings(caplog) == []


@pytest.mark.parametrize("raw", ["elasticc", "v2", "1", "legacy,elastic", "ELASTIC_BUFFER", "nccl", "none", "epbuffer",
                                 "e p", "v25"])
def test_unknown_value_falls_back_to_legacy_with_one_warning(monkeypatch, caplog, raw):
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", raw)
    with caplog.at_level(logging.WARNING):
        loaded = load_settings()
    assert loaded.settings.backend is BackendChoice.LEGACY
    warnings = _warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    message = warnings[0].getMessage()
    assert repr(raw) in message and all(v in message for v in VALID)
    assert loaded.backend_problem and not loaded.knob_problems


def _random_value(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:  # a valid value, mangled in case and surrounding whitespace
        word = rng.choice(list(VALID))
        word = "".join(c.upper() if rng.random() < 0.5 else c for c in word)
        return rng.choice(["", " ", "\t", "\n"]) + word + rng.choice(["", " ", "\r\n"])
    if kind == 1:  # a near miss
        word = list(rng.choice(list(VALID)))
        word.insert(rng.randrange(len(word) + 1), rng.choice(string.ascii_letters + "_-. "))
        return "".join(word)
    if kind == 2:
        return "".join(rng.choice(string.printable.replace("\x0b", "").replace("\x0c", ""))
                       for _ in range(rng.randrange(0, 40)))
    if kind == 3:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 12)))
    if kind == 4:
        return str(rng.randrange(-10, 10 ** 6))
    return rng.choice(["", " ", "true", "false", "None", "null", "elastic\x01", "lega cy", "éLastic"])


def test_fuzz_backend_value_never_raises_and_only_valid_values_matter(monkeypatch, caplog):
    rng = random.Random(20261122)
    seen_valid = 0
    for i in range(1200):
        raw = _random_value(rng)
        monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", raw)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = load_settings()  # must never raise
        normalised = raw.strip().lower()
        warnings = _warnings(caplog)
        if normalised in VALID:
            seen_valid += 1
            assert loaded.settings.backend is VALID[normalised], (i, raw)
            assert warnings == [], (i, raw)
        else:
            assert loaded.settings.backend is BackendChoice.LEGACY, (i, raw)
            assert len(warnings) == (1 if normalised else 0), (i, raw, [w.getMessage() for w in warnings])
        assert parse_backend(raw)[0] is loaded.settings.backend
    assert seen_valid > 100  # the fuzz really exercised the accepted values too


@pytest.mark.parametrize("name,raw,field,default", [
    ("RTP_LLM_DEEPEP_NUM_SMS", "abc", "num_sms", 0),
    ("RTP_LLM_DEEPEP_NUM_SMS", "3", "num_sms", 0),
    ("RTP_LLM_DEEPEP_NUM_SMS", "-2", "num_sms", 0),
    ("RTP_LLM_DEEPEP_MAX_TOKENS_PER_RANK", "many", "max_tokens_per_rank", 0),
    ("RTP_LLM_DEEPEP_STRICT", "maybe", "strict", False),
    ("RTP_LLM_DEEPEP_TIMEOUT_S", "0", "timeout_s", 60.0),
    ("RTP_LLM_DEEPEP_TIMEOUT_S", "301", "timeout_s", 60.0),
    ("RTP_LLM_DEEPEP_TIMEOUT_S", "soon", "timeout_s", 60.0),
    ("RTP_LLM_DEEPEP_NCCL_BUILD_VERSION", "2.30", "nccl_build_version", ""),
    ("DEEPEP_SWITCH_PROVIDER", "mock", "provider", ProviderChoice.DEEP_EP),
    ("RTP_LLM_DEEPEP_VALIDATE", "paranoid", "validation", Validation.BASIC),
])
def test_malformed_knob_takes_its_default_and_warns(monkeypatch, caplog, name, raw, field, default):
    monkeypatch.setenv(name, raw)
    monkeypatch.setenv("RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC", "1")  # a valid neighbour must survive
    with caplog.at_level(logging.WARNING):
        loaded = load_settings()
    assert getattr(loaded.settings, field) == default
    assert loaded.settings.elastic_deterministic is True
    assert len(loaded.knob_problems) == 1 and name in loaded.knob_problems[0]
    assert len(_warnings(caplog)) == 1


def test_typed_knobs_parse(monkeypatch):
    for name, value in {"RTP_LLM_DEEPEP_STRICT": "1", "RTP_LLM_DEEPEP_NUM_SMS": "24",
                        "RTP_LLM_DEEPEP_MAX_TOKENS_PER_RANK": "8192", "RTP_LLM_DEEPEP_ELASTIC_ALLOW_HYBRID": "0",
                        "DEEPEP_SWITCH_PROVIDER": " Reference ", "EP_DISABLE_GIN": "1",
                        "RTP_LLM_DEEPEP_NCCL_BUILD_VERSION": "2.30.7", "RTP_LLM_DEEPEP_VALIDATE": " Full "}.items():
        monkeypatch.setenv(name, value)
    s = load_settings().settings
    assert s.strict and s.num_sms == 24 and s.max_tokens_per_rank == 8192 and not s.elastic_allow_hybrid
    assert s.provider is ProviderChoice.REFERENCE and s.ep_disable_gin and s.nccl_build_version == "2.30.7"
    assert s.validation is Validation.FULL


def test_deep_ep_25_compiler_variables_are_read_as_given(monkeypatch):
    values = {"EP_JIT_NVCC_COMPILER": "/opt/cuda-13.5/bin/nvcc", "DJ_JIT_NVCC_COMPILER": "/x/nvcc",
              "CUDA_HOME": "/usr/local/cuda-13.1", "CUDA_PATH": "relative/cuda"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    loaded = load_settings()
    s = loaded.settings
    assert (s.ep_jit_nvcc_compiler, s.dj_jit_nvcc_compiler, s.cuda_home, s.cuda_path) == tuple(values.values())
    assert [env_name(f) for f in ("ep_jit_nvcc_compiler", "dj_jit_nvcc_compiler", "cuda_home", "cuda_path")] == \
        list(values)
    assert loaded.problems == []


def test_settings_are_read_once_per_process(monkeypatch):
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", "elastic")
    assert get_settings().settings.backend is BackendChoice.ELASTIC
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", "legacy")
    assert get_settings().settings.backend is BackendChoice.ELASTIC  # cached
    assert reload_settings().settings.backend is BackendChoice.LEGACY


def test_every_setting_is_documented():
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    for field in SwitchSettings.model_fields:
        assert f"`{env_name(field)}`" in doc, f"{env_name(field)} missing from docs/configuration.md"


@pytest.mark.parametrize("normal,low_latency,expected", [
    ("", "", ("legacy", "legacy")),
    ("elastic", "", ("elastic", "legacy")),
    ("", " ELASTIC ", ("legacy", "elastic")),
    ("elastic", "legacy", ("elastic", "legacy")),
])
def test_per_mode_backend_overrides(monkeypatch, normal, low_latency, expected):
    from deepep_switch.settings import load_settings

    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND", "legacy")
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND_NORMAL", normal)
    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY", low_latency)
    s = load_settings().settings
    assert (s.backend_for(False)[0].value, s.backend_for(True)[0].value) == expected
    assert s.backend_for(None)[0].value == "legacy"


def test_unknown_per_mode_value_names_its_variable(monkeypatch, caplog):
    from deepep_switch.settings import load_settings

    monkeypatch.setenv("RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY", "elastc")
    with caplog.at_level("WARNING", logger="deepep_switch.settings"):
        loaded = load_settings()
    choice, problem = loaded.settings.backend_for(True)
    assert choice.value == "legacy" and "RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY='elastc'" in problem
    assert [r.getMessage() for r in caplog.records if "elastc" in r.getMessage()] == [
        f"deepep-switch settings: {problem}"]
    assert loaded.settings.backend_for(False) == (loaded.settings.backend, None)


def test_one_deadline_bounds_every_wait(monkeypatch, caplog):
    s = load_settings().settings
    assert s.timeout_s == 60.0 and s.consensus_timeout_s is None and s.consensus_deadline_s == 60.0
    monkeypatch.setenv("RTP_LLM_DEEPEP_TIMEOUT_S", "2.5")
    s = load_settings().settings
    assert s.timeout_s == 2.5 and s.consensus_deadline_s == 2.5
    monkeypatch.setenv("RTP_LLM_DEEPEP_TIMEOUT_S", "300")
    assert load_settings().settings.timeout_s == 300.0


def test_deprecated_consensus_timeout_still_bounds_the_decision(monkeypatch, caplog):
    monkeypatch.setenv("RTP_LLM_DEEPEP_CONSENSUS_TIMEOUT_S", "7")
    monkeypatch.setenv("RTP_LLM_DEEPEP_TIMEOUT_S", "3")
    monkeypatch.setenv("RTP_LLM_DEEPEP_STRICT", "1")
    with caplog.at_level(logging.WARNING):
        loaded = load_settings()
    s = loaded.settings
    assert (s.consensus_deadline_s, s.timeout_s) == (7.0, 3.0)
    assert loaded.problems == []  # a deprecation is not a problem, so strict mode starts
    warnings = [w.getMessage() for w in _warnings(caplog)]
    assert len(warnings) == 1 and "RTP_LLM_DEEPEP_CONSENSUS_TIMEOUT_S is deprecated" in warnings[0]
    assert "RTP_LLM_DEEPEP_TIMEOUT_S" in warnings[0]
    monkeypatch.setenv("RTP_LLM_DEEPEP_CONSENSUS_TIMEOUT_S", "0")  # malformed: default (unset), so timeout_s rules
    loaded = load_settings()
    assert loaded.settings.consensus_deadline_s == 3.0 and len(loaded.knob_problems) == 1
