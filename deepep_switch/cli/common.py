"""What every ``deepep-switch`` subcommand shares: its errors, the argument types (checked by argparse, before any
work) and the checks that find out, before spawning a rank, whether this machine can run a request."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

from ..config import DeepEPMode, DeepepWrapperConfig
from ..decision import BackendDecision, BackendUnavailableError, resolve_backend
from ..settings import BackendChoice, LoadedSettings, ProviderChoice, env_name, get_settings, load_settings

PROG = "deepep-switch"
EXIT_OK, EXIT_CANNOT_RUN, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_T = TypeVar("_T", int, float)


class CliError(Exception):
    """An error the CLI reports as one line; ``exit_code`` is what ``main`` returns for it."""

    exit_code = EXIT_CANNOT_RUN


class UsageError(CliError):
    """Bad arguments: nothing can run with them, on any machine (exit 2)."""

    exit_code = EXIT_USAGE


class CannotRunError(CliError):
    """The arguments are fine but this machine cannot run them (exit 1)."""

    exit_code = EXIT_CANNOT_RUN


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UsageError` so that ``main`` reports them like any other."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")



# ---------------------------------------------------------------------------------------------- argument types
def number(convert: Callable[[str], _T], minimum: _T, *, exclusive: bool = False) -> Callable[[str], _T]:
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


def int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, each >= ``minimum``; at least one."""
    one = number(int, minimum)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(v.strip()) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError("needs at least one comma-separated integer")
        return values

    return parse


def backend_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated ``RTP_LLM_DEEPEP_BACKEND`` values (legacy, elastic, auto)."""
    accepted = [c.value for c in BackendChoice]
    values = tuple(v.strip().lower() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in accepted]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"{unknown or text!r}: each backend must be one of {', '.join(accepted)}")
    return values


def writable_file(text: str) -> str:
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


def writable_dir(text: str) -> str:
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


def ab_side(name: str) -> Callable[[str], Any]:
    """An argparse type: one side of ``ab`` (see :func:`deepep_switch.ab.parse_side`)."""

    def parse(text: str) -> Any:
        from ..ab import parse_side

        try:
            return parse_side(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse



# ------------------------------------------------------------------------------------------ checks before work
def provider_from(given: Optional[str], default: ProviderChoice) -> ProviderChoice:
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


def device_and_backend(provider: ProviderChoice, device: Optional[str]) -> tuple[str, str]:
    """The device kind the ranks run on and their torch.distributed backend. deep_ep needs CUDA."""
    kind = device or ("cuda" if provider is ProviderChoice.DEEP_EP else "cpu")
    if provider is ProviderChoice.DEEP_EP and kind != "cuda":
        raise UsageError("--provider deep_ep runs on CUDA GPUs only; drop --device cpu or use --provider reference")
    return kind, ("nccl" if kind == "cuda" else "gloo")


def check_layers(configs: Sequence[DeepepWrapperConfig]) -> None:
    """The wrapper's own config validation, run on every config the ranks would build."""
    for config in configs:
        try:
            config.validate()
        except ValueError as exc:
            raise UsageError(f"--ranks/--hidden/--experts/--topk/--tokens do not make a valid layer: {exc}") from exc


def decide(loaded: LoadedSettings, internode: bool = False) -> BackendDecision:
    """The single-process backend decision (what each rank of this host will find), strict errors as one line."""
    try:
        return resolve_backend(settings=loaded, internode=internode)
    except BackendUnavailableError as exc:
        problems = f" [{'; '.join(loaded.problems)}]" if loaded.problems else ""
        raise CannotRunError(f"{exc}{problems}") from exc


def cannot_run(decision: BackendDecision, reference_hint: str, *, need_requested: bool) -> Optional[str]:
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


def check_backend_limits(decision: BackendDecision, configs: Sequence[DeepepWrapperConfig]) -> None:
    """What the resolved generation needs of these layers, asked of its registry entry: its router paths' limits
    (built over no buffer: hidden sizes, top-k, tokens per rank on real DeepEP) and, for the fallback (legacy),
    its sizing plan, which needs no process group (DeepEP's legacy configs exist only for some rank counts)."""
    import torch

    from ..backends import FALLBACK, PathContext, get_spec
    from ..deadline import Deadline
    from ..quant import quantizer_for

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


def check_can_run(provider: ProviderChoice, backend: Optional[str], kind: str, ranks: int,
                   configs: Sequence[DeepepWrapperConfig], settings: Optional[dict[str, Any]] = None
                   ) -> BackendDecision:
    """Everything a rank would find out about this machine and these layers, found here before spawning.

    Returns the decision for ``provider`` and ``backend`` (None: ``RTP_LLM_DEEPEP_BACKEND``) on this host, with
    ``settings`` (field -> value) over the environment.
    """
    check_layers(configs)
    overrides: dict[str, Any] = {**(settings or {}), "provider": provider}
    if backend:
        overrides["backend_raw"] = backend
    decision = decide(load_settings(**overrides))
    problem = cannot_run(decision, "--provider reference", need_requested=False)
    if problem:
        raise CannotRunError(problem)
    gpus = decision.preflight.gpu_count
    if kind == "cuda" and gpus < ranks:
        raise CannotRunError(f"--ranks {ranks} needs {ranks} CUDA GPUs (one per rank) but {gpus} "
                             f"{'is' if gpus == 1 else 'are'} visible here")
    check_backend_limits(decision, configs)
    return decision

