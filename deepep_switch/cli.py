"""The ``deepep-switch`` command: ``demo``, ``doctor`` and ``bench``.

This module is the user interface: it prints. The library modules only log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

import torch


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _device_and_backend(provider: str, device: Optional[str]) -> tuple[str, str]:
    kind = device or ("cuda" if provider == "deep_ep" else "cpu")
    return kind, ("nccl" if kind == "cuda" else "gloo")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSpec, default_tokens, run_rank
    from .launch import spawn

    tokens = args.tokens or default_tokens(args.ranks)
    if len(tokens) != args.ranks:
        print(f"--tokens needs {args.ranks} values", file=sys.stderr)
        return 2
    spec = DemoSpec(tokens_per_rank=tuple(tokens), hidden=args.hidden, num_experts=args.experts, topk=args.topk)
    kind, backend = _device_and_backend(args.provider, args.device)
    env = {"DEEPEP_SWITCH_PROVIDER": args.provider}
    if args.backend:
        env["RTP_LLM_DEEPEP_BACKEND"] = args.backend
    print(f"deepep-switch demo: {args.ranks} ranks ({backend} on {kind}), provider={args.provider}, "
          f"tokens per rank={list(tokens)}, hidden={spec.hidden}, experts={spec.num_experts}, top-k={spec.topk}")
    results = spawn(run_rank, args.ranks, args=(spec, kind), backend=backend, env=env, timeout_s=args.timeout)
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
          "Flip RTP_LLM_DEEPEP_BACKEND=legacy|elastic|auto to switch generations.")
    return 0 if ok else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from .decision import resolve_backend
    from .settings import get_settings

    loaded = get_settings()
    decision = resolve_backend(internode=args.internode)
    if args.json:
        print(decision.model_dump_json(indent=2))
        return 0
    print("settings:", loaded.settings.model_dump_json())
    for problem in loaded.problems:
        print("  problem:", problem)
    report = decision.preflight
    print(f"preflight (provider={report.provider.value}): deep_ep={report.deep_ep_version} "
          f"nccl runtime={report.nccl_runtime_version} build={report.nccl_build_version} gpus={report.gpu_count}")
    for check in report.checks:
        gates = ",".join(b.value for b in check.gates) or "advisory"
        print(f"  [{'pass' if check.passed else 'FAIL'}] {check.name:18} ({gates}) {check.detail}")
    print("decision:", decision.describe())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSpec, bench_rank, format_table, summarise
    from .launch import spawn

    kind, backend = _device_and_backend(args.provider, args.device)
    spec = BenchSpec(normal_tokens=args.tokens, low_latency_tokens=args.ll_tokens, hidden=args.hidden,
                     num_experts=args.experts, topk=args.topk, iters=args.iters, warmup=args.warmup,
                     backends=tuple(args.backends.split(",")), use_fp8=args.fp8, profile_path=args.profile)
    print(f"deepep-switch bench: {args.ranks} ranks ({backend} on {kind}), provider={args.provider}, {spec}")
    if kind == "cpu":
        print("note: CPU reference providers; these timings say nothing about DeepEP's speed")
    per_rank = spawn(bench_rank, args.ranks, args=(spec, kind == "cuda"), backend=backend,
                     env={"DEEPEP_SWITCH_PROVIDER": args.provider}, timeout_s=args.timeout)
    rows = summarise(per_rank)
    print(format_table(rows))
    if args.json:
        meta = {"ranks": args.ranks, "provider": args.provider, "device": kind, "spec": spec.__dict__,
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if kind == "cuda" else None}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepep-switch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log deepep-switch decisions (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a small MoE exchange on N ranks and check it against a dense MoE")
    demo.add_argument("--ranks", type=int, default=2)
    demo.add_argument("--provider", choices=["reference", "deep_ep"], default="reference",
                      help="reference: pure-PyTorch providers (CPU default); deep_ep: real DeepEP on GPUs")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    demo.add_argument("--backend", choices=["legacy", "elastic", "auto"], default=None,
                      help="override RTP_LLM_DEEPEP_BACKEND for this run")
    demo.add_argument("--tokens", type=_ints, default=None,
                      help="tokens per rank, comma separated (0 = an empty rank); default 8+5*rank")
    demo.add_argument("--hidden", type=int, default=256)
    demo.add_argument("--experts", type=int, default=8)
    demo.add_argument("--topk", type=int, default=2)
    demo.add_argument("--timeout", type=float, default=180.0)
    demo.set_defaults(func=cmd_demo)

    doctor = sub.add_parser("doctor", help="show settings, preflight checks and the single-process decision")
    doctor.add_argument("--internode", action="store_true")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="time raw DeepEP vs the routers on both backends")
    bench.add_argument("--ranks", type=int, default=2)
    bench.add_argument("--provider", choices=["reference", "deep_ep"], default="deep_ep")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    bench.add_argument("--tokens", type=_ints, default=(128, 4096), help="normal-mode tokens per rank")
    bench.add_argument("--ll-tokens", type=_ints, default=(128,), help="low-latency tokens per rank")
    bench.add_argument("--hidden", type=int, default=7168)
    bench.add_argument("--experts", type=int, default=64)
    bench.add_argument("--topk", type=int, default=8)
    bench.add_argument("--iters", type=int, default=30)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--backends", default="legacy,elastic")
    bench.add_argument("--fp8", action="store_true")
    bench.add_argument("--json", default=None, help="also write the results to this file")
    bench.add_argument("--profile", default=None, help="append torch.profiler tables (rank 0, <=128 tokens) here")
    bench.add_argument("--timeout", type=float, default=540.0)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
