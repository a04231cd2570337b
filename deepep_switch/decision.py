"""The backend decision: settings + preflight on each rank, then one all-gather so every rank resolves the same.

Each rank contributes a :class:`Vote` (a few dozen integers: one preflight failure mask per registered
generation). The resolution is a pure function of the gathered table (:func:`agree`), so all ranks compute the
same answer without a second round:

* ranks disagree on ``RTP_LLM_DEEPEP_BACKEND``              -> every rank legacy (strict: every rank raises);
* a generation (or auto) requested, some rank fails preflight -> every rank legacy (strict + explicit: raise);
  ``auto`` tries the registered generations by ``auto_priority`` and takes the first every rank can run;
* ranks disagree on a knob that shapes the buffers         -> every rank uses that knob's default (strict: raise);
* ranks disagree on the provider (deep_ep vs reference)    -> every rank raises: no safe common choice exists;
* ranks register different generations                     -> every rank raises;
* strict mode and an unknown ``RTP_LLM_DEEPEP_BACKEND``     -> every rank raises;
* ranks would build different buffers (the wrapper config or DeepEP's environment differ, see
  :mod:`deepep_switch.blueprint`)                          -> every rank raises the same ``ValueError``.

The fallback is the registry's (legacy). The log names the disagreeing ranks. A rank that never arrives makes
the others raise ConsensusTimeout (a CommunicationTimeout) naming it, after ``RTP_LLM_DEEPEP_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional

import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from .backend import Backend
from .backends import registry
from .blueprint import Blueprint, mismatch
from .consensus import all_gather_ints, group_size_and_rank
from .preflight import PreflightReport, Probe, check_names, run_preflight
from .settings import (BACKEND_ENV, BackendChoice, LoadedSettings, ProviderChoice, SwitchSettings, backend_choices,
                       env_name, get_settings)

logger = logging.getLogger("deepep_switch.decision")

# Knobs every rank must hold equal, because they shape buffers or kernel launches, or (validation) decide
# whether a rank raises or drops ids before a collective call.
AGREED_KNOBS = (
    "num_sms", "max_tokens_per_rank", "elastic_allow_hybrid", "elastic_deterministic",
    "elastic_prefer_overlap", "elastic_allow_multiple_reduction", "validation", "elastic_ll_layout",
)
_PROVIDERS = list(ProviderChoice)
SWITCH_SOURCE = "DeepEPWrapper.switch()"
"""What decisions of a live switch name as the source of their request (``BackendDecision.request_env``)."""


def knob_to_int(value: Any) -> int:
    """An agreed knob's value as the integer it travels as: an enum member's index, else ``int(value)``."""
    if isinstance(value, Enum):
        return list(type(value)).index(value)
    return int(value)


def knob_from_int(knob: str, value: int) -> Any:
    """Inverse of :func:`knob_to_int` for the field ``knob`` of :class:`SwitchSettings`."""
    annotation = SwitchSettings.model_fields[knob].annotation
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return list(annotation)[value]
    return bool(value) if annotation is bool else value


def _knob_label(knob: str, value: int) -> str:
    decoded = knob_from_int(knob, value)
    return decoded.value if isinstance(decoded, Enum) else str(decoded)


class BackendUnavailableError(RuntimeError):
    """Raised on every rank, together, when strict mode forbids the fallback (or no common choice exists)."""


@dataclass(frozen=True)
class Vote:
    """What one rank asks for and can run, as integers for the all-gather.

    Attributes:
        provider: index into ProviderChoice.
        mode: index into ``backend_choices()`` (the registered generations, then auto).
        strict: RTP_LLM_DEEPEP_STRICT.
        unknown_backend: 1 when this rank's RTP_LLM_DEEPEP_BACKEND was not recognised (it then asks for legacy).
        knob_problems: how many malformed RTP_LLM_DEEPEP_* knobs this rank has.
        registry: the registry's digest (ranks must register the same generations in the same order).
        num_sms ... elastic_ll_layout: the AGREED_KNOBS (enums as their member index, see :func:`knob_to_int`).
        fail_masks: per registered generation (registry order, ``MAX_BACKENDS`` slots), the failed preflight
            checks gating it, bit ``check_names().index(name)``.
        blueprint: what this rank is about to build (:class:`~deepep_switch.blueprint.Blueprint` values; all
            "absent" when the caller gave no wrapper config).
    """

    provider: int
    mode: int
    strict: int
    unknown_backend: int
    knob_problems: int
    registry: int
    num_sms: int
    max_tokens_per_rank: int
    elastic_allow_hybrid: int
    elastic_deterministic: int
    elastic_prefer_overlap: int
    elastic_allow_multiple_reduction: int
    validation: int
    elastic_ll_layout: int
    fail_masks: tuple[int, ...] = (0,) * registry.MAX_BACKENDS
    blueprint: tuple[int, ...] = field(default_factory=lambda: Blueprint.absent().values)

    @classmethod
    def local(cls, loaded: LoadedSettings, report: PreflightReport, low_latency: Optional[bool] = None,
              blueprint: Optional[Blueprint] = None) -> "Vote":
        """This rank's vote for a buffer of one mode (``low_latency`` True/False; None: RTP_LLM_DEEPEP_BACKEND)."""
        s = loaded.settings
        choice, problem = s.backend_for(low_latency)
        masks = [report.failure_mask(spec.backend) for spec in registry.registered()]
        return cls(
            provider=_PROVIDERS.index(s.provider), mode=backend_choices().index(choice), strict=int(s.strict),
            unknown_backend=int(problem is not None), knob_problems=len(loaded.knob_problems),
            registry=registry.digest(), **{k: knob_to_int(getattr(s, k)) for k in AGREED_KNOBS},
            fail_masks=tuple(masks + [0] * (registry.MAX_BACKENDS - len(masks))),
            blueprint=(blueprint or Blueprint.absent()).values,
        )

    def fail_mask(self, backend: Backend) -> int:
        """The failed checks gating ``backend`` on this rank."""
        return self.fail_masks[registry.names().index(backend.value)]

    def to_ints(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self) if f.name not in _TUPLES] + list(self.fail_masks) \
            + list(self.blueprint)

    @classmethod
    def from_ints(cls, values: list[int]) -> "Vote":
        scalars = len(fields(cls)) - len(_TUPLES)
        masks_end = scalars + registry.MAX_BACKENDS
        return cls(*values[:scalars], fail_masks=tuple(values[scalars:masks_end]),
                   blueprint=tuple(values[masks_end:]))


_TUPLES = ("fail_masks", "blueprint")  # Vote's variable parts, after its scalars in to_ints()


class Agreement(BaseModel):
    """The outcome of :func:`agree`: identical on every rank."""

    resolved: Backend
    runnable: bool = Field(description="the resolved backend passed preflight on every rank")
    reasons: list[str]
    knobs: dict[str, Any] = Field(description="every agreed knob's effective value, typed as in SwitchSettings")
    strict: bool
    disagreements: dict[str, dict[str, list[int]]] = Field(
        default_factory=dict, description="setting -> value -> ranks holding it, for every disagreement")
    error: Optional[str] = None
    mismatch: Optional[str] = Field(
        default=None, description="why the ranks would build different buffers (raised as ValueError), or None")


class ConsensusOutcome(BaseModel):
    """The gathered table and what it showed."""

    world_size: int
    rank: int
    votes: list[dict[str, int]]
    agreed: bool = Field(description="True when every rank asked for the same backend and knobs")
    disagreements: dict[str, dict[str, list[int]]] = Field(default_factory=dict)
    blueprint: dict[str, str] = Field(
        default_factory=dict, description="what every rank agreed to build: the wrapper config's shared fields and "
                                          "DeepEP's environment (empty without a wrapper config)")


class BackendDecision(BaseModel):
    """What this process will run, and why. Identical on every rank of the group except ``preflight``."""

    model_config = ConfigDict(frozen=True)

    requested: Backend = Field(description="the generation asked for; for auto, the best one auto tries")
    requested_mode: BackendChoice = Field(description="the parsed request (a generation, or auto)")
    request_env: str = Field(default=BACKEND_ENV, description="the variable the request came from (a per-mode "
                                                                "override, or RTP_LLM_DEEPEP_BACKEND)")
    resolved: Backend
    runnable: bool = Field(description="the resolved backend passed preflight on every rank")
    reasons: list[str]
    strict: bool
    settings: SwitchSettings = Field(description="effective settings, with the agreed knob values")
    preflight: PreflightReport
    consensus: Optional[ConsensusOutcome] = None
    buffer_bytes: dict[str, int] = Field(default_factory=dict, description="filled by the wrapper")
    fallback: Optional[str] = Field(default=None, description="why the wrapper fell back after construction")

    def describe(self) -> str:
        """One line for logs and the CLI."""
        source = "" if self.request_env == BACKEND_ENV else f" (from {self.request_env})"
        text = (f"requested={self.requested_mode.value}{source} resolved={self.resolved.value} "
                f"provider={self.settings.provider.value} strict={self.strict}")
        if self.buffer_bytes:
            text += " buffer_bytes=" + ",".join(f"{k}:{v}" for k, v in self.buffer_bytes.items())
        return text + " | " + "; ".join(self.reasons)


def _ranks_by_value(values: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for rank, value in enumerate(values):
        out.setdefault(value, []).append(rank)
    return out


def _failed_checks(mask: int) -> list[str]:
    return [name for bit, name in enumerate(check_names()) if mask >> bit & 1]


def _unable(table: list[Vote], backend: Backend) -> dict[int, list[str]]:
    """Rank -> failed checks, for the ranks whose preflight rules ``backend`` out."""
    return {r: _failed_checks(v.fail_mask(backend)) for r, v in enumerate(table) if v.fail_mask(backend)}


def auto_candidates() -> list[Backend]:
    """What ``auto`` tries, best first: every registered generation but the fallback, by ``auto_priority``."""
    specs = [s for s in registry.registered() if s.backend is not registry.FALLBACK and s.auto_priority > 0]
    return [s.backend for s in sorted(specs, key=lambda s: -s.auto_priority)]


def agree(table: list[Vote], request_env: str = BACKEND_ENV) -> Agreement:
    """Resolve the backend from every rank's vote. Pure: same table, same answer, on every rank.

    ``request_env`` names the variable the votes' requests came from (a per-mode override or
    RTP_LLM_DEEPEP_BACKEND), for the reasons and errors."""
    strict = any(v.strict for v in table)
    build_mismatch = mismatch([Blueprint(v.blueprint) for v in table])
    reasons: list[str] = []
    errors: list[str] = []
    disagreements: dict[str, dict[str, list[int]]] = {}
    fallback = registry.FALLBACK

    registries = _ranks_by_value([v.registry for v in table])
    if len(registries) > 1:
        errors.append(f"ranks register different deepep-switch generations (registry digests by rank: "
                      f"{ {str(d): r for d, r in registries.items()} }); run the same code on every rank")
        return Agreement(resolved=fallback, runnable=False, reasons=errors, knobs={}, strict=strict,
                         error="deepep-switch cannot pick a backend: " + errors[0], mismatch=build_mismatch)
    choices = backend_choices()

    providers = _ranks_by_value([v.provider for v in table])
    if len(providers) > 1:
        disagreements["provider"] = {_PROVIDERS[p].value: r for p, r in providers.items()}
        errors.append(f"ranks disagree on {env_name('provider')}: {disagreements['provider']}; "
                      "real DeepEP and the reference providers cannot talk to each other")

    bad_settings = [r for r, v in enumerate(table) if v.knob_problems]
    if strict and bad_settings:
        errors.append(f"malformed RTP_LLM_DEEPEP_* settings on ranks {bad_settings} (see their warnings)")
    unknown = [r for r, v in enumerate(table) if v.unknown_backend]
    if strict and unknown:
        errors.append(f"{request_env} is not a known backend on ranks {unknown} (see their warnings; "
                      f"accepted: {', '.join(c.value for c in choices)})")

    knobs: dict[str, Any] = {}
    for knob in AGREED_KNOBS:
        by_value = _ranks_by_value([getattr(v, knob) for v in table])
        if len(by_value) == 1:
            knobs[knob] = knob_from_int(knob, next(iter(by_value)))
            continue
        default = SwitchSettings.model_fields[knob].default
        knobs[knob] = default
        disagreements[knob] = {_knob_label(knob, value): r for value, r in by_value.items()}
        shown = default.value if isinstance(default, Enum) else knob_to_int(default)
        message = f"ranks disagree on {env_name(knob)} {disagreements[knob]}: every rank uses the default {shown}"
        reasons.append(message)
        if strict:
            errors.append(message)

    modes = _ranks_by_value([v.mode for v in table])
    resolved = fallback
    if len(modes) > 1:
        disagreements["backend"] = {choices[m].value: r for m, r in modes.items()}
        message = (f"ranks disagree on {request_env} {disagreements['backend']}: "
                   f"every rank uses {fallback.value}")
        reasons.append(message)
        if strict:
            errors.append(message)
    else:
        mode = choices[next(iter(modes))]
        wanted = auto_candidates() if mode is BackendChoice.AUTO else [Backend(mode.value)]
        if wanted == [fallback]:
            reasons.append(f"{request_env} is {fallback.value} (or unset)")
        elif not wanted:
            reasons.append(f"auto requested but no generation other than {fallback.value} is registered")
        for candidate in wanted:
            if candidate is fallback:
                break
            unable = _unable(table, candidate)
            if not unable:
                resolved = candidate
                reasons.append(f"{mode.value} requested and {candidate.value} preflight passed on all "
                               f"{len(table)} ranks")
                break
            last = candidate is wanted[-1]
            message = (f"{mode.value} requested but {candidate.value} is unavailable on ranks {sorted(unable)} "
                       f"(failed checks: {unable})" + (f": every rank uses {fallback.value}" if last else ""))
            reasons.append(message)
            if strict and mode is not BackendChoice.AUTO:
                errors.append(message)

    runnable = True
    unable_resolved = _unable(table, resolved)
    if unable_resolved:
        runnable = False
        reasons.append(f"{resolved.value} is not runnable either on ranks {sorted(unable_resolved)} "
                       f"(failed checks: {unable_resolved})")

    error = None
    if errors:
        error = "deepep-switch cannot pick a backend (strict mode)" if strict else "deepep-switch cannot pick a backend"
        error += ": " + " | ".join(errors)
    return Agreement(resolved=resolved, runnable=runnable, reasons=reasons, knobs=knobs, strict=strict,
                     disagreements=disagreements, error=error, mismatch=build_mismatch)


def resolve_backend(group: Optional[dist.ProcessGroup] = None, *, settings: Optional[LoadedSettings] = None,
                    preflight: Optional[PreflightReport] = None, probe: Optional[Probe] = None,
                    internode: bool = False, low_latency: Optional[bool] = None,
                    blueprint: Optional[Blueprint] = None, request: Optional[str] = None) -> BackendDecision:
    """Decide which DeepEP generation this process runs, agreed with every rank of ``group``.

    Args:
        group: the EP process group. None = the default group when torch.distributed is initialized, else
            a single-process decision with no collective.
        settings: settings to use instead of the process-wide ones (tests, embedding).
        preflight: a preflight report to use instead of probing this host (tests).
        probe: how to probe the host when ``preflight`` is None.
        internode: whether the EP group spans nodes (affects the GIN check).
        low_latency: decide for a low-latency (True) or normal (False) buffer, honouring
            ``RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY`` / ``RTP_LLM_DEEPEP_BACKEND_NORMAL``; None: RTP_LLM_DEEPEP_BACKEND.
        blueprint: what this rank is about to build (the wrapper passes its config and DeepEP's environment);
            the ranks compare it in the same all-gather.
        request: a backend asked for in code (a live switch, :data:`SWITCH_SOURCE`), parsed exactly as
            ``RTP_LLM_DEEPEP_BACKEND`` and replacing the environment's request (per-mode overrides included);
            the fallback, strict and agreement rules are the same.

    Returns:
        The decision. Raises ``ValueError`` on every rank together, naming the fields, values and ranks, when
        the blueprints differ; :class:`BackendUnavailableError` on every rank together when strict mode forbids
        the fallback or the ranks' providers differ; ``ConsensusTimeout`` naming the missing ranks if a rank
        never joins within the deadline.
    """
    loaded = settings or get_settings()
    if request is not None:
        loaded = loaded.requesting(request)
    report = preflight or run_preflight(loaded.settings, probe, internode=internode)
    vote = Vote.local(loaded, report, low_latency, blueprint)
    request_env = SWITCH_SOURCE if request is not None else loaded.settings.backend_source(low_latency)[0]
    choice, problem = loaded.settings.backend_for(low_latency)
    if problem is not None and request is not None:
        problem = problem.replace(BACKEND_ENV, SWITCH_SOURCE, 1)
    world, rank = group_size_and_rank(group)
    rows = all_gather_ints(vote.to_ints(), group, loaded.settings.consensus_deadline_s, what="backend decision")
    table = [Vote.from_ints(row) for row in rows]
    agreement = agree(table, request_env)

    if agreement.mismatch:
        logger.error("deepep-switch rank %d/%d: %s", rank, world, agreement.mismatch)
        raise ValueError(agreement.mismatch)
    for setting, by_value in agreement.disagreements.items():
        name = request_env if setting == "backend" else env_name(setting)
        logger.warning("deepep-switch rank %d/%d: ranks disagree on %s: %s", rank, world, name, by_value)
    if agreement.error:
        logger.error("deepep-switch rank %d/%d: %s", rank, world, agreement.error)
        raise BackendUnavailableError(agreement.error)

    consensus = None
    if world > 1:
        consensus = ConsensusOutcome(
            world_size=world, rank=rank, votes=[_vote_row(v) for v in table],
            agreed=not agreement.disagreements, disagreements=agreement.disagreements,
            blueprint={} if Blueprint(vote.blueprint).is_absent else Blueprint(vote.blueprint).describe())
    decision = BackendDecision(
        requested=_requested(choice), requested_mode=choice, request_env=request_env,
        resolved=agreement.resolved, runnable=agreement.runnable,
        reasons=([problem] if problem else []) + agreement.reasons,
        strict=agreement.strict, settings=_with_knobs(loaded.settings, agreement.knobs),
        preflight=report, consensus=consensus,
    )
    log = logger.info if rank == 0 or agreement.resolved is not decision.requested else logger.debug
    log("deepep-switch rank %d/%d: %s", rank, world, decision.describe())
    return decision


def _requested(mode: BackendChoice) -> Backend:
    if mode is BackendChoice.AUTO:
        return next(iter(auto_candidates()), registry.FALLBACK)
    return Backend(mode.value)


def _vote_row(vote: Vote) -> dict[str, int]:
    """A vote for the decision record: scalar fields plus one ``<name>_fail_mask`` per registered generation."""
    row = {f.name: getattr(vote, f.name) for f in fields(Vote) if f.name not in _TUPLES}
    row.update({f"{name}_fail_mask": vote.fail_masks[i] for i, name in enumerate(registry.names())})
    return row


def _with_knobs(settings: SwitchSettings, knobs: dict[str, int]) -> SwitchSettings:
    """The settings with the agreed knob values, each in its field's own type (the vote carries ints)."""
    return settings.model_copy(update={k: type(getattr(settings, k))(v) for k, v in knobs.items()})
