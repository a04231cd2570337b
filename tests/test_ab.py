"""``deepep-switch ab`` on the CPU reference providers through the CLI: ab.json's structure, the sides agreeing
within bf16 tolerance, plots (or their absence without matplotlib), and argument errors as one line, exit 2,
before any rank is spawned."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from test_cli import assert_one_error_line, run_cli

SMALL = ("--provider", "reference", "--ranks", "2", "--hidden", "256", "--experts", "8", "--topk", "2",
         "--tokens", "8,24", "--ll-tokens", "8", "--iters", "3", "--warmup", "1")
SPREAD = {"median_us", "p10_us", "p90_us", "q1_us", "q3_us", "min_us", "max_us"}


def _check_report(report: dict, labels: dict[str, str], resolved: dict[str, str]) -> None:
    meta = report["meta"]
    assert meta["reference_numbers"] is True and "not DeepEP's speed" in meta["note"]
    assert (meta["ranks"], meta["provider"], meta["device"], meta["iters"]) == (2, "reference", "cpu", 3)
    assert meta["normal_tokens"] == [8, 24] and meta["low_latency_tokens"] == [8]
    assert set(report["sides"]) == {"a", "b"}
    for name, side in report["sides"].items():
        assert side["label"] == labels[name]
        for mode in ("normal", "low_latency"):
            m = side["modes"][mode]
            assert m["resolved"] == resolved[name] and m["decision"].startswith("requested=")
            assert m["buffer_bytes"] and all(v >= 0 for v in m["buffer_bytes"].values())
            assert m["device_bytes"] is None  # CPU: nothing to measure
    for mode in ("normal", "low_latency"):
        ag = report["agreement"][mode]
        assert ag["agree"] and ag["tolerance"] == 1e-2
        for pair in ("a_vs_b", "a_vs_dense", "b_vs_dense"):
            assert 0 <= ag[pair]["relative"] <= 1e-2, (mode, pair, ag[pair])
            assert ag[pair]["max_abs"] >= 0
            assert [t["tokens"] for t in ag[pair]["by_tokens"]] == ([8, 24] if mode == "normal" else [8])
    rows = {(r["mode"], r["tokens"], r["side"]) for r in report["latency"]}
    assert rows == {(m, t, s) for s in "ab" for m, ts in (("normal", (8, 24)), ("low_latency", (8,))) for t in ts}
    for r in report["latency"]:
        assert SPREAD <= set(r) and len(r["samples_us"]) == 3 and r["graph"] is None  # graphs: GPUs only
        assert r["p10_us"] <= r["median_us"] <= r["p90_us"] and r["q1_us"] <= r["median_us"] <= r["q3_us"]
    assert report["agree"] is True


@pytest.mark.timeout(300)
def test_ab_default_sides_on_reference_providers(tmp_path):
    out = tmp_path / "out"  # created by ab
    proc = run_cli("ab", *SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference numbers" in proc.stdout and "OK" in proc.stdout and "MISMATCH" not in proc.stdout
    assert "12/" not in proc.stderr and " 6/6 " in proc.stderr  # progress: 2 sides x (2 + 1) token counts
    report = json.loads((out / "ab.json").read_text())
    _check_report(report, {"a": "RTP_LLM_DEEPEP_BACKEND=legacy", "b": "RTP_LLM_DEEPEP_BACKEND=elastic"},
                  {"a": "legacy", "b": "elastic"})
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped: matplotlib is not installed" in proc.stdout
    else:
        for mode in ("normal", "low_latency"):
            assert (out / f"latency_{mode}.png").read_bytes().startswith(b"\x89PNG")


def test_ab_plots_draw_graph_replays_where_a_side_timed_them(tmp_path):
    """GPU reports carry a ``graph`` spread per low-latency point: the plot draws it as a second, dashed series."""
    pytest.importorskip("matplotlib")
    from deepep_switch.ab import latency_figure, write_plots

    def point(mode, tokens, side, us, graph_us):
        spread = {"median_us": us, "p10_us": us - 1, "p90_us": us + 1}
        graph = None if graph_us is None else {"median_us": graph_us, "p10_us": graph_us - 1, "p90_us": graph_us + 1}
        return {"mode": mode, "tokens": tokens, "side": side, **spread, "graph": graph}

    latency = [point("normal", t, s, 100.0 * t, None) for s in "ab" for t in (128, 4096)]
    latency += [point("low_latency", t, s, 200.0 + t, 60.0 + t) for s in "ab" for t in (16, 128)]
    report = {"meta": {"ranks": 2, "provider": "deep_ep", "device": "cuda", "reference_numbers": False},
              "sides": {"a": {"label": "legacy"}, "b": {"label": "elastic"}}, "latency": latency}
    written, why = write_plots(report, str(tmp_path))
    assert why is None and [os.path.basename(p) for p in written] == ["latency_normal.png", "latency_low_latency.png"]
    styles = {mode: [(line.get_linestyle(), len(line.get_xdata()))
                     for line in latency_figure(report, mode).axes[0].lines] for mode in ("normal", "low_latency")}
    assert styles == {"normal": [("-", 2), ("-", 2)], "low_latency": [("-", 2), ("--", 2), ("-", 2), ("--", 2)]}


@pytest.mark.timeout(300)
def test_ab_settings_per_side_and_no_matplotlib(tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib in this test')\n")
    b = "RTP_LLM_DEEPEP_BACKEND=elastic,RTP_LLM_DEEPEP_ELASTIC_DETERMINISTIC=1"
    proc = run_cli("ab", *SMALL, "--a", "elastic", "--b", b, "--out", str(tmp_path),
                   env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plots skipped: matplotlib is not installed" in proc.stdout
    assert not list(tmp_path.glob("*.png"))
    report = json.loads((tmp_path / "ab.json").read_text())
    _check_report(report, {"a": "RTP_LLM_DEEPEP_BACKEND=elastic", "b": b}, {"a": "elastic", "b": "elastic"})
    assert report["sides"]["b"]["overrides"] == {"backend_raw": "elastic", "elastic_deterministic": "1"}


AB_USAGE_ERRORS = [
    (("--a", "nope"), "argument --a: RTP_LLM_DEEPEP_BACKEND='nope' is not one of legacy, elastic, ep, auto"),
    (("--b", "RTP_LLM_DEEPEP_NUM_SMS=abc"), "argument --b: RTP_LLM_DEEPEP_NUM_SMS='abc'"),
    (("--b", "RTP_LLM_DEEPEP_NUM_SMS=23"), "must be even"),
    (("--a", "FOO=1"), "argument --a: 'FOO=1' is not NAME=VALUE with NAME an RTP_LLM_DEEPEP_* setting"),
    (("--a", "DEEPEP_SWITCH_PROVIDER=deep_ep"), "is the same for both sides: pass --provider"),
    (("--a", "legacy,RTP_LLM_DEEPEP_BACKEND=elastic"), "is not NAME=VALUE"),
    (("--b", "elastic,EP_DISABLE_GIN=1"), "is not NAME=VALUE"),
    (("--b", "RTP_LLM_DEEPEP_BACKEND=elastic,EP_DISABLE_GIN=1"), "EP_DISABLE_GIN is DeepEP's own variable"),
    (("--tokens", "0"), "argument --tokens: must be >= 1, got 0"),
    (("--iters", "0"), "argument --iters: must be >= 1, got 0"),
    (("--hidden", "100"), "hidden_size=100 must be a positive multiple of 128"),
    (("--experts", "6", "--ranks", "4"), "expert_num=6 must be a positive multiple of ep_size=4"),
    (("--out", "{tmp}/missing/dir"), "argument --out: cannot create"),
    (("--provider", "deep_ep", "--device", "cpu"), "--provider deep_ep runs on CUDA GPUs only"),
]


@pytest.mark.parametrize("args,fragment", AB_USAGE_ERRORS, ids=[" ".join(a) for a, _ in AB_USAGE_ERRORS])
def test_ab_usage_errors_are_one_line_and_exit_2_before_any_work(args, fragment, tmp_path):
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    proc = run_cli("ab", *(args if "--provider" in args else ("--provider", "reference", *args)))
    assert_one_error_line(proc, 2, fragment)
    assert proc.stdout == ""  # nothing ran


def test_ab_out_must_not_be_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    assert_one_error_line(run_cli("ab", "--provider", "reference", "--out", str(target)), 2, "is not a directory")


def test_ab_on_deep_ep_without_gpus_cannot_run():
    proc = run_cli("ab", "--provider", "deep_ep")
    from test_cli import deep_ep_importable

    if deep_ep_importable():
        pytest.skip("deep_ep is installed here")
    assert_one_error_line(proc, 1, "the deep_ep provider cannot run here", "use --provider reference")
    assert proc.stdout == ""
