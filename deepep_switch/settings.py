"""Typed configuration, read from the environment once per process.

This module is the only place in deepep-switch that reads environment variables. Every knob is listed, with
its default, in ``docs/configuration.md``.

Two promises hold for every value an operator can type:

* ``RTP_LLM_DEEPEP_BACKEND`` never raises here. Unset or empty means ``legacy``; every registered generation's
  name (``legacy``, ``elastic``, ...) and ``auto`` are accepted in any case and with surrounding whitespace;
  anything else means ``legacy`` plus exactly one WARNING that names the bad value and the accepted ones (in
  strict mode the decision then raises on every rank).
* Any other knob with a malformed value (``RTP_LLM_DEEPEP_NUM_SMS=abc``) falls back to its default with one
  WARNING naming the variable, unless ``RTP_LLM_DEEPEP_STRICT`` is on, in which case the problem is carried into
  the backend decision and raised there on every rank at once (see :mod:`deepep_switch.decision`).
"""

from __future__ import annotations

import functools
import logging
from enum import Enum
from typing import Any, Optional

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger("deepep_switch.settings")

BACKEND_ENV = "RTP_LLM_DEEPEP_BACKEND"
PROVIDER_ENV = "DEEPEP_SWITCH_PROVIDER"
_ENV_PREFIX = "RTP_LLM_DEEPEP_"


class BackendChoice(str, Enum):
    """What an operator asked for in ``RTP_LLM_DEEPEP_BACKEND``: a registered generation, or ``auto``.

    A generation registered at run time is ``BackendChoice(name)`` (see :class:`deepep_switch.Backend`).
    """

    LEGACY = "legacy"
    ELASTIC = "elastic"
    AUTO = "auto"

    @classmethod
    def _missing_(cls, value: Any) -> Optional["BackendChoice"]:
        from .backend import registered_member

        return registered_member(cls, value)


def backend_choices() -> list[BackendChoice]:
    """Every accepted request, in a stable order: the registered generations, then ``auto``."""
    from .backends import names

    return [BackendChoice(name) for name in names()] + [BackendChoice.AUTO]


class ProviderChoice(str, Enum):
    """Where the buffer classes come from: real DeepEP, or the pure-PyTorch reference providers."""

    DEEP_EP = "deep_ep"
    REFERENCE = "reference"


def parse_backend(raw: Optional[str]) -> tuple[BackendChoice, Optional[str]]:
    """Normalise a raw ``RTP_LLM_DEEPEP_BACKEND`` value.

    Returns ``(choice, problem)``: ``problem`` is None for accepted values (including unset/empty, which mean
    legacy) and a human-readable sentence for anything else, in which case ``choice`` is LEGACY.
    """
    text = "" if raw is None else str(raw).strip().lower()
    if not text:
        return BackendChoice.LEGACY, None
    choices = backend_choices()
    for choice in choices:
        if text == choice.value:
            return choice, None
    accepted = ", ".join(c.value for c in choices)
    return BackendChoice.LEGACY, (
        f"{BACKEND_ENV}={raw!r} is not one of {accepted}; using legacy (deep_ep.Buffer)"
    )


class SwitchSettings(BaseSettings):
    """All deepep-switch knobs. Field ``x`` is read from ``RTP_LLM_DEEPEP_X`` unless its alias says otherwise."""

    model_config = SettingsConfigDict(
        env_prefix=_ENV_PREFIX, case_sensitive=False, extra="ignore", populate_by_name=True,
        frozen=True,
    )

    backend_raw: str = Field(
        default="",
        validation_alias=AliasChoices("backend_raw", BACKEND_ENV),
        description="Raw RTP_LLM_DEEPEP_BACKEND: legacy (default), elastic, another registered generation, or "
                    "auto. Parsed by `backend`.",
    )
    strict: bool = Field(
        default=False,
        description="Raise instead of falling back when the requested backend cannot be used.",
    )
    provider: ProviderChoice = Field(
        default=ProviderChoice.DEEP_EP,
        validation_alias=AliasChoices("provider", PROVIDER_ENV),
        description="deep_ep (real DeepEP) or reference (pure-PyTorch providers, for CPU tests and the demo).",
    )
    num_sms: int = Field(
        default=0, ge=0, le=1024,
        description="SMs for the communication kernels; 0 keeps each library's default. Must be even.",
    )
    max_tokens_per_rank: int = Field(
        default=0, ge=0, le=1 << 20,
        description="Elastic normal-mode capacity (tokens per rank per dispatch); 0 uses the wrapper config's.",
    )
    elastic_allow_hybrid: bool = Field(
        default=True, description="ElasticBuffer allow_hybrid_mode (RDMA+NVLink hierarchy across nodes).",
    )
    elastic_deterministic: bool = Field(
        default=False, description="ElasticBuffer deterministic=True: legacy row order, at some cost.",
    )
    elastic_prefer_overlap: bool = Field(
        default=True, description="ElasticBuffer prefer_overlap_with_compute (fewer SMs).",
    )
    elastic_allow_multiple_reduction: bool = Field(
        default=True, description="ElasticBuffer allow_multiple_reduction.",
    )
    nccl_build_version: str = Field(
        default="", pattern=r"^$|^\d+\.\d+\.\d+$",
        description="NCCL version your DeepEP was compiled against (e.g. 2.30.7); empty = known PyPI builds only.",
    )
    ep_disable_gin: bool = Field(
        default=False,
        validation_alias=AliasChoices("ep_disable_gin", "EP_DISABLE_GIN"),
        description="DeepEP's own EP_DISABLE_GIN, read here (never written) so preflight can judge GIN.",
    )
    consensus_timeout_s: float = Field(
        default=120.0, gt=0, le=3600,
        description="Seconds a rank waits for the others in a decision collective before raising.",
    )
    # --- telemetry (deepep_switch.telemetry; docs/operations.md#metrics) ---
    metrics: bool = Field(
        default=False,
        description="Record telemetry (decision, dispatches, tokens, imbalance, latency, buffer bytes) for "
                    "deepep_switch.telemetry.snapshot() and its Prometheus collectors. Off: one attribute check "
                    "per prepare/finalize.",
    )
    metrics_sample_every: int = Field(
        default=64, ge=1, le=1 << 20,
        description="With metrics on, every Nth round trip of a router also samples load imbalance and latency.",
    )

    @field_validator("num_sms")
    @classmethod
    def _even_sms(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (DeepEP splits SMs into send/receive pairs)")
        return value

    @field_validator("provider", mode="before")
    @classmethod
    def _normalise_provider(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def backend(self) -> BackendChoice:
        """The parsed backend request (unknown values already mapped to legacy)."""
        return parse_backend(self.backend_raw)[0]

    @property
    def backend_problem(self) -> Optional[str]:
        """Why ``backend_raw`` was not accepted, or None."""
        return parse_backend(self.backend_raw)[1]


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    alias = SwitchSettings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[-1])
    return _ENV_PREFIX + field.upper()


class LoadedSettings:
    """The settings of this process plus every problem met while reading them.

    Attributes:
        settings: the effective values (malformed knobs replaced by their defaults).
        knob_problems: one sentence per malformed knob, naming the variable, its value and what was expected.
            In strict mode the decision turns these into an error on every rank.
        backend_problem: the sentence logged for an unknown ``RTP_LLM_DEEPEP_BACKEND`` (never an error), or None.
    """

    def __init__(self, settings: SwitchSettings, knob_problems: list[str]) -> None:
        self.settings = settings
        self.knob_problems = knob_problems
        self.backend_problem = settings.backend_problem

    @property
    def problems(self) -> list[str]:
        """Every problem, the backend one first."""
        return ([self.backend_problem] if self.backend_problem else []) + self.knob_problems


def load_settings(**overrides: Any) -> LoadedSettings:
    """Read the environment now (uncached) and return the settings and their problems.

    Never raises for environment content. ``overrides`` (field name -> value) take precedence over the
    environment; they are meant for tests and embedding, not for operators.
    """
    problems: list[str] = []
    fixed: dict[str, Any] = dict(overrides)
    for _ in range(len(SwitchSettings.model_fields) + 1):
        try:
            settings = SwitchSettings(**fixed)
            break
        except ValidationError as exc:
            for err in exc.errors():
                field = _field_of(err)
                if field is None or field in overrides:
                    raise  # a caller's own override is a programming error, not operator input
                problems.append(
                    f"{env_name(field)}={err.get('input')!r} is invalid ({err.get('msg')}); "
                    f"using the default {SwitchSettings.model_fields[field].default!r}"
                )
                fixed[field] = SwitchSettings.model_fields[field].default
    else:  # pragma: no cover - every field has a valid default, so the loop always ends in a break
        settings = SwitchSettings.model_construct()
    loaded = LoadedSettings(settings, problems)
    for problem in loaded.problems:
        logger.warning("deepep-switch settings: %s", problem)
    return loaded


def _field_of(err: Any) -> Optional[str]:
    loc = err.get("loc") or ()
    if not loc:
        return None
    name = str(loc[0])
    for field, info in SwitchSettings.model_fields.items():
        alias = info.validation_alias
        names = {field} | (set(map(str, alias.choices)) if isinstance(alias, AliasChoices) else set())
        if name in names or name.upper() == (_ENV_PREFIX + field.upper()):
            return field
    return None


@functools.lru_cache(maxsize=1)
def get_settings() -> LoadedSettings:
    """The process-wide settings: read on first use, then cached (``reload_settings`` re-reads)."""
    return load_settings()


def reload_settings() -> LoadedSettings:
    """Forget the cached settings and read the environment again (tests, or a deliberate re-configuration)."""
    get_settings.cache_clear()
    return get_settings()
