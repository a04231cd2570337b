"""Typed configuration, read from the environment once per process.

This module is the only place in deepep-switch that reads environment variables. Every knob is listed, with
its default, in ``docs/configuration.md``.

Two promises hold for every value an operator can type:

* ``RTP_LLM_DEEPEP_BACKEND`` never raises here. Unset or empty means ``legacy``; every registered generation's
  name (``legacy``, ``elastic``, ``ep``, ...) and ``auto`` are accepted in any case and with surrounding whitespace;
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
BACKEND_NORMAL_ENV = "RTP_LLM_DEEPEP_BACKEND_NORMAL"
BACKEND_LOW_LATENCY_ENV = "RTP_LLM_DEEPEP_BACKEND_LOW_LATENCY"
PROVIDER_ENV = "DEEPEP_SWITCH_PROVIDER"
VALIDATE_ENV = "RTP_LLM_DEEPEP_VALIDATE"
_ENV_PREFIX = "RTP_LLM_DEEPEP_"

DEFAULT_TIMEOUT_S = 60.0
"""Default deadline, in seconds, on every wait for peer ranks (``RTP_LLM_DEEPEP_TIMEOUT_S``)."""
MAX_TIMEOUT_S = 300.0


class BackendChoice(str, Enum):
    """What an operator asked for in ``RTP_LLM_DEEPEP_BACKEND``: a registered generation, or ``auto``.

    A generation registered at run time is ``BackendChoice(name)`` (see :class:`deepep_switch.Backend`).
    """

    LEGACY = "legacy"
    ELASTIC = "elastic"
    EP = "ep"
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


class Validation(str, Enum):
    """How much the routers check their inputs before DeepEP sees them (``RTP_LLM_DEEPEP_VALIDATE``).

    * ``off``: only what deepep-switch's own code needs (the prepare/finalize protocol, the capacity, the
      executor output's shape and dtype); ids go to DeepEP as given.
    * ``basic`` (default): cheap host checks of shapes, dtypes and devices against the layer, and on the device
      (no host sync, CUDA-graph safe) every expert id outside ``[0, E)`` and every repeated id in a row becomes -1.
    * ``full``: everything ``basic`` does plus value checks that synchronise the host: ids in ``[-1, E)``, no
      repeated id in a row, finite ``a1`` and ``topk_weights``; a violation raises ``ValueError`` naming the
      argument, the token and the value, before any communication (skipped, with one warning, while a CUDA
      graph is being captured: a host sync cannot be captured).

    The field is ``validation`` (``validate`` would shadow pydantic's ``BaseModel.validate``).

    See ``docs/payload-contract.md`` for what each mode costs and guarantees.
    """

    OFF = "off"
    BASIC = "basic"
    FULL = "full"


class ElasticLowLatencyLayout(str, Enum):
    """How the elastic (and ep) low-latency path builds the legacy ``[E_local, R*N, H]`` payload
    (``RTP_LLM_DEEPEP_ELASTIC_LL_LAYOUT``).

    * ``token`` (default): ``dispatch(do_expand=False)`` moves one row per (token, rank); deepep-switch expands it
      into the 3-D layout and, at finalize, folds each token's expert outputs back into one weighted row, so the
      combine moves and reduces one row per (token, rank) and the top-k weighting costs no pass of its own.
    * ``expand``: ``dispatch(do_expand=True)`` expands in DeepEP's epilogue; deepep-switch packs those rows into the
      3-D layout and unpacks them with the weighting, and the combine reduces every expert copy.

    Both are graph-capturable with no host sync and give the same result up to bf16 rounding (token: one fp32 sum
    per rank; expand: each weighted copy rounded to bf16 first).
    """

    TOKEN = "token"
    EXPAND = "expand"


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
        description="Raw RTP_LLM_DEEPEP_BACKEND: legacy (default), elastic, ep, another registered generation, "
                    "or auto. Parsed by `backend`.",
    )
    backend_normal_raw: str = Field(
        default="",
        validation_alias=AliasChoices("backend_normal_raw", BACKEND_NORMAL_ENV),
        description="RTP_LLM_DEEPEP_BACKEND for normal (prefill) buffers only; empty = RTP_LLM_DEEPEP_BACKEND.",
    )
    backend_low_latency_raw: str = Field(
        default="",
        validation_alias=AliasChoices("backend_low_latency_raw", BACKEND_LOW_LATENCY_ENV),
        description="RTP_LLM_DEEPEP_BACKEND for low-latency (decode) buffers only; empty = RTP_LLM_DEEPEP_BACKEND.",
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
        description="Elastic and ep normal-mode capacity (tokens per rank per dispatch); 0 uses the wrapper "
                    "config's.",
    )
    elastic_allow_hybrid: bool = Field(
        default=True, description="ElasticBuffer/EPBuffer allow_hybrid_mode (RDMA+NVLink hierarchy across nodes).",
    )
    elastic_deterministic: bool = Field(
        default=False, description="ElasticBuffer/EPBuffer deterministic=True: legacy row order, at some cost.",
    )
    elastic_prefer_overlap: bool = Field(
        default=True, description="ElasticBuffer/EPBuffer prefer_overlap_with_compute (fewer SMs).",
    )
    elastic_allow_multiple_reduction: bool = Field(
        default=True, description="ElasticBuffer/EPBuffer allow_multiple_reduction.",
    )
    elastic_ll_layout: ElasticLowLatencyLayout = Field(
        default=ElasticLowLatencyLayout.TOKEN,
        description="Elastic/ep low-latency path: token (default: non-expand dispatch, expanded and folded with the "
                    "top-k weighting by deepep-switch) or expand (DeepEP's expanded dispatch).",
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
    # Where DeepEP 2.5's JIT finds nvcc, in its own order (read here, never written, so preflight can judge the
    # ep generation's compiler): EP_JIT_NVCC_COMPILER, DJ_JIT_NVCC_COMPILER, $CUDA_HOME/bin/nvcc,
    # $CUDA_PATH/bin/nvcc, then nvcc on PATH and /usr/local/cuda/bin/nvcc.
    ep_jit_nvcc_compiler: str = Field(
        default="",
        validation_alias=AliasChoices("ep_jit_nvcc_compiler", "EP_JIT_NVCC_COMPILER"),
        description="DeepEP 2.5's EP_JIT_NVCC_COMPILER (read, never written): the nvcc its JIT runs.",
    )
    dj_jit_nvcc_compiler: str = Field(
        default="",
        validation_alias=AliasChoices("dj_jit_nvcc_compiler", "DJ_JIT_NVCC_COMPILER"),
        description="DeepEP 2.5's second choice of nvcc, DJ_JIT_NVCC_COMPILER (read, never written).",
    )
    cuda_home: str = Field(
        default="",
        validation_alias=AliasChoices("cuda_home", "CUDA_HOME"),
        description="CUDA_HOME (read, never written): DeepEP 2.5's JIT runs $CUDA_HOME/bin/nvcc when no compiler "
                    "variable is set.",
    )
    cuda_path: str = Field(
        default="",
        validation_alias=AliasChoices("cuda_path", "CUDA_PATH"),
        description="CUDA_PATH (read, never written): DeepEP 2.5's JIT runs $CUDA_PATH/bin/nvcc after CUDA_HOME.",
    )
    validation: Validation = Field(
        default=Validation.BASIC,
        validation_alias=AliasChoices("validation", VALIDATE_ENV),
        description="off, basic (default: cheap host checks, out-of-range and repeated ids dropped on the device) "
                    "or full (also value checks with a host sync: ids, duplicates, NaN/Inf, raising ValueError).",
    )
    timeout_s: float = Field(
        default=DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S,
        description="Deadline in seconds on every wait for peer ranks: the decision, construction, dispatch, "
                    "combine and destroy (a host-blocking DeepEP call still blocked after it plus a grace ends "
                    "the process).",
    )
    consensus_timeout_s: Optional[float] = Field(
        default=None, gt=0, le=3600,
        description="Deprecated: the decision's deadline when set; use RTP_LLM_DEEPEP_TIMEOUT_S.",
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

    @field_validator("provider", "validation", "elastic_ll_layout", mode="before")
    @classmethod
    def _normalise_choice(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def backend(self) -> BackendChoice:
        """The parsed backend request (unknown values already mapped to legacy)."""
        return parse_backend(self.backend_raw)[0]

    @property
    def backend_problem(self) -> Optional[str]:
        """Why ``backend_raw`` was not accepted, or None."""
        return parse_backend(self.backend_raw)[1]

    def backend_source(self, low_latency: Optional[bool]) -> tuple[str, str]:
        """``(variable, raw value)`` that decides the backend of a buffer: the per-mode override when it is set
        (``low_latency`` True/False), else ``RTP_LLM_DEEPEP_BACKEND`` (also for ``low_latency=None``)."""
        if low_latency is not None:
            env, raw = ((BACKEND_LOW_LATENCY_ENV, self.backend_low_latency_raw) if low_latency
                        else (BACKEND_NORMAL_ENV, self.backend_normal_raw))
            if raw.strip():
                return env, raw
        return BACKEND_ENV, self.backend_raw

    def backend_for(self, low_latency: Optional[bool]) -> tuple[BackendChoice, Optional[str]]:
        """The parsed request for one mode's buffer and, for an unknown value, the sentence saying so."""
        env, raw = self.backend_source(low_latency)
        choice, problem = parse_backend(raw)
        if problem is not None and env != BACKEND_ENV:
            problem = problem.replace(BACKEND_ENV, env, 1)
        return choice, problem

    @property
    def consensus_deadline_s(self) -> float:
        """The decision collective's deadline: the deprecated ``RTP_LLM_DEEPEP_CONSENSUS_TIMEOUT_S`` if set,
        else ``timeout_s``."""
        return self.timeout_s if self.consensus_timeout_s is None else self.consensus_timeout_s


class DeepEPEnvironment(BaseSettings):
    """The environment DeepEP 2.1.0 reads while building a buffer that changes what it builds or how the ranks
    connect, as raw text (None = unset), exactly as DeepEP reads it: case-sensitive names, no parsing.

    Every rank must hold the same values (the wrapper checks, see :mod:`deepep_switch.blueprint`). Variables
    DeepEP reads that only change local behaviour (``EP_BUFFER_DEBUG``, ``EP_JIT_*``, ``EP_AVOID_RECORD_STREAM``,
    ``EP_SUPPRESS_NCCL_CHECK``, ``EP_NIC_NAME``) are not compared.
    """

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    ep_disable_gin: Optional[str] = Field(
        default=None, validation_alias="EP_DISABLE_GIN",
        description="C++ (NCCL backend): != 0 builds ElasticBuffer without GIN (read with sscanf %d).")
    ep_num_topk_idx_bits: Optional[str] = Field(
        default=None, validation_alias="EP_NUM_TOPK_IDX_BITS",
        description="C++ JIT: the width of top-k indices compiled into every kernel.")
    ep_reuse_nccl_comm: Optional[str] = Field(
        default=None, validation_alias="EP_REUSE_NCCL_COMM",
        description="Python (utils/comm.py): 0 creates a new NCCL communicator (a collective) instead of reusing "
                    "torch's.")
    ep_override_rdma_sl: Optional[str] = Field(
        default=None, validation_alias="EP_OVERRIDE_RDMA_SL",
        description="Python (ElasticBuffer): the RDMA service level of GIN traffic.")
    nccl_gin_cross_nic: Optional[str] = Field(
        default=None, validation_alias="NCCL_GIN_CROSS_NIC",
        description="Python (ElasticBuffer): '0' makes ranks share CPU segments (multi-plane networks).")
    nccl_elastic_buffer_register: Optional[str] = Field(
        default=None, validation_alias="NCCL_ELASTIC_BUFFER_REGISTER",
        description="NCCL, defaulted to 1 by DeepEP: how the ElasticBuffer's window is registered.")
    nvshmem_qp_depth: Optional[str] = Field(
        default=None, validation_alias="NVSHMEM_QP_DEPTH",
        description="Python (legacy Buffer) and NVSHMEM: the queue depth of the low-latency QPs.")

    def as_dict(self) -> dict[str, Optional[str]]:
        """Variable name -> raw value (None = unset), in :data:`DEEP_EP_BUILD_ENV` order."""
        return {str(info.validation_alias): getattr(self, name) for name, info in type(self).model_fields.items()}


DEEP_EP_BUILD_ENV: tuple[str, ...] = tuple(str(info.validation_alias)
                                           for info in DeepEPEnvironment.model_fields.values())
"""The environment variables every rank must agree on before DeepEP builds a buffer (see DeepEPEnvironment)."""


def read_deep_ep_environment() -> dict[str, Optional[str]]:
    """Read :data:`DEEP_EP_BUILD_ENV` now, uncached: DeepEP reads these when it builds a buffer, so the wrapper
    reads them immediately before building, not when the settings were first loaded."""
    return DeepEPEnvironment().as_dict()


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
        self.mode_backend_problems = [p for p in (settings.backend_for(ll)[1] for ll in (False, True)
                                                  if settings.backend_source(ll)[0] != BACKEND_ENV) if p]

    def requesting(self, raw: str) -> "LoadedSettings":
        """These settings with ``raw`` as the backend request of every mode (a live switch): it replaces
        ``RTP_LLM_DEEPEP_BACKEND`` and clears the per-mode overrides; every other value is kept."""
        update = {"backend_raw": raw, "backend_normal_raw": "", "backend_low_latency_raw": ""}
        return LoadedSettings(self.settings.model_copy(update=update), self.knob_problems)

    @property
    def problems(self) -> list[str]:
        """Every problem, the backend ones first."""
        return ([self.backend_problem] if self.backend_problem else []) + self.mode_backend_problems + self.knob_problems


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
    if settings.consensus_timeout_s is not None:  # a deprecation, not a problem: strict mode accepts it
        logger.warning("deepep-switch settings: %s is deprecated; use %s (it bounds every wait for peers, the "
                       "decision included). Until you do, the decision waits %gs and everything else %gs",
                       env_name("consensus_timeout_s"), env_name("timeout_s"), settings.consensus_timeout_s,
                       settings.timeout_s)
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
