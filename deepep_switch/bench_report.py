"""``deepep-switch bench``'s report: merged rows, the table, ``results.json`` and the PNG plots.

Columns (microseconds, the slowest rank's median): ``raw``, ``raw+w`` (elastic/ep low-latency: the correct
hand-written baseline, see :mod:`deepep_switch.bench`), ``router``, ``vs base`` = router / baseline - 1 where the
baseline is ``raw+w`` when the row has one, else ``raw``; the same for CUDA-graph replays; ``%NVL`` = the round
trip's logical bytes at NVLink's 450 GB/s per direction over the measured time (graph replay when measured, else
eager), for the router and for raw. Logical bytes: token rows (one per token per destination rank, the local rank
included, the busiest rank's count, as DeepEP V2's tests count them) x (hidden x element size, plus the FP8 scales)
for the dispatch, plus the same rows x hidden x 2 (bf16) for the combine.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

TIME_KEYS = ("raw_us", "raw_weighted_us", "router_us", "raw_graph_us", "raw_weighted_graph_us", "router_graph_us")


def summarise(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge ranks (the slowest rank's median is the layer's latency) and add the derived columns: ``baseline``,
    ``overhead_pct`` / ``graph_overhead_pct`` (router vs baseline) and ``nvlink_pct`` per measured time."""
    merged = []
    for i, row in enumerate(per_rank[0]):
        out = dict(row)
        out["spread"] = {}
        for key in TIME_KEYS:
            ranks = [r[i] for r in per_rank if r[i].get(key) is not None]
            slowest = max(ranks, key=lambda r: r[key]) if ranks else None
            out[key] = slowest[key] if slowest else None
            if slowest and key in slowest.get("spread", {}):
                out["spread"][key] = tuple(slowest["spread"][key])  # that rank's p10/p90, beside its median
        base = "raw_weighted" if out.get("raw_weighted_us") is not None else "raw"
        out["baseline"] = base if out.get(f"{base}_us") is not None else None
        out["overhead_pct"] = _pct(out.get("router_us"), out.get(f"{base}_us"))
        out["graph_overhead_pct"] = _pct(out.get("router_graph_us"), out.get(f"{base}_graph_us"))
        floor = out.get("floor_us")
        out["nvlink_pct"] = {key[:-3]: round(100.0 * floor / out[key], 1)
                             for key in TIME_KEYS if floor and out.get(key)}
        merged.append(out)
    return merged


def _pct(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round((a / b - 1.0) * 100.0, 1) if a is not None and b else None


def _best(row: dict[str, Any], name: str) -> Optional[float]:
    return row["nvlink_pct"].get(f"{name}_graph", row["nvlink_pct"].get(name))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table, the ratios the performance targets read, the SM sweep, host and kernel breakdowns."""
    def cell(value: Optional[float], width: int = 9) -> str:
        return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"

    def pct(value: Optional[float]) -> str:
        return f"{value:+7.1f}%" if value is not None else f"{'-':>8}"

    table = [r for r in rows if not r.get("sweep")]
    head = (f"{'backend':8} {'mode':11} {'variant':7} {'tokens':>6} {'raw':>9} {'raw+w':>9} {'router':>9} "
            f"{'vs base':>8} {'raw grph':>9} {'raw+w gr':>9} {'graph':>9} {'vs base':>8} {'%NVL raw':>8} "
            f"{'%NVL rtr':>8}  buffer bytes")
    lines = [head, "-" * len(head)] if table else []
    for r in table:
        lines.append(f"{r['backend']:8} {r['mode']:11} {r.get('variant', ''):7} {r['tokens']:6d} {cell(r['raw_us'])} "
                     f"{cell(r.get('raw_weighted_us'))} {cell(r['router_us'])} {pct(r['overhead_pct'])} "
                     f"{cell(r.get('raw_graph_us'))} {cell(r.get('raw_weighted_graph_us'))} "
                     f"{cell(r.get('router_graph_us'))} {pct(r['graph_overhead_pct'])} {cell(_best(r, 'raw'), 8)} "
                     f"{cell(_best(r, 'router'), 8)}  {r['buffer_bytes']}")
    if table:
        lines.append("vs base: router / raw+w - 1 where a raw+w baseline exists (elastic/ep low-latency), else "
                     "router / raw - 1. %NVL: logical bytes at 450 GB/s over the time (graph when measured).")
        validation = sorted({r.get("validation", "") for r in table})
        lines.append(f"validation mode: {', '.join(validation)}; raw+w weighting: "
                     f"{', '.join(sorted({r['weighting'] for r in table if r.get('weighting')})) or '-'}")
    lines += _spread_lines(table)
    lines += _ratios(table)
    lines += _sweep_table([r for r in rows if r.get("sweep")])
    for r in table:
        if r.get("host_us"):
            lines.append(f"host us per round trip, {_label(r)}: {r['host_us']}")
    for r in table:
        if r.get("kernels"):
            lines.append(f"router kernels by device time, {_label(r)}:")
            lines += [f"  {k['share_pct']:5.1f}%  {k['us_per_call']:8.2f} us  {k['kernel']}" for k in r["kernels"][:12]]
    return "\n".join(lines)


def _spread_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Within-run spread: p10-p90 of the slowest rank's timings behind each median above."""
    lines = []
    for r in rows:
        parts = []
        for key in TIME_KEYS:
            if key in r.get("spread", {}):
                lo, hi = r["spread"][key]
                parts.append(f"{key[:-3].replace('_weighted', '+w')} {lo:.1f}-{hi:.1f}")
        if parts:
            lines.append(f"spread p10-p90 us, {_label(r)}: " + ", ".join(parts))
    return lines


def _label(r: dict[str, Any]) -> str:
    return " ".join(str(p) for p in (r["backend"], r["mode"], r.get("variant"), r["tokens"]) if p)


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    """The within-run ratios the performance targets are stated in."""
    lines = []
    for r in rows:
        if r["mode"] == "low_latency" and r["backend"] != "legacy" and r.get("router_graph_us"):
            legacy = next((o for o in rows if o["backend"] == "legacy" and o["mode"] == "low_latency"
                           and o["tokens"] == r["tokens"] and o.get("router_graph_us")), None)
            parts = []
            if r.get("raw_weighted_graph_us"):
                parts.append(f"graph - raw+w graph = {r['router_graph_us'] - r['raw_weighted_graph_us']:+.1f} us")
            if legacy:
                parts.append(f"graph / legacy router graph = {r['router_graph_us'] / legacy['router_graph_us']:.2f}")
            if parts:
                lines.append(f"{_label(r)}: " + "; ".join(parts))
        if r["mode"] == "normal" and r.get("raw_us") and r["tokens"] >= 4096:
            lines.append(f"{_label(r)}: router / raw = {r['router_us'] / r['raw_us']:.3f}")
    return lines


def _sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "SM sweep (normal router, eager; vs default = this / the sms=0 row - 1):",
             f"{'backend':8} {'tokens':>6} {'variant':10} {'sms used':>8} {'router':>9} {'vs default':>10} {'%NVL':>6}"]
    for r in rows:
        default = next((o for o in rows if o["backend"] == r["backend"] and o["tokens"] == r["tokens"]
                        and o["variant"] == "sms=0"), None)
        rel = _pct(r["router_us"], default["router_us"]) if default else None
        used = "-" if r.get("sms_used") is None else str(r["sms_used"])
        lines.append(f"{r['backend']:8} {r['tokens']:6d} {r['variant']:10} {used:>8} {r['router_us']:9.1f} "
                     f"{(f'{rel:+.1f}%' if rel is not None else '-'):>10} "
                     f"{r['nvlink_pct'].get('router', 0.0):6.1f}")
    return lines


def write_results(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


def write_plots(rows: list[dict[str, Any]], meta: dict[str, Any], directory: str) -> tuple[list[str], Optional[str]]:
    """PNGs in ``directory``: latency vs tokens (normal mode, router and raw per backend), the low-latency round
    trips as bars (eager and graph; raw, raw+w, router per backend and layout), and the SM sweep. Returns
    ``(paths, None)``, or ``([], why)`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        return [], f"matplotlib is not installed ({exc}); pip install matplotlib to get them"
    title = (f"deepep-switch bench: {meta.get('ranks')} ranks, {meta.get('provider')} on {meta.get('device')}"
             f"{', FP8' if meta.get('fp8') else ''}" + ("\nreference numbers: pure-PyTorch providers on CPU, not "
                                                         "DeepEP's speed" if meta.get("reference_numbers") else ""))
    written = []

    def figure() -> tuple[Any, Any]:
        fig = Figure(figsize=(7.5, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        return fig, fig.subplots()

    def save(fig: Any, ax: Any, name: str) -> None:
        ax.set_title(title, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(os.path.join(directory, name))
        fig.savefig(written[-1])

    normal = [r for r in rows if r["mode"] == "normal" and not r.get("sweep")]
    if normal:
        fig, ax = figure()
        for backend in dict.fromkeys(r["backend"] for r in normal):
            mine = sorted((r for r in normal if r["backend"] == backend), key=lambda r: r["tokens"])
            tokens = [r["tokens"] for r in mine]
            line, = ax.plot(tokens, [r["router_us"] for r in mine], marker="o", label=f"{backend} router")
            if all(r.get("raw_us") for r in mine):
                ax.plot(tokens, [r["raw_us"] for r in mine], marker="x", linestyle="--", color=line.get_color(),
                        label=f"{backend} raw")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("round trip (us), slowest rank")
        save(fig, ax, "latency_normal.png")
    low = [r for r in rows if r["mode"] == "low_latency"]
    if low:
        fig, ax = figure()
        keys = [k for k in TIME_KEYS if any(r.get(k) for r in low)]
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            ax.bar([i + j * width for i in range(len(low))], [r.get(key) or 0.0 for r in low], width,
                   label=key[:-3].replace("_weighted", "+w").replace("_", " "))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(low))],
                      [f"{r['backend']} {r.get('variant') or ''}\n{r['tokens']} tok" for r in low], fontsize=7)
        ax.set_ylabel("round trip (us), slowest rank")
        save(fig, ax, "latency_low_latency.png")
    sweep = [r for r in rows if r.get("sweep") and r["variant"].startswith("sms=")]
    if sweep:
        fig, ax = figure()
        for backend, tokens in dict.fromkeys((r["backend"], r["tokens"]) for r in sweep):
            mine = sorted((r for r in sweep if (r["backend"], r["tokens"]) == (backend, tokens)),
                          key=lambda r: int(r["variant"][4:]))
            ax.plot([int(r["variant"][4:]) for r in mine], [r["router_us"] for r in mine], marker="o",
                    label=f"{backend} {tokens} tokens")
        ax.set_xlabel("num_sms (0 = DeepEP's choice)")
        ax.set_ylabel("normal round trip (us), slowest rank")
        save(fig, ax, "sms_sweep.png")
    return written, None
