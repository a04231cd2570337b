"""``deepep-switch ab``: two settings side by side on identical inputs, in one process group.

By default side ``a`` is ``RTP_LLM_DEEPEP_BACKEND=legacy`` and side ``b`` is ``RTP_LLM_DEEPEP_BACKEND=elastic``; each
side may be any set of deepep-switch settings (``--b RTP_LLM_DEEPEP_BACKEND=elastic,RTP_LLM_DEEPEP_NUM_SMS=24``),
passed to :func:`~deepep_switch.settings.load_settings` as overrides (the environment is never written). For each
mode (normal, low-latency), each side builds the wrapper once, sized for the largest batch of the sweep, and for
each token count of the sweep:

* runs one MoE layer (prepare -> toy experts -> finalize) on the same random tokens and routing as the other side,
  and keeps the output for the comparison: side vs side, and each side vs the dense float32 MoE
  (:mod:`deepep_switch.testing`);
* times ``iters`` round trips (prepare -> identity executor -> finalize) with bench's timer (CUDA events after a
  barrier on GPUs, wall clock on CPU) and, on GPUs in low-latency mode, the same round trip replayed from a CUDA
  graph.

The parent merges the ranks: an iteration's latency is its slowest rank's; the report gives the median, p10/p90
and the quartiles over iterations. On CPU the reference providers run: the numbers are reference numbers, not
DeepEP's speed, and say so everywhere they appear.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any, Optional

import torch
from pydantic import ValidationError

from .config import DeepepWrapperConfig
from .quant import Quant
from .settings import (BACKEND_ENV, LoadedSettings, ProviderChoice, SwitchSettings, env_name, load_settings,
                       parse_backend)

logger = logging.getLogger("deepep_switch.ab")

MODES = ("normal", "low_latency")
TOLERANCE = 1e-2
"""Relative error (Frobenius) within which two bf16 MoE outputs agree."""
REFERENCE_NOTE = "reference numbers: pure-PyTorch providers on CPU, not DeepEP's speed"


# ---------------------------------------------------------------------------------------------- sides
@dataclass(frozen=True)
class Side:
    """One side of the comparison.

    Attributes:
        name: ``a`` or ``b``.
        label: what the user wrote (or the default), e.g. ``RTP_LLM_DEEPEP_BACKEND=elastic``.
        overrides: ``(settings field, raw value)`` pairs for :func:`load_settings`.
    """

    name: str
    label: str
    overrides: tuple[tuple[str, str], ...]

    def settings(self, provider: ProviderChoice) -> LoadedSettings:
        """This side's settings: the environment, then the side's overrides, then ``provider``."""
        return load_settings(**dict(self.overrides), provider=provider)

    def check(self) -> None:
        """Validate the values the way the ranks will read them; ValueError with one line naming the variable."""
        overrides = dict(self.overrides)
        problem = parse_backend(overrides["backend_raw"])[1] if "backend_raw" in overrides else None
        if problem:
            raise ValueError(problem.split("; using legacy")[0])
        try:
            load_settings(**overrides)
        except ValidationError as exc:  # the override itself is malformed
            problems = []
            for error in exc.errors():
                field = str(error["loc"][0]) if error.get("loc") else ""
                name = env_name(field) if field in overrides else self.label
                problems.append(f"{name}={error.get('input')!r}: {error.get('msg')}")
            raise ValueError("; ".join(problems)) from None


def _field_names() -> dict[str, str]:
    """Every name a side may use -> its settings field: the environment variable or the field's own name."""
    names = {}
    for field in SwitchSettings.model_fields:
        names[env_name(field).upper()] = field
        names[field.upper()] = field
    names["BACKEND"] = "backend_raw"
    return names


def parse_side(name: str, text: str) -> Side:
    """``legacy`` / ``elastic`` / ``auto`` (a backend), or ``NAME=VALUE[,NAME=VALUE...]`` with ``NAME`` an
    ``RTP_LLM_DEEPEP_*`` variable (or a settings field's name). Raises ValueError with one
    line saying what is wrong; :meth:`Side.check` validates the values."""
    text = text.strip()
    if not text:
        raise ValueError("empty: give a backend (legacy, elastic, auto) or NAME=VALUE[,NAME=VALUE...]")
    items = [part.strip() for part in text.split(",") if part.strip()]
    if len(items) == 1 and "=" not in items[0]:
        items = [f"{BACKEND_ENV}={items[0]}"]
    fields, overrides = _field_names(), {}
    for item in items:
        key, sep, value = item.partition("=")
        field = fields.get(key.strip().upper())
        if not sep or field is None:
            raise ValueError(f"{item!r} is not NAME=VALUE with NAME an RTP_LLM_DEEPEP_* setting "
                             f"(e.g. {BACKEND_ENV}=elastic,{env_name('num_sms')}=24)")
        if field == "provider":
            raise ValueError(f"{env_name('provider')} is the same for both sides: pass --provider")
        if field == "ep_disable_gin":  # deepep-switch only reads it; DeepEP itself takes it from the environment
            raise ValueError(f"{env_name('ep_disable_gin')} is DeepEP's own variable, read from the environment: "
                             "export it for both sides")
        if field in overrides:
            raise ValueError(f"{key.strip()} is given twice")
        overrides[field] = value.strip()
    return Side(name, ",".join(items), tuple(sorted(overrides.items())))


DEFAULTS: dict[ProviderChoice, dict[str, Any]] = {
    # Real DeepEP: a DeepSeek-V3-like layer, prefill and decode batch sizes.
    ProviderChoice.DEEP_EP: dict(hidden=7168, num_experts=64, topk=8, normal_tokens=(128, 512, 2048, 4096),
                                 low_latency_tokens=(16, 64, 128), iters=30, warmup=5),
    # The reference providers on CPU: small enough to finish in well under 2 minutes on 2 cores.
    ProviderChoice.REFERENCE: dict(hidden=512, num_experts=16, topk=4, normal_tokens=(16, 64, 256),
                                   low_latency_tokens=(8, 32, 64), iters=15, warmup=2),
}
"""The layer, sweeps and repetitions ``deepep-switch ab`` uses when none are given, per provider."""

DEFAULT_SIDES = (Side("a", f"{BACKEND_ENV}=legacy", (("backend_raw", "legacy"),)),
                 Side("b", f"{BACKEND_ENV}=elastic", (("backend_raw", "elastic"),)))


# ---------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class ABSpec:
    """The comparison: two sides, the layer, the token sweeps (tokens per rank), repetitions."""

    sides: tuple[Side, Side] = DEFAULT_SIDES
    provider: ProviderChoice = ProviderChoice.DEEP_EP
    normal_tokens: tuple[int, ...] = (128, 512, 2048, 4096)
    low_latency_tokens: tuple[int, ...] = (16, 64, 128)
    hidden: int = 7168
    num_experts: int = 64
    topk: int = 8
    iters: int = 30
    warmup: int = 5
    fp8: bool = False
    seed: int = 0

    @property
    def quant(self) -> Quant:
        return Quant.FP8_BLOCK if self.fp8 else Quant.NONE

    def sweep(self, mode: str) -> tuple[int, ...]:
        return self.low_latency_tokens if mode == "low_latency" else self.normal_tokens

    @property
    def steps(self) -> int:
        """Progress steps: one per mode, side and token count."""
        return len(self.sides) * (len(self.normal_tokens) + len(self.low_latency_tokens))

    def layer_config(self, rank: int, world: int, mode: str) -> DeepepWrapperConfig:
        """The wrapper config of one mode: sized once for the largest batch of its sweep (as engines size it)."""
        from .testing import layer_config

        return layer_config(rank, world, hidden=self.hidden, experts=self.num_experts, topk=self.topk,
                            capacity=max(self.sweep(mode)), low_latency=mode == "low_latency", quant=self.quant)


def _problem(spec: ABSpec, mode: str, tokens: int, world: int) -> Any:
    from .testing import make_problem

    return make_problem(spec.seed * 7919 + tokens * 2 + (mode == "low_latency"), [tokens] * world, spec.hidden,
                        spec.num_experts, spec.topk)


def _compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per-rank pieces of the error: max |out - ref|, ||out - ref||^2 and ||ref||^2 (float64), summed by the parent."""
    diff = out.double() - ref.double().to(out.device)
    return {"max_abs": float(diff.abs().max()) if diff.numel() else 0.0, "diff_sq": float(diff.square().sum()),
            "ref_sq": float(ref.double().square().sum())}


def ab_rank(rank: int, world: int, spec: ABSpec, cuda: bool, progress: Any = None) -> dict[str, Any]:
    """One rank of the comparison (through :func:`deepep_switch.launch.spawn`).

    ``progress``: a multiprocessing queue; rank 0 puts ``(done, total, what)`` after each step.

    Returns ``{"sides": {side: {mode: decision and memory}}, "latency": [rows with this rank's samples (us)],
    "errors": [per mode, tokens and pair: max_abs, diff_sq, ref_sq]}``.
    """
    from routers import LowLatencyRouter, NormalRouter, RouterOptions

    from .bench import _graph_round_trip, _router_round_trip, _Timer
    from .testing import MoEProblem, ToyExperts, dense_reference, run_moe_layer
    from .wrapper import DeepEPWrapper

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    timer = _Timer(cuda)
    experts = ToyExperts(spec.seed, spec.num_experts, spec.hidden, device)
    sides: dict[str, dict[str, Any]] = {side.name: {} for side in spec.sides}
    latency: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    done = 0
    for mode in MODES:
        low_latency = mode == "low_latency"
        outputs: dict[tuple[str, int], torch.Tensor] = {}
        for side in spec.sides:
            free_before = torch.cuda.mem_get_info()[0] if cuda else 0
            wrapper = DeepEPWrapper.create(spec.layer_config(rank, world, mode), settings=side.settings(spec.provider))
            try:
                decision = wrapper.decision
                sides[side.name][mode] = {
                    "decision": decision.describe(), "requested": decision.requested_mode.value,
                    "resolved": decision.resolved.value, "buffer_bytes": wrapper.buffer_bytes,
                    "device_bytes": int(free_before - torch.cuda.mem_get_info()[0]) if cuda else None}
                router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper, RouterOptions(quant=spec.quant))
                for tokens in spec.sweep(mode):
                    problem = _problem(spec, mode, tokens, world)
                    x, ids, weights = problem.local(rank, device)
                    outputs[(side.name, tokens)] = run_moe_layer(router, x, ids, weights, experts, rank).cpu()
                    trip = _router_round_trip(router, x, ids, weights)
                    row = {"mode": mode, "tokens": tokens, "side": side.name,
                           "samples_us": timer.samples_us(trip, spec.iters, spec.warmup, wrapper.group),
                           "graph_samples_us": None}
                    if low_latency and cuda:
                        row["graph_samples_us"] = timer.samples_us(_graph_round_trip(trip, wrapper.group), spec.iters,
                                                                   spec.warmup, wrapper.group)
                    latency.append(row)
                    done += 1
                    if progress is not None and rank == 0:
                        progress.put((done, spec.steps, f"{mode} side {side.name} tokens={tokens}"))
            finally:
                DeepEPWrapper.reset()
        a, b = (side.name for side in spec.sides)
        for tokens in spec.sweep(mode):
            problem = _problem(spec, mode, tokens, world)
            rows = problem.rank_slice(rank)
            mine = MoEProblem(problem.x[rows], problem.topk_ids[rows], problem.topk_weights[rows], [tokens])
            dense = dense_reference(mine, experts, fp8=spec.fp8).cpu()
            for pair, out, ref in ((f"{a}_vs_{b}", outputs[(a, tokens)], outputs[(b, tokens)]),
                                   (f"{a}_vs_dense", outputs[(a, tokens)], dense),
                                   (f"{b}_vs_dense", outputs[(b, tokens)], dense)):
                errors.append({"mode": mode, "tokens": tokens, "pair": pair, **_compare(out, ref)})
    return {"sides": sides, "latency": latency, "errors": errors}


# ---------------------------------------------------------------------------------------------- the report
def spread(samples: list[float]) -> dict[str, float]:
    """Median, p10/p90, quartiles, min and max of ``samples`` (microseconds)."""
    if len(samples) == 1:
        v = samples[0]
        return {"median_us": v, "p10_us": v, "p90_us": v, "q1_us": v, "q3_us": v, "min_us": v, "max_us": v}
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_us": statistics.median(samples), "p10_us": deciles[0], "p90_us": deciles[-1],
            "q1_us": quartiles[0], "q3_us": quartiles[-1], "min_us": min(samples), "max_us": max(samples)}


def _slowest(per_rank: list[list[float]]) -> list[float]:
    """Iteration by iteration, the slowest rank (a layer is as fast as its slowest rank)."""
    return [max(values) for values in zip(*per_rank)]


def summarise(per_rank: list[dict[str, Any]], spec: ABSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """Merge the ranks' results into the report written as ``ab.json``."""
    names = [side.name for side in spec.sides]
    sides = {}
    for side in spec.sides:
        modes = {}
        for mode in MODES:
            ranks = [r["sides"][side.name][mode] for r in per_rank]
            device = [r["device_bytes"] for r in ranks]
            modes[mode] = {"decision": ranks[0]["decision"], "requested": ranks[0]["requested"],
                           "resolved": ranks[0]["resolved"], "buffer_bytes": ranks[0]["buffer_bytes"],
                           "device_bytes": max(device) if None not in device else None}
        sides[side.name] = {"label": side.label, "overrides": dict(side.overrides), "modes": modes}

    latency = []
    for i, row in enumerate(per_rank[0]["latency"]):
        samples = _slowest([r["latency"][i]["samples_us"] for r in per_rank])
        entry = {"mode": row["mode"], "tokens": row["tokens"], "side": row["side"], **spread(samples),
                 "samples_us": samples, "graph": None}
        if row["graph_samples_us"] is not None:
            graph = _slowest([r["latency"][i]["graph_samples_us"] for r in per_rank])
            entry["graph"] = {**spread(graph), "samples_us": graph}
        latency.append(entry)

    agreement: dict[str, Any] = {}
    for mode in MODES:
        pairs: dict[str, Any] = {}
        for pair in (f"{names[0]}_vs_{names[1]}", f"{names[0]}_vs_dense", f"{names[1]}_vs_dense"):
            by_tokens = []
            for tokens in spec.sweep(mode):
                found = [e for r in per_rank for e in r["errors"]
                         if e["mode"] == mode and e["tokens"] == tokens and e["pair"] == pair]
                by_tokens.append(_merge_errors(found) | {"tokens": tokens})
            everything = [e for r in per_rank for e in r["errors"] if e["mode"] == mode and e["pair"] == pair]
            pairs[pair] = _merge_errors(everything) | {"by_tokens": by_tokens}
        worst = max(p["relative"] for p in pairs.values())
        agreement[mode] = {**pairs, "tolerance": TOLERANCE, "worst_relative": worst, "agree": worst <= TOLERANCE}
    return {"meta": meta, "sides": sides, "agreement": agreement, "latency": latency,
            "agree": all(agreement[mode]["agree"] for mode in MODES)}


def _merge_errors(found: list[dict[str, Any]]) -> dict[str, float]:
    diff_sq, ref_sq = sum(e["diff_sq"] for e in found), sum(e["ref_sq"] for e in found)
    return {"max_abs": max((e["max_abs"] for e in found), default=0.0),
            "relative": math.sqrt(diff_sq / ref_sq) if ref_sq else math.sqrt(diff_sq)}


def format_report(report: dict[str, Any]) -> str:
    """The report as the CLI prints it."""
    sides, names = report["sides"], list(report["sides"])
    a, b = names
    lines = [f"side {name}: {side['label']}" for name, side in sides.items()]
    lines.append("decisions:")
    for name, side in sides.items():
        for mode in MODES:
            lines.append(f"  {name} {mode:11}: {side['modes'][mode]['decision']}")
    lines.append(f"agreement (relative = ||x - y|| / ||y||, bf16 tolerance {TOLERANCE:g}):")
    for mode in MODES:
        ag = report["agreement"][mode]
        ab_, ad, bd = ag[f"{a}_vs_{b}"], ag[f"{a}_vs_dense"], ag[f"{b}_vs_dense"]
        lines.append(f"  {mode:11}: {a} vs {b} max abs {ab_['max_abs']:.3g} rel {ab_['relative']:.2e} | "
                     f"{a} vs dense rel {ad['relative']:.2e} | {b} vs dense rel {bd['relative']:.2e}  "
                     f"{'OK' if ag['agree'] else 'MISMATCH'}")
    note = " (" + REFERENCE_NOTE + ")" if report["meta"].get("reference_numbers") else ""
    lines.append(f"latency per round trip, us, slowest rank per iteration: median [p10, p90]{note}")
    head = f"  {'mode':11} {'tokens':>6} {'side ' + a:>26} {'side ' + b:>26} {b + '/' + a:>8}"
    lines.append(head)
    by_key = {(r["mode"], r["tokens"], r["side"]): r for r in report["latency"]}
    for mode in MODES:
        for tokens in sorted({r["tokens"] for r in report["latency"] if r["mode"] == mode}):
            ra, rb = by_key[(mode, tokens, a)], by_key[(mode, tokens, b)]
            cells = [f"{r['median_us']:9.1f} [{r['p10_us']:7.1f}, {r['p90_us']:7.1f}]" for r in (ra, rb)]
            lines.append(f"  {mode:11} {tokens:6d} {cells[0]:>26} {cells[1]:>26} "
                         f"{rb['median_us'] / ra['median_us']:8.2f}")
            if ra["graph"] and rb["graph"]:
                cells = [f"{r['graph']['median_us']:9.1f} [{r['graph']['p10_us']:7.1f}, {r['graph']['p90_us']:7.1f}]"
                         for r in (ra, rb)]
                lines.append(f"  {'  graph':11} {tokens:6d} {cells[0]:>26} {cells[1]:>26} "
                             f"{rb['graph']['median_us'] / ra['graph']['median_us']:8.2f}")
    lines.append("memory (buffer bytes by pool; device bytes the construction took, GPUs only):")
    for name, side in sides.items():
        for mode in MODES:
            m = side["modes"][mode]
            device = "n/a" if m["device_bytes"] is None else f"{m['device_bytes']:,}"
            lines.append(f"  {name} {mode:11}: buffer {m['buffer_bytes']} device {device}")
    return "\n".join(lines)


def write_plots(report: dict[str, Any], directory: str) -> tuple[list[str], Optional[str]]:
    """One PNG per mode (``latency_<mode>.png``, drawn by :func:`latency_figure`) under ``directory``.

    Returns ``(paths written, None)``, or ``([], why)`` when matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return [], f"matplotlib is not installed ({exc}); pip install matplotlib to get them"
    written = []
    for mode in MODES:
        path = os.path.join(directory, f"latency_{mode}.png")
        latency_figure(report, mode).savefig(path)
        written.append(path)
    return written, None


def latency_figure(report: dict[str, Any], mode: str) -> Any:
    """A matplotlib ``Figure`` (Agg canvas): latency vs tokens per side for ``mode``, the median line and a p10-p90
    band; where a side timed CUDA-graph replays (low-latency on GPUs) they are a dashed line and band in the side's
    colour. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    note = f"\n{REFERENCE_NOTE}" if report["meta"].get("reference_numbers") else ""
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, side in report["sides"].items():
        rows = sorted((r for r in report["latency"] if r["mode"] == mode and r["side"] == name),
                      key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in rows]
        graphs = [r for r in rows if r.get("graph")]
        eager = " (eager)" if graphs else ""
        line, = ax.plot(tokens, [r["median_us"] for r in rows], marker="o", label=f"{name}: {side['label']}{eager}")
        ax.fill_between(tokens, [r["p10_us"] for r in rows], [r["p90_us"] for r in rows], alpha=0.25,
                        color=line.get_color(), label=f"{name}: p10-p90")
        if graphs:
            g_tokens = [r["tokens"] for r in graphs]
            ax.plot(g_tokens, [r["graph"]["median_us"] for r in graphs], marker="s", linestyle="--",
                    color=line.get_color(), label=f"{name}: CUDA graph")
            ax.fill_between(g_tokens, [r["graph"]["p10_us"] for r in graphs],
                            [r["graph"]["p90_us"] for r in graphs], alpha=0.12, color=line.get_color())
    swept = sorted({r["tokens"] for r in report["latency"] if r["mode"] == mode})
    if len(swept) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(swept, [str(t) for t in swept])
    ax.minorticks_off()
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("round trip (us), slowest rank")
    meta = report["meta"]
    ax.set_title(f"deepep-switch ab: {mode}, {meta['ranks']} ranks, {meta['provider']} on {meta['device']}{note}",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
