"""``deepep-switch metrics-bench``: what telemetry (``RTP_LLM_DEEPEP_METRICS=1``) costs a router round trip.

For each backend, one wrapper per mode is built with metrics on, and two routers over it: one as built (metrics on:
counters every call, a sampled call every ``RTP_LLM_DEEPEP_METRICS_SAMPLE_EVERY``-th) and one with its recorder
removed, which is exactly what a router holds when metrics are off (``_metrics = None``). The two are timed in
alternating blocks on the same buffer and inputs (so drift and JIT warm-up hit both alike):

* normal mode at ``--tokens`` (default 4096 tokens per rank): eager round trips (``prepare`` -> identity executor ->
  ``finalize``), median microseconds off and on, and the ratio on / off;
* low-latency mode at ``--ll-tokens`` (default 128): eager round trips, and on GPUs the same round trip captured
  in a CUDA graph and replayed (nothing is recorded while capturing, so the replay costs the same: the measurement
  shows it), in microseconds per round trip.

Timings: CUDA events after a barrier on GPUs (the slowest rank's median), wall clock on CPU (reference providers:
reference numbers only). Kept apart from :mod:`deepep_switch.bench` on purpose: one small module, one CLI hook.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MetricsBenchSpec:
    """The layer, the token counts per rank and the repetitions (``iters`` timed calls per block, ``rounds``
    off/on block pairs)."""

    normal_tokens: int = 4096
    low_latency_tokens: int = 128
    hidden: int = 7168
    num_experts: int = 64
    topk: int = 8
    iters: int = 30
    warmup: int = 5
    rounds: int = 3
    backends: tuple[str, ...] = ("legacy", "elastic")


def _samples_us(fn: Callable[[], Any], iters: int, cuda: bool, group: dist.ProcessGroup) -> list[float]:
    """``iters`` timings of ``fn`` in microseconds with bench's timer (a barrier before each; CUDA events on GPUs)."""
    from .bench import _Timer

    return _Timer(cuda).samples_us(fn, iters, 0, group)


def _round_trip(router: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Callable[[], Any]:
    """prepare -> identity executor (bf16 ``expert_x`` back as the output) -> finalize."""
    from routers import CombineForwardPayload

    def trip() -> Any:
        payload = router.prepare(x, None, None, w, ids)
        return router.finalize(CombineForwardPayload(payload.expert_x), payload.expert_topk_weights,
                               payload.expert_topk_ids, False, {"original_num_tokens": x.shape[0]})
    return trip


def _graph(trip: Callable[[], Any], group: dist.ProcessGroup) -> Callable[[], Any]:
    """``trip`` captured once in a CUDA graph by bench's helper; returns the replay."""
    from .bench import _graph_round_trip

    return _graph_round_trip(trip, group)


def _alternate(off: Callable[[], Any], on: Callable[[], Any], spec: MetricsBenchSpec, cuda: bool,
               group: dist.ProcessGroup) -> tuple[float, float]:
    """Median microseconds of ``off`` and ``on`` over ``rounds`` alternating blocks, after ``warmup`` calls each."""
    for _ in range(spec.warmup):
        off()
        on()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(spec.rounds):
        times[0].extend(_samples_us(off, spec.iters, cuda, group))
        times[1].extend(_samples_us(on, spec.iters, cuda, group))
    return statistics.median(times[0]), statistics.median(times[1])


def metrics_bench_rank(rank: int, world: int, spec: MetricsBenchSpec, cuda: bool) -> list[dict[str, Any]]:
    """One rank (through :func:`deepep_switch.launch.spawn`): rows of ``{backend, mode, tokens, kind, off_us,
    on_us}``, ``kind`` being ``eager`` or ``graph``."""
    from routers import LowLatencyRouter, NormalRouter

    from .settings import load_settings
    from .testing import layer_config
    from .wrapper import DeepEPWrapper

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    rows = []
    for backend in spec.backends:
        settings = load_settings(backend_raw=backend, metrics=True)
        for low_latency, tokens in ((False, spec.normal_tokens), (True, spec.low_latency_tokens)):
            config = layer_config(rank, world, hidden=spec.hidden, experts=spec.num_experts, topk=spec.topk,
                                  capacity=tokens, low_latency=low_latency)
            wrapper = DeepEPWrapper.create(config, settings=settings)
            try:
                gen = torch.Generator().manual_seed(4321 + rank)
                x = torch.randn((tokens, spec.hidden), generator=gen).to(torch.bfloat16).to(device)
                ids = torch.rand((tokens, spec.num_experts), generator=gen).argsort(dim=1)[:, :spec.topk].to(device)
                w = torch.rand((tokens, spec.topk), generator=gen).float().to(device)
                cls = LowLatencyRouter if low_latency else NormalRouter
                on_router, off_router = cls(wrapper), cls(wrapper)
                assert on_router._metrics is not None
                off_router._metrics = None  # exactly the router's state with RTP_LLM_DEEPEP_METRICS off
                trips = (_round_trip(off_router, x, ids, w), _round_trip(on_router, x, ids, w))
                mode = "low_latency" if low_latency else "normal"
                kinds: list[tuple[str, tuple[Callable[[], Any], Callable[[], Any]]]] = [("eager", trips)]
                if low_latency and cuda:
                    kinds.append(("graph", (_graph(trips[0], wrapper.group), _graph(trips[1], wrapper.group))))
                for kind, (off, on) in kinds:
                    off_us, on_us = _alternate(off, on, spec, cuda, wrapper.group)
                    rows.append(dict(backend=wrapper.backend.value, mode=mode, tokens=tokens, kind=kind,
                                     off_us=off_us, on_us=on_us))
            finally:
                DeepEPWrapper.reset()
    return rows


def summarise(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The slowest rank's medians per row, and the ratio on / off."""
    rows = []
    for i, row in enumerate(per_rank[0]):
        off = max(r[i]["off_us"] for r in per_rank)
        on = max(r[i]["on_us"] for r in per_rank)
        ratio = round(on / off, 4) if off else None
        rows.append({**row, "off_us": round(off, 2), "on_us": round(on, 2), "ratio": ratio})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'backend':8} {'mode':12} {'tokens':>6} {'kind':6} {'off us':>10} {'on us':>10} {'on/off':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:8} {r['mode']:12} {r['tokens']:6d} {r['kind']:6} {r['off_us']:10.1f} "
                     f"{r['on_us']:10.1f} {r['ratio'] if r['ratio'] is not None else '-':>8}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI hook
def add_parser(sub: Any) -> None:
    """Add ``metrics-bench`` to ``deepep-switch``'s subcommands (``sub`` from ``add_subparsers``), with the CLI's
    shared argument types: bad values and unwritable paths are one-line usage errors before any rank starts."""
    from .cli.common import backend_list, number, writable_file

    positive, seconds = number(int, 1), number(float, 0.0, exclusive=True)
    p = sub.add_parser("metrics-bench", help="router round trips with RTP_LLM_DEEPEP_METRICS on vs off "
                                             "(normal at 4096 tokens, low-latency eager and in a CUDA graph)")
    p.add_argument("--ranks", type=positive, default=2)
    p.add_argument("--provider", choices=["deep_ep", "reference"], default="deep_ep")
    p.add_argument("--tokens", type=positive, default=4096, help="normal-mode tokens per rank")
    p.add_argument("--ll-tokens", type=positive, default=128, help="low-latency tokens per rank")
    p.add_argument("--hidden", type=positive, default=7168)
    p.add_argument("--experts", type=positive, default=64)
    p.add_argument("--topk", type=positive, default=8)
    p.add_argument("--iters", type=positive, default=30)
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("--backends", type=backend_list, default=("legacy", "elastic"), help="comma separated")
    p.add_argument("--json", type=writable_file, default=None, help="also write the rows to this file")
    p.add_argument("--timeout", type=seconds, default=540.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Spawn the ranks, print the table (and write ``--json``); 0 on success."""
    from .cli.common import UsageError
    from .launch import LaunchError, spawn

    if args.hidden % 128 or args.experts % args.ranks:
        raise UsageError("--hidden must be a multiple of 128 and --experts a multiple of --ranks")
    cuda = args.provider == "deep_ep"
    if cuda and torch.cuda.device_count() < args.ranks:  # the CLI reports it as one line, exit status 1
        raise LaunchError(f"--ranks {args.ranks} needs {args.ranks} CUDA GPUs; use --provider reference on CPU")
    spec = MetricsBenchSpec(normal_tokens=args.tokens, low_latency_tokens=args.ll_tokens, hidden=args.hidden,
                            num_experts=args.experts, topk=args.topk, iters=args.iters, rounds=args.rounds,
                            backends=args.backends)
    print(f"deepep-switch metrics-bench: {args.ranks} ranks, provider={args.provider}, {spec}")
    if not cuda:
        print("note: CPU reference providers; these timings say nothing about DeepEP's speed")
    per_rank = spawn(metrics_bench_rank, args.ranks, args=(spec, cuda), backend="nccl" if cuda else "gloo",
                     env={"DEEPEP_SWITCH_PROVIDER": args.provider}, timeout_s=args.timeout)
    rows = summarise(per_rank)
    print(format_table(rows))
    if args.json:
        meta: dict[str, Optional[str]] = {"provider": args.provider, "torch": torch.__version__,
                                          "gpu": torch.cuda.get_device_name(0) if cuda else None}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "spec": asdict(spec), "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
