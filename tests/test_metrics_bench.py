"""``deepep-switch metrics-bench`` on the reference providers (CPU): rows for every backend, mode and kind with the
off/on medians and their ratio, written as JSON; bad arguments are one error line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTP_LLM_DEEPEP_", "DEEPEP_SWITCH_"))}
    return subprocess.run([sys.executable, "-m", "deepep_switch.cli", "metrics-bench", *args], capture_output=True,
                          text=True, timeout=240, env=env)


@pytest.mark.timeout(300)
def test_cpu_run_reports_off_on_and_the_ratio(tmp_path):
    path = tmp_path / "metrics.json"
    proc = _run("--provider", "reference", "--ranks", "2", "--tokens", "64", "--ll-tokens", "16", "--hidden", "256",
                "--experts", "8", "--topk", "2", "--iters", "3", "--rounds", "2", "--json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference providers" in proc.stdout and "on/off" in proc.stdout
    rows = json.loads(path.read_text())["rows"]
    assert [(r["backend"], r["mode"], r["tokens"], r["kind"]) for r in rows] == [
        ("legacy", "normal", 64, "eager"), ("legacy", "low_latency", 16, "eager"),
        ("elastic", "normal", 64, "eager"), ("elastic", "low_latency", 16, "eager")]  # graphs: GPUs only
    for r in rows:
        assert r["off_us"] > 0 and r["on_us"] > 0 and r["ratio"] == pytest.approx(r["on_us"] / r["off_us"], rel=1e-2)


@pytest.mark.timeout(120)
def test_bad_arguments_are_one_line_with_status_2():
    proc = _run("--provider", "reference", "--hidden", "100")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "multiple of 128" in lines[0], proc.stderr
