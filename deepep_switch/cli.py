"""The ``deepep-switch`` command: ``demo``, ``doctor``, ``bench`` and ``ab``.

This module is the user interface: it prints. The library modules only log.

Exit codes: 0 success; 1 cannot run (the requested provider or backend cannot run here, a rank failed, the demo's
results do not match); 2 usage error (bad arguments). Every error is one line on stderr,
``deepep-switch: error: ...``, never a traceback; ``--debug`` shows the traceback instead. Arguments are checked
before any work: nothing is spawned for a run that cannot succeed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

from .backends import registered
from .config import DeepEPMode, DeepepWrapperConfig
from .decision import BackendDecision, BackendUnavailableError, resolve_backend
from .launch import LaunchError
from .settings import BackendChoice, LoadedSettings, ProviderChoice, env_name, get_settings, load_settings

PROG = "deepep-switch"
EXIT_OK, EXIT_CANNOT_RUN, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_T = TypeVar("_T", int, float)

_DESCRIPTION = ("Switch MoE expert-parallel communication between DeepEP generations: legacy Buffer, 2.1's "
                "ElasticBuffer, 2.5's EPBuffer.")
_EPILOG = """exit codes: 0 ok; 1 cannot run here (provider or backend unavailable, a rank failed, demo mismatch);
2 usage error (bad arguments). Errors are one line on stderr; --debug shows the traceback instead."""


class CliError(Exception):
    """An error the CLI reports as one line; ``exit_code`` is what ``main`` returns for it."""

    exit_code = EXIT_CANNOT_RUN


class UsageError(CliError):
    """Bad arguments: nothing can run with them, on any machine (exit 2)."""

    exit_code = EXIT_USAGE


class CannotRunError(CliError):
    """The arguments are fine but this machine cannot run them (exit 1)."""

    exit_code = EXIT_CANNOT_RUN


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UsageError` so that ``main`` reports them like any other."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------- argument types
def _number(convert: Callable[[str], _T], minimum: _T, *, exclusive: bool = False) -> Callable[[str], _T]:
    """An argparse type: ``convert(text)``, which must be >= ``minimum`` (> with ``exclusive``)."""

    def parse(text: str) -> _T:
        try:
            value = convert(text)
        except ValueError:
            what = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < minimum or (exclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive else '>='} {minimum}, got {text}")
        return value

    return parse


def _int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, each >= ``minimum``; at least one."""
    one = _number(int, minimum)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(v.strip()) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError("needs at least one comma-separated integer")
        return values

    return parse


def _backend_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated ``RTP_LLM_DEEPEP_BACKEND`` values (legacy, elastic, auto)."""
    accepted = [c.value for c in BackendChoice]
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in accepted]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"{unknown or text!r}: each backend must be one of {', '.join(accepted)}")
    return values


def _writable_file(text: str) -> str:
    """An argparse type: a file path this process can create or append to, probed now (before any work) by
    opening it for append, or a temporary file beside it when it does not exist yet."""
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {parent} does not exist")
    try:
        if os.path.exists(path):
            with open(path, "a"):
                pass
        else:
            with tempfile.TemporaryFile(dir=parent):
                pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {exc.strerror or exc}") from None
    return text


def _writable_dir(text: str) -> str:
    """An argparse type: a directory to write results into: an existing writable one, or a new one (created when
    the results are written) in an existing writable directory."""
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    probe = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"cannot create {text}: directory {probe} does not exist")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write in {probe}: {exc.strerror or exc}") from None
    return text


def _ab_side(name: str) -> Callable[[str], Any]:
    """An argparse type: one side of ``ab`` (see :func:`deepep_switch.ab.parse_side`)."""

    def parse(text: str) -> Any:
        from .ab import parse_side

        try:
            return parse_side(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


# ------------------------------------------------------------------------------------------ checks before work
def _provider(given: Optional[str], default: ProviderChoice) -> ProviderChoice:
    """``--provider`` when given, else ``DEEPEP_SWITCH_PROVIDER`` when set, else ``default``."""
    if given:
        return ProviderChoice(given)
    loaded = get_settings()
    if "provider" not in loaded.settings.model_fields_set:
        return default
    name = env_name("provider")
    malformed = [p for p in loaded.knob_problems if p.startswith(f"{name}=")]
    if malformed:
        raise UsageError(f"{malformed[0].split('; using the default')[0]}; set {name} to one of "
                         f"{', '.join(c.value for c in ProviderChoice)}, or pass --provider")
    return loaded.settings.provider


def _device_and_backend(provider: ProviderChoice, device: Optional[str]) -> tuple[str, str]:
    """The device kind the ranks run on and their torch.distributed backend. deep_ep needs CUDA."""
    kind = device or ("cuda" if provider is ProviderChoice.DEEP_EP else "cpu")
    if provider is ProviderChoice.DEEP_EP and kind != "cuda":
        raise UsageError("--provider deep_ep runs on CUDA GPUs only; drop --device cpu or use --provider reference")
    return kind, ("nccl" if kind == "cuda" else "gloo")


def _check_layers(configs: Sequence[DeepepWrapperConfig]) -> None:
    """The wrapper's own config validation, run on every config the ranks would build."""
    for config in configs:
        try:
            config.validate()
        except ValueError as exc:
            raise UsageError(f"--ranks/--hidden/--experts/--topk/--tokens do not make a valid layer: {exc}") from exc


def _decide(loaded: LoadedSettings, internode: bool = False) -> BackendDecision:
    """The single-process backend decision (what each rank of this host will find), strict errors as one line."""
    try:
        return resolve_backend(settings=loaded, internode=internode)
    except BackendUnavailableError as exc:
        problems = f" [{'; '.join(loaded.problems)}]" if loaded.problems else ""
        raise CannotRunError(f"{exc}{problems}") from exc


def _cannot_run(decision: BackendDecision, reference_hint: str, *, need_requested: bool) -> Optional[str]:
    """Why the decision cannot run here and what to do, or None. ``need_requested``: a fallback from the
    requested backend (a failed elastic preflight check) counts too."""
    report, provider = decision.preflight, decision.settings.provider
    if not decision.runnable:
        text = f"the {provider.value} provider cannot run here: {report.summary(decision.resolved)}"
        if provider is ProviderChoice.DEEP_EP:
            text += f". Without GPUs or DeepEP, use {reference_hint} (the pure-PyTorch providers)"
        return text
    if need_requested and decision.resolved is not decision.requested:
        return (f"{decision.requested_mode.value} was requested but this host resolves "
                f"{decision.resolved.value}: {report.summary(decision.requested)}. Fix the failed checks, or set "
                f"{env_name('backend_raw')}=legacy")
    return None


def _check_backend_limits(decision: BackendDecision, configs: Sequence[DeepepWrapperConfig]) -> None:
    """What the resolved generation needs of these layers, asked of its registry entry: its router paths' limits
    (built over no buffer: hidden sizes, top-k, tokens per rank on real DeepEP) and, for the fallback (legacy),
    its sizing plan, which needs no process group (DeepEP's legacy configs exist only for some rank counts)."""
    import torch

    from .backends import FALLBACK, PathContext, get_spec
    from .deadline import Deadline
    from .quant import quantizer_for

    spec = get_spec(decision.resolved)
    provider = decision.settings.provider
    real_deep_ep = provider is ProviderChoice.DEEP_EP
    for config in configs:
        low_latency = config.mode is DeepEPMode.LOW_LATENCY
        ctx = PathContext(
            buffer=None, real_deep_ep=real_deep_ep, num_experts=config.expert_num,
            num_local_experts=config.expert_num // config.ep_size, num_ranks=config.ep_size, num_topk=config.moe_k,
            hidden=config.hidden_size, capacity=config.ll_num_max_token_per_rank if low_latency else None,
            expert_alignment=1, quant=config.quant, quantize=quantizer_for(config.quant, torch.device("cpu"))[1],
            num_sms=decision.settings.num_sms, device=torch.device("cpu"), group=None,
            deadline=Deadline(decision.settings.timeout_s, 0, 1), settings=decision.settings)
        try:
            (spec.low_latency_path if low_latency else spec.normal_path).build(ctx)
            if spec.backend is FALLBACK:
                spec.plan(spec.buffer_class(provider), None, config, decision.settings)
        except ValueError as exc:
            raise UsageError(f"{decision.resolved.value} on {provider.value} cannot run this layer: {exc}") from exc


def _check_can_run(provider: ProviderChoice, backend: Optional[str], kind: str, ranks: int,
                   configs: Sequence[DeepepWrapperConfig], settings: Optional[dict[str, Any]] = None
                   ) -> BackendDecision:
    """Everything a rank would find out about this machine and these layers, found here before spawning.

    Returns the decision for ``provider`` and ``backend`` (None: ``RTP_LLM_DEEPEP_BACKEND``) on this host, with
    ``settings`` (field -> value) over the environment.
    """
    _check_layers(configs)
    overrides: dict[str, Any] = {**(settings or {}), "provider": provider}
    if backend:
        overrides["backend_raw"] = backend
    decision = _decide(load_settings(**overrides))
    problem = _cannot_run(decision, "--provider reference", need_requested=False)
    if problem:
        raise CannotRunError(problem)
    gpus = decision.preflight.gpu_count
    if kind == "cuda" and gpus < ranks:
        raise CannotRunError(f"--ranks {ranks} needs {ranks} CUDA GPUs (one per rank) but {gpus} "
                             f"{'is' if gpus == 1 else 'are'} visible here")
    _check_backend_limits(decision, configs)
    return decision


# ------------------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every rank matches the dense MoE, 1 otherwise."""
    from .demo import DEFAULT_HIDDEN, DemoSpec, default_tokens, run_rank
    from .launch import spawn

    provider = _provider(args.provider, ProviderChoice.REFERENCE)
    kind, dist_backend = _device_and_backend(provider, args.device)
    tokens = args.tokens or default_tokens(args.ranks)
    if len(tokens) != args.ranks:
        raise UsageError(f"--tokens has {len(tokens)} value{'s' if len(tokens) > 1 else ''} but --ranks is "
                         f"{args.ranks}: give one per rank")
    if not any(tokens):
        raise UsageError("--tokens: at least one rank must send tokens")
    spec = DemoSpec(tokens_per_rank=tuple(tokens), hidden=args.hidden or DEFAULT_HIDDEN[provider],
                    num_experts=args.experts, topk=args.topk)
    configs = [spec.layer_config(0, args.ranks, low_latency) for low_latency in (False, True)]
    _check_can_run(provider, args.backend, kind, args.ranks, configs)

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


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the settings, preflight checks and decision; 1 when the requested backend cannot run here."""
    loaded = get_settings()
    decision = _decide(loaded, internode=args.internode)
    if args.json:
        # warnings=False: decision.py stores the agreed knobs as ints in SwitchSettings' bool fields (they serialise
        # as 1/0 either way); pydantic would print one serializer warning per knob on stderr.
        print(decision.model_dump_json(indent=2, warnings=False))
    else:
        print("settings:", loaded.settings.model_dump_json())
        for problem in loaded.problems:
            print("  problem:", problem)
        report = decision.preflight
        print(f"preflight (provider={report.provider.value}): deep_ep={report.deep_ep_version} "
              f"nccl runtime={report.nccl_runtime_version} build={report.nccl_build_version} gpus={report.gpu_count}")
        for check in report.checks:
            gates = ",".join(b.value for b in check.gates) or "advisory"
            print(f"  [{'pass' if check.passed else 'FAIL'}] {check.name:18} ({gates}) {check.detail}")
        print("generations this process can run:")
        for spec in registered():
            print("  " + report.summary(spec.backend))
        print("decision:", decision.describe())
    problem = _cannot_run(decision, f"{env_name('provider')}=reference", need_requested=True)
    if problem:
        raise CannotRunError(problem)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Time raw DeepEP against the routers; print the table and optionally write it as JSON."""
    import torch

    from .bench import BenchSpec, bench_config, bench_rank, format_table, summarise
    from .launch import spawn

    provider = _provider(args.provider, ProviderChoice.DEEP_EP)
    kind, dist_backend = _device_and_backend(provider, args.device)
    spec = BenchSpec(normal_tokens=args.tokens, low_latency_tokens=args.ll_tokens, hidden=args.hidden,
                     num_experts=args.experts, topk=args.topk, iters=args.iters, warmup=args.warmup,
                     backends=args.backends, use_fp8=args.fp8, profile_path=args.profile)
    configs = [bench_config(0, args.ranks, spec, tokens, low_latency)
               for low_latency, token_list in ((False, spec.normal_tokens), (True, spec.low_latency_tokens))
               for tokens in token_list]
    for backend in spec.backends:
        _check_can_run(provider, backend, kind, args.ranks, configs)

    print(f"deepep-switch bench: {args.ranks} ranks ({dist_backend} on {kind}), provider={provider.value}, {spec}")
    if kind == "cpu":
        print("note: CPU reference providers; these timings say nothing about DeepEP's speed")
    per_rank = spawn(bench_rank, args.ranks, args=(spec, kind == "cuda"), backend=dist_backend,
                     env={"DEEPEP_SWITCH_PROVIDER": provider.value}, timeout_s=args.timeout)
    rows = summarise(per_rank)
    print(format_table(rows))
    if args.json:
        meta = {"ranks": args.ranks, "provider": provider.value, "device": kind, "spec": spec.__dict__,
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if kind == "cuda" else None}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return EXIT_OK


class _ProgressBar:
    """Progress on stderr, fed by rank 0 through a queue of ``(done, total, what)``: a bar redrawn in place on a
    terminal, one line per step otherwise. Plain text, no dependency."""

    WIDTH = 30

    def __init__(self, queue: Any, total: int, label: str) -> None:
        import threading

        self.queue, self.total, self.label = queue, total, label
        self.tty = sys.stderr.isatty()
        self.thread = threading.Thread(target=self._run, name="deepep-switch-progress", daemon=True)

    def __enter__(self) -> "_ProgressBar":
        self._draw(0, "starting the ranks")
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            done, total, what = item
            self.total = total
            self._draw(done, what)

    def _draw(self, done: int, what: str) -> None:
        filled = self.WIDTH * done // max(self.total, 1)
        line = f"{self.label} [{'#' * filled}{'-' * (self.WIDTH - filled)}] {done:3d}/{self.total} {what}"
        sys.stderr.write(f"\r{line:<100}" if self.tty else line + "\n")
        sys.stderr.flush()


def cmd_ab(args: argparse.Namespace) -> int:
    """Run two settings side by side on identical inputs; print the report, write ab.json and plots with --out;
    1 when the sides' outputs disagree (or a side cannot run its request here)."""
    import multiprocessing
    import time

    import torch

    from .ab import (DEFAULT_SIDES, DEFAULTS, MODES, REFERENCE_NOTE, TOLERANCE, ABSpec, ab_rank, format_report,
                     summarise, write_plots)
    from .launch import spawn

    provider = _provider(args.provider, ProviderChoice.DEEP_EP)
    kind, dist_backend = _device_and_backend(provider, args.device)
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
        decision = _check_can_run(provider, None, kind, args.ranks, configs, dict(side.overrides))
        problem = _cannot_run(decision, "--provider reference", need_requested=True)
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
    with _ProgressBar(queue, spec.steps, "ab"):
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


# ------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``deepep-switch`` argument parser (its errors raise :class:`UsageError`)."""
    positive, non_negative = _number(int, 1), _number(int, 0)
    seconds = _number(float, 0.0, exclusive=True)
    providers = [c.value for c in ProviderChoice]
    parser = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log deepep-switch decisions (INFO)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback instead of one line; log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a small MoE exchange on N ranks and check it against a dense MoE")
    demo.add_argument("--ranks", type=positive, default=2)
    demo.add_argument("--provider", choices=providers, default=None,
                      help="reference: pure-PyTorch providers (CPU); deep_ep: real DeepEP on GPUs. "
                           "Default: DEEPEP_SWITCH_PROVIDER, else reference")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    demo.add_argument("--backend", choices=[c.value for c in BackendChoice], default=None,
                      help="override RTP_LLM_DEEPEP_BACKEND for this run")
    demo.add_argument("--tokens", type=_int_list(0), default=None,
                      help="tokens per rank, comma separated (0 = an empty rank); default 8+5*rank")
    demo.add_argument("--hidden", type=positive, default=None,
                      help="a multiple of 128 (256 for elastic on DeepEP); default 256, 2048 with deep_ep")
    demo.add_argument("--experts", type=positive, default=8, help="a multiple of --ranks")
    demo.add_argument("--topk", type=positive, default=2, help="at most --experts")
    demo.add_argument("--timeout", type=seconds, default=180.0)
    demo.set_defaults(func=cmd_demo)

    doctor = sub.add_parser("doctor", help="show settings, preflight checks and the single-process decision; "
                                           "exit 1 when the requested backend cannot run here")
    doctor.add_argument("--internode", action="store_true")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="time raw DeepEP vs the routers on both backends")
    bench.add_argument("--ranks", type=positive, default=2)
    bench.add_argument("--provider", choices=providers, default=None,
                       help="default: DEEPEP_SWITCH_PROVIDER, else deep_ep")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    bench.add_argument("--tokens", type=_int_list(1), default=(128, 4096), help="normal-mode tokens per rank")
    bench.add_argument("--ll-tokens", type=_int_list(1), default=(128,), help="low-latency tokens per rank")
    bench.add_argument("--hidden", type=positive, default=7168)
    bench.add_argument("--experts", type=positive, default=64)
    bench.add_argument("--topk", type=positive, default=8)
    bench.add_argument("--iters", type=positive, default=30)
    bench.add_argument("--warmup", type=non_negative, default=5)
    bench.add_argument("--backends", type=_backend_list, default=("legacy", "elastic"))
    bench.add_argument("--fp8", action="store_true")
    bench.add_argument("--json", type=_writable_file, default=None, help="also write the results to this file")
    bench.add_argument("--profile", type=_writable_file, default=None,
                       help="append torch.profiler tables (rank 0, <=128 tokens) here")
    bench.add_argument("--timeout", type=seconds, default=540.0)
    bench.set_defaults(func=cmd_bench)

    ab = sub.add_parser("ab", help="two settings (default: legacy vs elastic) side by side on identical inputs: "
                                   "agreement, latency per token count, memory, decisions")
    ab.add_argument("--a", type=_ab_side("a"), default=None, metavar="SETTINGS",
                    help="side a: a backend (legacy, elastic, auto) or NAME=VALUE[,NAME=VALUE...] with RTP_LLM_DEEPEP_* "
                         "names, e.g. RTP_LLM_DEEPEP_BACKEND=elastic,RTP_LLM_DEEPEP_NUM_SMS=24. Default: legacy")
    ab.add_argument("--b", type=_ab_side("b"), default=None, metavar="SETTINGS", help="side b; default: elastic")
    ab.add_argument("--ranks", type=positive, default=2)
    ab.add_argument("--provider", choices=providers, default=None,
                    help="default: DEEPEP_SWITCH_PROVIDER, else deep_ep (reference: CPU, reference numbers)")
    ab.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ab.add_argument("--tokens", type=_int_list(1), default=None,
                    help="normal-mode tokens per rank; default 128,512,2048,4096 (reference: 16,64,256)")
    ab.add_argument("--ll-tokens", type=_int_list(1), default=None,
                    help="low-latency tokens per rank; default 16,64,128 (reference: 8,32,64)")
    ab.add_argument("--hidden", type=positive, default=None, help="default 7168 (reference: 512)")
    ab.add_argument("--experts", type=positive, default=None, help="default 64 (reference: 16)")
    ab.add_argument("--topk", type=positive, default=None, help="default 8 (reference: 4)")
    ab.add_argument("--iters", type=positive, default=None, help="timed round trips per point; default 30 (reference: 15)")
    ab.add_argument("--warmup", type=non_negative, default=None, help="default 5 (reference: 2)")
    ab.add_argument("--fp8", action="store_true", help="FP8 dispatch on both sides")
    ab.add_argument("--seed", type=non_negative, default=0)
    ab.add_argument("--out", type=_writable_dir, default=None, metavar="DIR",
                    help="write DIR/ab.json and DIR/latency_<mode>.png (plots need matplotlib)")
    ab.add_argument("--timeout", type=seconds, default=540.0)
    ab.set_defaults(func=cmd_ab)
    return parser


# ------------------------------------------------------------------------------------------------- errors
_RANK_FAILED = re.compile(r"^rank (\d+) failed:$", re.M)


def _launch_failure(text: str) -> str:
    """One line from a :class:`LaunchError`'s text: each failed rank with its exception's last line (ranks that
    failed the same way are named together); a timeout or a dead rank as launch words it."""
    parts = _RANK_FAILED.split(text)
    if len(parts) < 3:
        return text
    by_error: dict[str, list[str]] = {}
    for rank, body in zip(parts[1::2], parts[2::2]):
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        by_error.setdefault(lines[-1] if lines else "no traceback", []).append(rank)
    return "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(ranks)} failed: {error}"
                     for error, ranks in by_error.items()) + " (--debug shows the ranks' tracebacks)"


def _report(exc: BaseException, debug: bool) -> int:
    """The one error-reporting path: a traceback with ``--debug``, else one line. Returns the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        code, text = EXIT_INTERRUPTED, "interrupted"
    elif isinstance(exc, CliError):
        code, text = exc.exit_code, str(exc)
    elif isinstance(exc, LaunchError):
        code, text = EXIT_CANNOT_RUN, _launch_failure(str(exc))
    elif isinstance(exc, BackendUnavailableError):
        code, text = EXIT_CANNOT_RUN, str(exc)
    else:
        code, text = EXIT_CANNOT_RUN, f"{type(exc).__name__}: {exc} (unexpected; --debug shows the traceback)"
    sys.stdout.flush()
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    else:
        print(f"{PROG}: error: {' '.join(text.split())}", file=sys.stderr)
    return code


class _LibraryRecordsHidden(logging.Filter):
    """Drops the library's log records in the CLI process: what matters reaches the user through the CLI itself
    (doctor's report, the one error line, which carries the settings problems); the ranks log for themselves.
    ``-v`` / ``--debug`` show them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("deepep_switch", "routers"))


def _configure_logging(verbose: bool, debug: bool) -> None:
    """WARNING to stderr (INFO with -v, DEBUG with --debug); the library's own records only with -v/--debug."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not (verbose or debug):
        for handler in logging.getLogger().handlers:
            handler.addFilter(_LibraryRecordsHidden())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``deepep-switch``; returns the exit code (0 ok, 1 cannot run, 2 usage error, 130 interrupted)."""
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        _configure_logging(args.verbose, debug)
        return int(args.func(args))
    except (Exception, KeyboardInterrupt) as exc:
        return _report(exc, debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
