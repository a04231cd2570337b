"""The backend decision: settings + preflight on each rank, then one all-gather so every rank resolves the same.

Each rank contributes a :class:`Vote` (a dozen integers). The resolution is a pure function of the gathered
table (:func:`agree`), so all ranks compute the same answer without a second round:

* ranks disagree on ``RTP_LLM_DEEPEP_BACKEND``            -> every rank legacy (strict: every rank raises);
* elastic/auto requested but some rank fails preflight   -> every rank legacy (strict + elastic: raise);
* ranks disagree on a knob that shapes the buffers       -> every rank uses that knob's default (strict: raise);
* ranks disagree on the provider (deep_ep vs reference)  -> every rank raises: no safe common choice exists.

The log names the disagreeing ranks. A rank that never arrives makes the others raise ConsensusTimeout.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass, fields
from typing import Optional

import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from .backend import Backend
from .consensus import all_gather_ints, group_size_and_rank
from .preflight import CHECK_NAMES, PreflightReport, Probe, run_preflight
from .settings import BackendChoice, LoadedSettings, ProviderChoice, SwitchSettings, env_name, get_settings

logger = logging.getLogger("deepep_switch.decision")

# Knobs every rank must hold equal, because they shape buffers or kernel launches.
AGREED_KNOBS = (
    "num_sms", "max_tokens_per_rank", "elastic_allow_hybrid", "elastic_deterministic",
    "elastic_prefer_overlap", "elastic_allow_multiple_reduction",
)
_MODES = list(BackendChoice)
_PROVIDERS = list(ProviderChoice)


class BackendUnavailableError(RuntimeError):
    """Raised on every rank, together, when strict mode forbids the fallback (or no common choice exists)."""


@dataclass(frozen=True)
class Vote:
    """What one rank asks for and can run, as integers for the all-gather."""

    provider: int
    mode: int
    strict: int
    elastic_fail_mask: int
    legacy_fail_mask: int
    knob_problems: int
    num_sms: int
    max_tokens_per_rank: int
    elastic_allow_hybrid: int
    elastic_deterministic: int
    elastic_prefer_overlap: int
    elastic_allow_multiple_reduction: int

    @classmethod
    def local(cls, loaded: LoadedSettings, report: PreflightReport) -> "Vote":
        s = loaded.settings
        return cls(
            provider=_PROVIDERS.index(s.provider), mode=_MODES.index(s.backend), strict=int(s.strict),
            elastic_fail_mask=report.failure_mask(Backend.ELASTIC),
            legacy_fail_mask=report.failure_mask(Backend.LEGACY),
            knob_problems=len(loaded.knob_problems),
            **{k: int(getattr(s, k)) for k in AGREED_KNOBS},
        )

    def to_ints(self) -> list[int]:
        return list(astuple(self))

    @classmethod
    def from_ints(cls, values: list[int]) -> "Vote":
        return cls(*values)


class Agreement(BaseModel):
    """The outcome of :func:`agree`: identical on every rank."""

    resolved: Backend
    runnable: bool = Field(description="the resolved backend passed preflight on every rank")
    reasons: list[str]
    knobs: dict[str, int]
    strict: bool
    disagreements: dict[str, dict[str, list[int]]] = Field(
        default_factory=dict, description="setting -> value -> ranks holding it, for every disagreement")
    error: Optional[str] = None


class ConsensusOutcome(BaseModel):
    """The gathered table and what it showed."""

    world_size: int
    rank: int
    votes: list[dict[str, int]]
    agreed: bool = Field(description="True when every rank asked for the same backend and knobs")
    disagreements: dict[str, dict[str, list[int]]] = Field(default_factory=dict)


class BackendDecision(BaseModel):
    """What this process will run, and why. Identical on every rank of the group except ``preflight``."""

    model_config = ConfigDict(frozen=True)

    requested: Backend = Field(description="ELASTIC for elastic and auto requests, LEGACY otherwise")
    requested_mode: BackendChoice = Field(description="the parsed RTP_LLM_DEEPEP_BACKEND (legacy/elastic/auto)")
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
        text = (f"requested={self.requested_mode.value} resolved={self.resolved.value} "
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
    return [name for bit, name in enumerate(CHECK_NAMES) if mask >> bit & 1]


def agree(table: list[Vote]) -> Agreement:
    """Resolve the backend from every rank's vote. Pure: same table, same answer, on every rank."""
    strict = any(v.strict for v in table)
    reasons: list[str] = []
    errors: list[str] = []
    disagreements: dict[str, dict[str, list[int]]] = {}

    providers = _ranks_by_value([v.provider for v in table])
    if len(providers) > 1:
        disagreements["provider"] = {_PROVIDERS[p].value: r for p, r in providers.items()}
        errors.append(f"ranks disagree on {env_name('provider')}: {disagreements['provider']}; "
                      "real DeepEP and the reference providers cannot talk to each other")

    bad_settings = [r for r, v in enumerate(table) if v.knob_problems]
    if strict and bad_settings:
        errors.append(f"malformed RTP_LLM_DEEPEP_* settings on ranks {bad_settings} (see their warnings)")

    knobs: dict[str, int] = {}
    for knob in AGREED_KNOBS:
        by_value = _ranks_by_value([getattr(v, knob) for v in table])
        if len(by_value) == 1:
            knobs[knob] = next(iter(by_value))
            continue
        default = int(SwitchSettings.model_fields[knob].default)
        knobs[knob] = default
        disagreements[knob] = {str(value): r for value, r in by_value.items()}
        message = f"ranks disagree on {env_name(knob)} {disagreements[knob]}: every rank uses the default {default}"
        reasons.append(message)
        if strict:
            errors.append(message)

    modes = _ranks_by_value([v.mode for v in table])
    if len(modes) > 1:
        disagreements["backend"] = {_MODES[m].value: r for m, r in modes.items()}
        message = (f"ranks disagree on {env_name('backend_raw')} {disagreements['backend']}: "
                   "every rank uses legacy")
        reasons.append(message)
        resolved = Backend.LEGACY
        if strict:
            errors.append(message)
    else:
        mode = _MODES[next(iter(modes))]
        if mode is BackendChoice.LEGACY:
            resolved = Backend.LEGACY
            reasons.append(f"{env_name('backend_raw')} is legacy (or unset)")
        else:
            unable = {r: _failed_checks(v.elastic_fail_mask) for r, v in enumerate(table) if v.elastic_fail_mask}
            if not unable:
                resolved = Backend.ELASTIC
                reasons.append(f"{mode.value} requested and elastic preflight passed on all {len(table)} ranks")
            else:
                resolved = Backend.LEGACY
                message = (f"{mode.value} requested but elastic is unavailable on ranks {sorted(unable)} "
                           f"(failed checks: {unable}): every rank uses legacy")
                reasons.append(message)
                if strict and mode is BackendChoice.ELASTIC:
                    errors.append(message)

    runnable = True
    if resolved is Backend.LEGACY:
        no_legacy = {r: _failed_checks(v.legacy_fail_mask) for r, v in enumerate(table) if v.legacy_fail_mask}
        if no_legacy:
            runnable = False
            reasons.append(f"legacy is not runnable either on ranks {sorted(no_legacy)} (failed checks: {no_legacy})")

    error = None
    if errors:
        error = "deepep-switch cannot pick a backend (strict mode)" if strict else "deepep-switch cannot pick a backend"
        error += ": " + " | ".join(errors)
    return Agreement(resolved=resolved, runnable=runnable, reasons=reasons, knobs=knobs, strict=strict,
                     disagreements=disagreements, error=error)


def resolve_backend(group: Optional[dist.ProcessGroup] = None, *, settings: Optional[LoadedSettings] = None,
                    preflight: Optional[PreflightReport] = None, probe: Optional[Probe] = None,
                    internode: bool = False) -> BackendDecision:
    """Decide which DeepEP generation this process runs, agreed with every rank of ``group``.

    Args:
        group: the EP process group. None = the default group when torch.distributed is initialized, else
            a single-process decision with no collective.
        settings: settings to use instead of the process-wide ones (tests, embedding).
        preflight: a preflight report to use instead of probing this host (tests).
        probe: how to probe the host when ``preflight`` is None.
        internode: whether the EP group spans nodes (affects the GIN check).

    Returns:
        The decision. Raises :class:`BackendUnavailableError` on every rank together when strict mode forbids
        the fallback or the ranks' providers differ, and ``ConsensusTimeout`` if a rank never joins.
    """
    loaded = settings or get_settings()
    report = preflight or run_preflight(loaded.settings, probe, internode=internode)
    vote = Vote.local(loaded, report)
    world, rank = group_size_and_rank(group)
    rows = all_gather_ints(vote.to_ints(), group, loaded.settings.consensus_timeout_s, what="backend decision")
    table = [Vote.from_ints(row) for row in rows]
    agreement = agree(table)

    for setting, by_value in agreement.disagreements.items():
        name = env_name("backend_raw" if setting == "backend" else setting)
        logger.warning("deepep-switch rank %d/%d: ranks disagree on %s: %s", rank, world, name, by_value)
    if agreement.error:
        logger.error("deepep-switch rank %d/%d: %s", rank, world, agreement.error)
        raise BackendUnavailableError(agreement.error)

    consensus = None
    if world > 1:
        consensus = ConsensusOutcome(
            world_size=world, rank=rank, votes=[{f.name: getattr(v, f.name) for f in fields(Vote)} for v in table],
            agreed=not agreement.disagreements, disagreements=agreement.disagreements)
    decision = BackendDecision(
        requested=Backend.LEGACY if loaded.settings.backend is BackendChoice.LEGACY else Backend.ELASTIC,
        requested_mode=loaded.settings.backend, resolved=agreement.resolved, runnable=agreement.runnable,
        reasons=([loaded.backend_problem] if loaded.backend_problem else []) + agreement.reasons,
        strict=agreement.strict, settings=loaded.settings.model_copy(update=agreement.knobs),
        preflight=report, consensus=consensus,
    )
    log = logger.info if rank == 0 or agreement.resolved is not decision.requested else logger.debug
    log("deepep-switch rank %d/%d: %s", rank, world, decision.describe())
    return decision
