"""The command line: the README's demo, doctor, and a CPU smoke run of bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RTP_LLM_DEEPEP_", "DEEPEP_SWITCH_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "deepep_switch.cli", *args], capture_output=True, text=True,
                          timeout=240, env=full_env)


def rank_lines(out: str, rank: int) -> list[str]:
    return [line for line in out.splitlines() if line.strip().startswith(f"rank {rank}:")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["legacy", "elastic", "definitely-not-a-backend"])
def test_demo_runs_on_the_cpu_default_and_prints_the_decision(backend):
    proc = run_cli("demo", env={"RTP_LLM_DEEPEP_BACKEND": backend})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    resolved = "elastic" if backend == "elastic" else "legacy"
    assert "provider=reference" in out and f"resolved={resolved}" in out
    assert out.count(f"backend={resolved}") == 4  # 2 ranks x 2 routers
    assert "tokens per rank=[8, 13]" in out  # every rank sends tokens by default
    for rank in (0, 1):
        lines = rank_lines(out, rank)
        assert len(lines) == 2 and all("rel.err vs dense fp32" in line for line in lines), out
    assert "empty rank" not in out
    assert "result: OK" in out
    if backend.startswith("definitely"):
        assert "'definitely-not-a-backend'" in out  # named in the decision's reasons


@pytest.mark.timeout(300)
def test_demo_four_ranks_auto():
    proc = run_cli("demo", "--ranks", "4", "--backend", "auto", "--experts", "16", "--topk", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resolved=elastic" in proc.stdout and "tokens per rank=[8, 13, 18, 23]" in proc.stdout
    lines = rank_lines(proc.stdout, 3)
    assert len(lines) == 2 and all("sent= 23 tokens" in line and "rel.err" in line for line in lines)


@pytest.mark.timeout(300)
def test_demo_empty_rank_gets_its_own_line():
    proc = run_cli("demo", "--tokens", "8,0", "--backend", "elastic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens per rank=[8, 0]" in proc.stdout
    empty = rank_lines(proc.stdout, 1)
    assert len(empty) == 2, proc.stdout
    for line in empty:
        assert "sent=  0 tokens" in line and "(empty rank: checks that an empty batch round-trips)" in line
        assert "rel.err" not in line
    assert all("rel.err" in line for line in rank_lines(proc.stdout, 0))
    assert "result: OK" in proc.stdout


def test_doctor_reports_preflight_as_json():
    proc = run_cli("doctor", "--json", env={"DEEPEP_SWITCH_PROVIDER": "reference"})
    assert proc.returncode == 0, proc.stderr
    decision = json.loads(proc.stdout)
    assert decision["resolved"] == "legacy" and decision["preflight"]["provider"] == "reference"


def test_doctor_explains_missing_deep_ep():
    proc = run_cli("doctor", env={"RTP_LLM_DEEPEP_BACKEND": "auto"})
    assert proc.returncode == 0, proc.stderr
    assert "deep_ep_import" in proc.stdout and ("FAIL" in proc.stdout or "pass" in proc.stdout)


@pytest.mark.timeout(300)
def test_bench_smoke_on_reference_providers(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--provider", "reference", "--ranks", "2", "--tokens", "16", "--ll-tokens", "8",
                   "--hidden", "256", "--experts", "8", "--topk", "2", "--iters", "2", "--warmup", "1",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["mode"]) for r in rows} == {
        ("legacy", "normal"), ("legacy", "low_latency"), ("elastic", "normal"), ("elastic", "low_latency")}
    assert "say nothing about DeepEP's speed" in proc.stdout
