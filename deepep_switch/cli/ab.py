"""``deepep-switch ab``: two settings side by side on identical inputs."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..settings import ProviderChoice
from .common import (EXIT_OK, CannotRunError, UsageError, ab_side, cannot_run, check_can_run, device_and_backend,
                     int_list, number, provider_from, writable_dir)
from .progress import ProgressBar


def add_parser(sub: Any) -> None:
    """Register ``ab`` on the subcommand parsers ``sub``."""
    positive, non_negative = number(int, 1), number(int, 0)
    seconds = number(float, 0.0, exclusive=True)
    providers = [c.value for c in ProviderChoice]
    ab = sub.add_parser("ab", help="two settings (default: legacy vs elastic) side by side on identical inputs: "
                                   "agreement, latency per token count, memory, decisions")
    ab.add_argument("--a", type=ab_side("a"), default=None, metavar="SETTINGS",
                    help="side a: a backend (legacy, elastic, auto) or NAME=VALUE[,NAME=VALUE...] with RTP_LLM_DEEPEP_* "
                         "names, e.g. RTP_LLM_DEEPEP_BACKEND=elastic,RTP_LLM_DEEPEP_NUM_SMS=24. Default: legacy")
    ab.add_argument("--b", type=ab_side("b"), default=None, metavar="SETTINGS", help="side b; default: elastic")
    ab.add_argument("--ranks", type=positive, default=2)
    ab.add_argument("--provider", choices=providers, default=None,
                    help="default: DEEPEP_SWITCH_PROVIDER, else deep_ep (reference: CPU, reference numbers)")
    ab.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ab.add_argument("--tokens", type=int_list(1), default=None,
                    help="normal-mode tokens per rank; default 128,512,2048,4096 (reference: 16,64,256)")
    ab.add_argument("--ll-tokens", type=int_list(1), default=None,
                    help="low-latency tokens per rank; default 16,64,128 (reference: 8,32,64)")
    ab.add_argument("--hidden", type=positive, default=None, help="default 7168 (reference: 512)")
    ab.add_argument("--experts", type=positive, default=None, help="default 64 (reference: 16)")
    ab.add_argument("--topk", type=positive, default=None, help="default 8 (reference: 4)")
    ab.add_argument("--iters", type=positive, default=None, help="timed round trips per point; default 30 (reference: 15)")
    ab.add_argument("--warmup", type=non_negative, default=None, help="default 5 (reference: 2)")
    ab.add_argument("--fp8", action="store_true", help="FP8 dispatch on both sides")
    ab.add_argument("--seed", type=non_negative, default=0)
    ab.add_argument("--out", type=writable_dir, default=None, metavar="DIR",
                    help="write DIR/ab.json and DIR/latency_<mode>.png (plots need matplotlib)")
    ab.add_argument("--timeout", type=seconds, default=540.0)
    ab.set_defaults(func=cmd_ab)


def cmd_ab(args: argparse.Namespace) -> int:
    """Run two settings side by side on identical inputs; print the report, write ab.json and plots with --out;
    1 when the sides' outputs disagree (or a side cannot run its request here)."""
    import multiprocessing
    import time

    import torch

    from ..ab import (DEFAULT_SIDES, DEFAULTS, MODES, REFERENCE_NOTE, TOLERANCE, ABSpec, ab_rank, format_report,
                      summarise, write_plots)
    from ..launch import spawn

    provider = provider_from(args.provider, ProviderChoice.DEEP_EP)
    kind, dist_backend = device_and_backend(provider, args.device)
    given = {"hidden": args.hidden, "num_experts": args.experts, "topk": args.topk, "normal_tokens": args.tokens,
             "low_latency_tokens": args.ll_tokens, "iters": args.iters, "warmup": args.warmup}
    sides = (args.a or DEFAULT_SIDES[0], args.b or DEFAULT_SIDES[1])
    for side in sides:
        try:
            side.check()
        except ValueError as exc:
            raise UsageError(f"argument --{side.name}: {exc}") from None
    spec = ABSpec(sides=sides, provider=provider, fp8=args.fp8, seed=args.seed,
                  **{k: v if v is not None else DEFAULTS[provider][k] for k, v in given.items()})
    configs = [spec.layer_config(0, args.ranks, mode) for mode in MODES]
    for side in spec.sides:
        decision = check_can_run(provider, None, kind, args.ranks, configs, dict(side.overrides))
        problem = cannot_run(decision, "--provider reference", need_requested=True)
        if problem:
            raise CannotRunError(f"side {side.name} ({side.label}): {problem}")

    reference = provider is ProviderChoice.REFERENCE
    print(f"deepep-switch ab: {args.ranks} ranks ({dist_backend} on {kind}), provider={provider.value}, "
          f"hidden={spec.hidden}, experts={spec.num_experts}, top-k={spec.topk}, fp8={spec.fp8}, "
          f"normal tokens={list(spec.normal_tokens)}, low-latency tokens={list(spec.low_latency_tokens)}, "
          f"iters={spec.iters}")
    if reference:
        print(f"note: {REFERENCE_NOTE}")
    queue = multiprocessing.get_context("spawn").Queue()
    started = time.monotonic()
    with ProgressBar(queue, spec.steps, "ab"):
        per_rank = spawn(ab_rank, args.ranks, args=(spec, kind == "cuda", queue), backend=dist_backend,
                         timeout_s=args.timeout)
    meta = {"ranks": args.ranks, "provider": provider.value, "device": kind, "dist_backend": dist_backend,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if kind == "cuda" else None,
            "hidden": spec.hidden, "experts": spec.num_experts, "topk": spec.topk, "fp8": spec.fp8,
            "normal_tokens": list(spec.normal_tokens), "low_latency_tokens": list(spec.low_latency_tokens),
            "iters": spec.iters, "warmup": spec.warmup, "seed": spec.seed, "reference_numbers": reference,
            "note": REFERENCE_NOTE if reference else "real DeepEP",
            "timing": "CUDA events after a barrier" if kind == "cuda" else "wall clock after a barrier",
            "elapsed_s": round(time.monotonic() - started, 1)}
    report = summarise(per_rank, spec, meta)
    print(format_report(report))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "ab.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        plots, skipped = write_plots(report, args.out)
        print(f"wrote {', '.join([path, *plots])}" + (f"; plots skipped: {skipped}" if skipped else ""))
    if not report["agree"]:
        worst = ", ".join(f"{mode} {report['agreement'][mode]['worst_relative']:.2e}" for mode in MODES)
        raise CannotRunError(f"the outputs do not agree within the bf16 tolerance {TOLERANCE:g} (worst relative "
                             f"error between the sides or against the dense MoE: {worst})")
    return EXIT_OK

