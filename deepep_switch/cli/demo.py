"""``deepep-switch demo``: a small MoE exchange on N ranks, checked against a dense single-process MoE."""

from __future__ import annotations

import argparse
from typing import Any

from ..settings import BackendChoice, ProviderChoice
from .common import (EXIT_CANNOT_RUN, EXIT_OK, UsageError, check_can_run, device_and_backend, int_list, number,
                     provider_from)


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the subcommand parsers ``sub``."""
    positive = number(int, 1)
    seconds = number(float, 0.0, exclusive=True)
    providers = [c.value for c in ProviderChoice]
    demo = sub.add_parser("demo", help="run a small MoE exchange on N ranks and check it against a dense MoE")
    demo.add_argument("--ranks", type=positive, default=2)
    demo.add_argument("--provider", choices=providers, default=None,
                      help="reference: pure-PyTorch providers (CPU); deep_ep: real DeepEP on GPUs. "
                           "Default: DEEPEP_SWITCH_PROVIDER, else reference")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    demo.add_argument("--backend", choices=[c.value for c in BackendChoice], default=None,
                      help="override RTP_LLM_DEEPEP_BACKEND for this run")
    demo.add_argument("--tokens", type=int_list(0), default=None,
                      help="tokens per rank, comma separated (0 = an empty rank); default 8+5*rank")
    demo.add_argument("--hidden", type=positive, default=None,
                      help="a multiple of 128 (256 for elastic on DeepEP); default 256, 2048 with deep_ep")
    demo.add_argument("--experts", type=positive, default=8, help="a multiple of --ranks")
    demo.add_argument("--topk", type=positive, default=2, help="at most --experts")
    demo.add_argument("--timeout", type=seconds, default=180.0)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every rank matches the dense MoE, 1 otherwise."""
    from ..demo import DEFAULT_HIDDEN, DemoSpec, default_tokens, run_rank
    from ..launch import spawn

    provider = provider_from(args.provider, ProviderChoice.REFERENCE)
    kind, dist_backend = device_and_backend(provider, args.device)
    tokens = args.tokens or default_tokens(args.ranks)
    if len(tokens) != args.ranks:
        raise UsageError(f"--tokens has {len(tokens)} value{'s' if len(tokens) > 1 else ''} but --ranks is "
                         f"{args.ranks}: give one per rank")
    if not any(tokens):
        raise UsageError("--tokens: at least one rank must send tokens")
    spec = DemoSpec(tokens_per_rank=tuple(tokens), hidden=args.hidden or DEFAULT_HIDDEN[provider],
                    num_experts=args.experts, topk=args.topk)
    configs = [spec.layer_config(0, args.ranks, low_latency) for low_latency in (False, True)]
    check_can_run(provider, args.backend, kind, args.ranks, configs)

    env = {"DEEPEP_SWITCH_PROVIDER": provider.value}
    if args.backend:
        env["RTP_LLM_DEEPEP_BACKEND"] = args.backend
    print(f"deepep-switch demo: {args.ranks} ranks ({dist_backend} on {kind}), provider={provider.value}, "
          f"tokens per rank={list(tokens)}, hidden={spec.hidden}, experts={spec.num_experts}, top-k={spec.topk}")
    results = spawn(run_rank, args.ranks, args=(spec, kind), backend=dist_backend, env=env, timeout_s=args.timeout)
    modes = ("normal", "low_latency")
    for mode in modes:
        print(f"\n[{mode} router] decision on rank 0: {results[0][mode]['decision']}")
        for r in results:
            m = r[mode]
            head = (f"  rank {r['rank']}: backend={m['backend']:7} sent={r['tokens']:3d} tokens  "
                    f"received={m['received_rows']:3d} rows  ")
            if m["relative_error"] is None:
                outcome = "checks that an empty batch round-trips" if m["round_trip_ok"] else "output shape MISMATCH"
                print(head + f"(empty rank: {outcome})")
            else:
                print(head + f"rel.err vs dense fp32 = {m['relative_error']:.2e}")
    errors = [r[m]["relative_error"] for r in results for m in modes if r[m]["relative_error"] is not None]
    worst = max(errors, default=0.0)
    ok = worst <= 1e-2 and all(r[m]["round_trip_ok"] for r in results for m in modes)
    print(f"\nresult: {'OK' if ok else 'MISMATCH'} (worst relative error {worst:.2e}, bf16 tolerance 1e-2). "
          "Flip RTP_LLM_DEEPEP_BACKEND=legacy|elastic|ep|auto to switch generations.")
    return EXIT_OK if ok else EXIT_CANNOT_RUN

