"""``deepep-switch bench``: raw DeepEP against the routers on each backend (see :mod:`deepep_switch.bench`).

Without ``--provider`` (and without ``DEEPEP_SWITCH_PROVIDER``) it runs real DeepEP when this machine has a GPU per
rank and an importable ``deep_ep``, else a quick run of the pure-PyTorch reference providers on the CPU (small layer,
labelled reference numbers: they say nothing about DeepEP's speed). ``--quick`` shortens either.

To add an option: an argument in :func:`add_parser`, its :class:`~deepep_switch.bench.BenchSpec` field in
:func:`spec_from_args`, and (if it changes what the ranks build) nothing else: :func:`cmd_bench` checks every
config :func:`~deepep_switch.bench.plan_jobs` yields before spawning.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from typing import Any

from ..settings import ElasticLowLatencyLayout, ProviderChoice, get_settings
from .common import (EXIT_OK, UsageError, backend_list, check_can_run, device_and_backend, int_list, number,
                     provider_from, writable_dir, writable_file)
from .progress import ProgressBar

REFERENCE_NOTE = "reference numbers: pure-PyTorch providers on CPU, not DeepEP's speed"

# Per provider: the layer and repetitions when no flag says otherwise; --quick overrides some of them.
DEFAULTS: dict[ProviderChoice, dict[str, Any]] = {
    ProviderChoice.DEEP_EP: dict(normal_tokens=(128, 4096), low_latency_tokens=(128,), hidden=7168, num_experts=64,
                                 topk=8, iters=30, warmup=5, sweep_tokens=(512, 4096, 8192)),
    ProviderChoice.REFERENCE: dict(normal_tokens=(16, 64), low_latency_tokens=(16,), hidden=512, num_experts=16,
                                   topk=4, iters=5, warmup=1, sweep_tokens=(32, 64)),
}
QUICK: dict[ProviderChoice, dict[str, Any]] = {
    ProviderChoice.DEEP_EP: dict(normal_tokens=(128,), low_latency_tokens=(128,), iters=10, warmup=2),
    ProviderChoice.REFERENCE: dict(normal_tokens=(16,), low_latency_tokens=(8,), iters=3, warmup=1),
}


def _even_list(text: str) -> tuple[int, ...]:
    values = int_list(0)(text)
    odd = [v for v in values if v % 2]
    if odd:
        raise argparse.ArgumentTypeError(f"num_sms must be even (DeepEP pairs SMs), got {odd}")
    return values


def _layouts(text: str) -> tuple[str, ...]:
    accepted = [layout.value for layout in ElasticLowLatencyLayout]
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    if not values or any(v not in accepted for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each layout must be one of {', '.join(accepted)}")
    return values


def add_parser(sub: Any) -> None:
    """Register ``bench`` on the subcommand parsers ``sub``."""
    positive, non_negative = number(int, 1), number(int, 0)
    seconds = number(float, 0.0, exclusive=True)
    bench = sub.add_parser("bench", help="time raw DeepEP vs the routers on each backend (CPU reference run when "
                                         "there are no GPUs)")
    bench.add_argument("--ranks", type=positive, default=2)
    bench.add_argument("--provider", choices=[c.value for c in ProviderChoice], default=None,
                       help="default: DEEPEP_SWITCH_PROVIDER, else deep_ep where a GPU per rank and deep_ep exist, "
                            "else reference (a quick CPU run, reference numbers)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    bench.add_argument("--quick", action="store_true", help="fewer token counts and repetitions")
    bench.add_argument("--tokens", type=int_list(1), default=None,
                       help="normal-mode tokens per rank; default 128,4096 (reference: 16,64)")
    bench.add_argument("--ll-tokens", type=int_list(1), default=None,
                       help="low-latency tokens per rank; default 128 (reference: 16)")
    bench.add_argument("--hidden", type=positive, default=None, help="default 7168 (reference: 512)")
    bench.add_argument("--experts", type=positive, default=None, help="default 64 (reference: 16)")
    bench.add_argument("--topk", type=positive, default=None, help="default 8 (reference: 4)")
    bench.add_argument("--iters", type=positive, default=None, help="default 30 (reference: 5)")
    bench.add_argument("--warmup", type=non_negative, default=None, help="default 5 (reference: 1)")
    bench.add_argument("--backends", type=backend_list, default=("legacy", "elastic"))
    bench.add_argument("--fp8", action="store_true")
    bench.add_argument("--ll-layouts", type=_layouts, default=("token", "expand"),
                       help="elastic/ep low-latency layouts, one row each (RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT)")
    bench.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replays of low-latency rows")
    bench.add_argument("--sweep-sms", type=_even_list, default=(), metavar="LIST",
                       help="also time the elastic/ep normal router per num_sms (0 = DeepEP's choice), e.g. "
                            "0,16,24,32,48")
    bench.add_argument("--sweep-tokens", type=int_list(1), default=None,
                       help="the sweep's tokens per rank; default 512,4096,8192 (reference: 32,64)")
    bench.add_argument("--sweep-overlap", action="store_true",
                       help="the sweep also tries prefer_overlap_with_compute=False (DeepEP then uses >= 64 SMs)")
    bench.add_argument("--sweep-iters", type=positive, default=10)
    bench.add_argument("--sweep-only", action="store_true", help="only the sweep, not the raw/router table")
    bench.add_argument("--json", type=writable_file, default=None, help="also write the results to this file")
    bench.add_argument("--out", type=writable_dir, default=None, metavar="DIR",
                       help="write DIR/results.json and PNG plots (plots need matplotlib)")
    bench.add_argument("--profile", type=writable_file, default=None,
                       help="append torch.profiler tables and the router's kernel shares (rank 0, <=128 tokens) "
                            "here; adds the host breakdown to the table")
    bench.add_argument("--timeout", type=seconds, default=540.0)
    bench.set_defaults(func=cmd_bench)


def _default_provider(ranks: int) -> tuple[ProviderChoice, str]:
    """``(provider, why)`` when neither ``--provider`` nor ``DEEPEP_SWITCH_PROVIDER`` says: real DeepEP where a GPU
    per rank and ``deep_ep`` exist, else the reference providers."""
    if "provider" in get_settings().settings.model_fields_set:
        return provider_from(None, ProviderChoice.DEEP_EP), ""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= ranks and importlib.util.find_spec("deep_ep") is not None:
        return ProviderChoice.DEEP_EP, ""
    why = f"{gpus} GPU(s) for {ranks} ranks" if gpus < ranks else "no deep_ep"
    return ProviderChoice.REFERENCE, (f"{why} here: a quick CPU run of the reference providers ({REFERENCE_NOTE}); "
                                      "--provider deep_ep to insist")


def spec_from_args(args: argparse.Namespace, provider: ProviderChoice) -> Any:
    """The :class:`~deepep_switch.bench.BenchSpec` of these arguments (provider defaults, then --quick, then flags)."""
    from ..bench import BenchSpec

    values = dict(DEFAULTS[provider])
    if args.quick:
        values.update(QUICK[provider])
    given = {"normal_tokens": args.tokens, "low_latency_tokens": args.ll_tokens, "hidden": args.hidden,
             "num_experts": args.experts, "topk": args.topk, "iters": args.iters, "warmup": args.warmup,
             "sweep_tokens": args.sweep_tokens}
    values.update({k: v for k, v in given.items() if v is not None})
    return BenchSpec(backends=args.backends, use_fp8=args.fp8, profile_path=args.profile,
                     ll_layouts=args.ll_layouts, graphs=not args.no_graphs, table=not args.sweep_only,
                     sweep_sms=args.sweep_sms, sweep_overlap=args.sweep_overlap, sweep_iters=args.sweep_iters,
                     **values)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time raw DeepEP against the routers; print the table; write JSON, results.json and plots on request."""
    import multiprocessing
    import time

    import torch

    from ..bench import bench_config, bench_rank, plan_jobs
    from ..bench_report import format_table, summarise, write_plots, write_results
    from ..launch import spawn

    if args.provider:
        provider, note = ProviderChoice(args.provider), ""
    else:
        provider, note = _default_provider(args.ranks)
    kind, dist_backend = device_and_backend(provider, args.device)
    spec = spec_from_args(args, provider)
    if args.sweep_only and not spec.sweep_sms:
        raise UsageError("--sweep-only needs --sweep-sms")
    jobs = plan_jobs(spec)
    if not jobs:
        raise UsageError("nothing to time: --sweep-sms names no elastic or ep backend in --backends")
    for backend in spec.backends:
        configs = [bench_config(0, args.ranks, spec, job.tokens, job.low_latency) for job in jobs
                   if job.backend == backend]
        if configs:
            check_can_run(provider, backend, kind, args.ranks, configs)

    reference = provider is ProviderChoice.REFERENCE
    shown = {k: v for k, v in dataclasses.asdict(spec).items() if k != "profile_path"}
    print(f"deepep-switch bench: {args.ranks} ranks ({dist_backend} on {kind}), provider={provider.value}, "
          f"{len(jobs)} rows, {shown}")
    if note:
        print(f"note: {note}")
    elif kind == "cpu":
        print(f"note: {REFERENCE_NOTE}; these timings say nothing about DeepEP's speed")
    queue = multiprocessing.get_context("spawn").Queue()
    started = time.monotonic()
    with ProgressBar(queue, len(jobs), "bench"):
        per_rank = spawn(bench_rank, args.ranks, args=(spec, kind == "cuda", queue), backend=dist_backend,
                         env={"DEEPEP_SWITCH_PROVIDER": provider.value}, timeout_s=args.timeout)
    rows = summarise(per_rank)
    print(format_table(rows))
    meta = {"ranks": args.ranks, "provider": provider.value, "device": kind, "dist_backend": dist_backend,
            "spec": dataclasses.asdict(spec), "fp8": spec.use_fp8, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if kind == "cuda" else None, "reference_numbers": reference,
            "note": REFERENCE_NOTE if reference else "real DeepEP",
            "timing": "CUDA events after a barrier" if kind == "cuda" else "wall clock after a barrier",
            "elapsed_s": round(time.monotonic() - started, 1)}
    if args.json:
        write_results(args.json, meta, rows)
        print(f"wrote {args.json}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "results.json")
        write_results(path, meta, rows)
        plots, skipped = write_plots(rows, meta, args.out)
        print(f"wrote {', '.join([path, *plots])}" + (f"; plots skipped: {skipped}" if skipped else ""))
    return EXIT_OK
