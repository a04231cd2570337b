"""The command line: the README's demo, doctor, a CPU smoke run of bench, and every user error as one line with
the right exit code (2: bad arguments, 1: cannot run here), checked before any rank is spawned."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RTP_LLM_DEEPEP_", "DEEPEP_SWITCH_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "deepep_switch.cli", *args], capture_output=True, text=True,
                          timeout=240, env=full_env)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The CLI failed with ``code`` and said so in exactly one stderr line, with no traceback; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("deepep-switch: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def deep_ep_importable() -> bool:
    from deepep_switch.backends import get_spec

    try:
        get_spec("legacy").library.load()
    except ImportError:
        return False
    return True


def rank_lines(out: str, rank: int) -> list[str]:
    return [line for line in out.splitlines() if line.strip().startswith(f"rank {rank}:")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["legacy", "elastic", "ep", "definitely-not-a-backend"])
def test_demo_runs_on_the_cpu_default_and_prints_the_decision(backend):
    proc = run_cli("demo", env={"RTP_LLM_DEEPEP_BACKEND": backend})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    resolved = backend if backend in ("elastic", "ep") else "legacy"
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
    assert "resolved=ep" in proc.stdout and "tokens per rank=[8, 13, 18, 23]" in proc.stdout  # auto: the fastest
    lines = rank_lines(proc.stdout, 3)
    assert len(lines) == 2 and all("sent= 23 tokens" in line and "rel.err" in line for line in lines)


@pytest.mark.timeout(300)
def test_demo_empty_rank_gets_its_own_line_and_provider_flag_beats_environment():
    proc = run_cli("demo", "--provider", "reference", "--tokens", "8,0", "--backend", "elastic",
                   env={"DEEPEP_SWITCH_PROVIDER": "deep_ep"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "provider=reference" in proc.stdout and "tokens per rank=[8, 0]" in proc.stdout
    empty = rank_lines(proc.stdout, 1)
    assert len(empty) == 2, proc.stdout
    for line in empty:
        assert "sent=  0 tokens" in line and "(empty rank: checks that an empty batch round-trips)" in line
        assert "rel.err" not in line
    assert all("rel.err" in line for line in rank_lines(proc.stdout, 0))
    assert "result: OK" in proc.stdout


def test_demo_takes_the_provider_from_the_environment():
    proc = run_cli("demo", "--ranks", "2", env={"DEEPEP_SWITCH_PROVIDER": "deep_ep"})
    if deep_ep_importable() and torch.cuda.device_count() >= 2:  # a GPU node: the demo runs on real DeepEP
        assert proc.returncode == 0 and "provider=deep_ep" in proc.stdout, proc.stdout + proc.stderr
        return
    line = assert_one_error_line(proc, 1, "the deep_ep provider cannot run here", "use --provider reference")
    assert ("deep_ep_import" in line) != deep_ep_importable() or "cuda_device" in line
    assert proc.stdout == ""  # nothing was spawned


def test_demo_rejects_a_malformed_provider_in_the_environment():
    assert_one_error_line(run_cli("demo", env={"DEEPEP_SWITCH_PROVIDER": "nope"}), 2,
                          "DEEPEP_SWITCH_PROVIDER='nope' is invalid", "--provider")


USAGE_ERRORS = [
    (("demo", "--ranks", "0"), "argument --ranks: must be >= 1, got 0"),
    (("demo", "--hidden", "100"), "hidden_size=100 must be a positive multiple of 128"),
    (("demo", "--tokens", "8"), "--tokens has 1 value but --ranks is 2"),
    (("demo", "--tokens=8,-1"), "argument --tokens: must be >= 0, got -1"),
    (("demo", "--tokens", "0,0"), "at least one rank must send tokens"),
    (("demo", "--ranks", "4", "--experts", "6"), "expert_num=6 must be a positive multiple of ep_size=4"),
    (("demo", "--topk", "9"), "moe_k=9 must be in [1, min(32, expert_num)]"),
    (("demo", "--ranks", "1"), "legacy normal mode has no DeepEP config for ep_size=1"),
    (("demo", "--provider", "deep_ep", "--device", "cpu"), "--provider deep_ep runs on CUDA GPUs only"),
    (("bench", "--provider", "reference", "--iters", "0"), "argument --iters: must be >= 1, got 0"),
    (("bench", "--provider", "reference", "--warmup", "-1"), "argument --warmup: must be >= 0, got -1"),
    (("bench", "--provider", "reference", "--backends", "legacy,nope"), "each backend must be one of"),
    (("bench", "--provider", "reference", "--json", "{tmp}/missing/out.json"), "does not exist"),
    (("bench", "--provider", "reference", "--sweep-sms", "0,3"), "argument --sweep-sms: num_sms must be even"),
    (("bench", "--provider", "reference", "--ll-layouts", "token,sideways"), "each layout must be one of token"),
    (("bench", "--provider", "reference", "--sweep-only"), "--sweep-only needs --sweep-sms"),
    (("bench", "--provider", "reference", "--backends", "legacy", "--sweep-sms", "0", "--sweep-only"),
     "nothing to time"),
    (("bench", "--provider", "reference", "--out", "{tmp}/missing/dir"), "does not exist"),
    (("bench", "--provider", "reference", "--ranks", "3"), "expert_num=16 must be a positive multiple of ep_size=3"),
]


@pytest.mark.parametrize("args,fragment", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_and_exit_2_before_any_work(args, fragment, tmp_path):
    proc = run_cli(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert_one_error_line(proc, 2, fragment)
    assert proc.stdout == ""  # nothing ran: the bench/demo header is printed only once the checks passed


def test_bench_json_in_an_unwritable_directory_is_refused_before_the_run(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    directory = next((d for d in (str(locked), "/sys") if not _can_create_in(d)), None)  # root writes anywhere
    if directory is None:
        pytest.skip("no directory this user cannot write to (root, and /sys is writable)")
    proc = run_cli("bench", "--provider", "reference", "--json", os.path.join(directory, "out.json"))
    assert_one_error_line(proc, 2, "argument --json: cannot write")
    assert proc.stdout == ""


def _can_create_in(directory: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def test_more_ranks_than_gpus_cannot_run():
    ranks = torch.cuda.device_count() + 1
    proc = run_cli("demo", "--device", "cuda", "--ranks", str(ranks), "--experts", str(2 * ranks))
    assert_one_error_line(proc, 1, f"--ranks {ranks} needs {ranks} CUDA GPUs")
    assert proc.stdout == ""


@pytest.mark.gpu
def test_demo_on_deep_ep_checks_the_routers_limits_before_spawning():
    proc = run_cli("demo", "--provider", "deep_ep", "--backend", "elastic", "--hidden", "384")
    line = assert_one_error_line(proc, 2)
    assert "hidden % 256" in line or "hidden 384 not in" in line  # elastic, or legacy after an elastic fallback
    assert proc.stdout == ""


@pytest.mark.timeout(120)
def test_a_failing_rank_is_one_line_naming_it_and_debug_shows_the_traceback():
    # A 1-token elastic capacity from the environment: each rank's first prepare raises ValueError.
    env = {"RTP_LLM_DEEPEP_MAX_TOKENS_PER_RANK": "1"}
    args = ("demo", "--backend", "elastic", "--tokens", "4,4", "--timeout", "60")
    line = assert_one_error_line(run_cli(*args, env=env), 1,
                                 "failed: ValueError: 4 tokens per rank exceed the buffer capacity of 1")
    assert re.search(r"error: ranks? [01]", line) and "Traceback" not in line
    debug = run_cli("--debug", *args, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "LaunchError" in debug.stderr
    assert "rank 0 failed:" in debug.stderr or "rank 1 failed:" in debug.stderr


def test_doctor_reports_preflight_as_json():
    proc = run_cli("doctor", "--json", env={"DEEPEP_SWITCH_PROVIDER": "reference"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    decision = json.loads(proc.stdout)
    assert decision["resolved"] == "legacy" and decision["preflight"]["provider"] == "reference"


def test_doctor_says_which_generations_this_process_can_run():
    proc = run_cli("doctor", env={"DEEPEP_SWITCH_PROVIDER": "reference", "RTP_LLM_DEEPEP_BACKEND": "auto"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    block = proc.stdout.split("generations this process can run:\n", 1)[1].splitlines()
    assert block[:3] == ["  legacy: all preflight checks passed", "  elastic: all preflight checks passed",
                         "  ep: all preflight checks passed"]
    assert "decision: requested=auto resolved=ep" in proc.stdout
    proc = run_cli("doctor", env={"DEEPEP_SWITCH_PROVIDER": "deep_ep", "RTP_LLM_DEEPEP_BACKEND": "ep"})
    summaries = proc.stdout.split("generations this process can run:\n", 1)[1].splitlines()[:3]
    assert [line.split(":")[0].split()[0] for line in summaries] == ["legacy", "elastic", "ep"]
    if not any(importlib.util.find_spec(m) for m in ("deep_ep", "deep_ep_v25")):  # why not, per generation
        assert summaries[2].startswith("  ep unavailable: ep_import: ") and "sgl-deep-ep-v25" in summaries[2]


def test_doctor_explains_missing_deep_ep():
    proc = run_cli("doctor", env={"RTP_LLM_DEEPEP_BACKEND": "auto"})
    if not deep_ep_importable():
        line = assert_one_error_line(proc, 1, "the deep_ep provider cannot run here", "deep_ep_import",
                                     "DEEPEP_SWITCH_PROVIDER=reference")
        assert "Traceback" not in line
        assert re.search(r"^  \[FAIL\] deep_ep_import .*No module named 'deep_ep'", proc.stdout, re.M), proc.stdout
        assert "decision: requested=auto resolved=legacy" in proc.stdout  # the full report is still printed
        return
    from deepep_switch.decision import resolve_backend
    from deepep_switch.settings import load_settings

    assert re.search(r"^  \[pass\] deep_ep_import ", proc.stdout, re.M), proc.stdout
    decision = resolve_backend(settings=load_settings(backend_raw="auto", provider="deep_ep"))
    if decision.runnable and decision.resolved is decision.requested:
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    else:
        assert_one_error_line(proc, 1)


def test_doctor_json_uses_the_same_exit_code():
    proc = run_cli("doctor", "--json", env={"DEEPEP_SWITCH_PROVIDER": "deep_ep"})
    decision = json.loads(proc.stdout)
    if decision["runnable"] and decision["resolved"] == decision["requested"]:
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    else:
        assert_one_error_line(proc, 1, "deep_ep")
        if decision["preflight"]["gpu_count"] == 0:
            assert "DEEPEP_SWITCH_PROVIDER=reference" in proc.stderr


def test_doctor_strict_mode_error_is_one_line():
    proc = run_cli("doctor", env={"DEEPEP_SWITCH_PROVIDER": "reference", "RTP_LLM_DEEPEP_STRICT": "1",
                                  "RTP_LLM_DEEPEP_NUM_SMS": "abc"})
    assert_one_error_line(proc, 1, "cannot pick a backend (strict mode)", "RTP_LLM_DEEPEP_NUM_SMS='abc'")
    assert proc.stdout == ""


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
    assert {r["variant"] for r in rows if (r["backend"], r["mode"]) == ("elastic", "low_latency")} == {"token", "expand"}
    elastic_ll = [r for r in rows if (r["backend"], r["mode"]) == ("elastic", "low_latency")]
    assert all(r["raw_weighted_us"] and r["baseline"] == "raw_weighted" for r in elastic_ll)
    assert all(r["bytes"] > 0 and r["floor_us"] > 0 and "router" in r["nvlink_pct"] for r in rows)
    for r in rows:  # the within-run spread behind each median: p10 <= median <= p90
        assert set(r["spread"]) == {k for k in ("raw_us", "raw_weighted_us", "router_us") if r.get(k) is not None}
        assert all(lo <= r[key] <= hi for key, (lo, hi) in r["spread"].items()), r
    assert "spread p10-p90 us, elastic low_latency token 8: raw " in proc.stdout


def test_bench_summary_takes_the_slowest_ranks_median_and_its_spread():
    from deepep_switch.bench import spread_us
    from deepep_switch.bench_report import summarise

    assert spread_us([5.0]) == (5.0, 5.0)
    assert spread_us([float(v) for v in range(30, 0, -1)]) == (4.0, 27.0)
    base = {"backend": "legacy", "mode": "normal", "tokens": 8, "floor_us": 1.0}
    fast = dict(base, router_us=10.0, raw_us=9.0, spread={"router_us": (9.0, 11.0), "raw_us": (8.0, 30.0)})
    slow = dict(base, router_us=20.0, raw_us=5.0, spread={"router_us": (19.0, 21.0), "raw_us": (4.0, 6.0)})
    (row,) = summarise([[fast], [slow]])
    assert (row["router_us"], row["raw_us"]) == (20.0, 9.0)
    assert row["spread"] == {"router_us": (19.0, 21.0), "raw_us": (8.0, 30.0)}


@pytest.mark.timeout(120)
def test_bench_default_is_a_quick_cpu_reference_run_without_gpus(tmp_path):
    import time

    if deep_ep_importable() and torch.cuda.device_count() >= 2:
        pytest.skip("a GPU node: the default is real DeepEP")
    started = time.monotonic()
    proc = run_cli("bench", "--sweep-sms", "0,8", "--out", str(tmp_path / "out"))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60, elapsed
    assert "provider=reference" in proc.stdout and "reference numbers" in proc.stdout
    assert "bench [" in proc.stderr and "SM sweep" in proc.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["reference_numbers"] is True
    assert {r["variant"] for r in results["rows"] if r["sweep"]} == {"sms=0", "sms=8"}
    if importlib.util.find_spec("matplotlib"):
        assert {p.name for p in (tmp_path / "out").glob("*.png")} == {
            "latency_normal.png", "latency_low_latency.png", "sms_sweep.png"}
