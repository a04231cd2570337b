"""What every rank must build identically, agreed in the decision collective before any buffer exists.

Two things make ranks build different buffers without any of them noticing until a collective hangs or
corrupts data: a layer config that differs (one rank's ``expert_num`` or ``hidden_size`` is off), and the
environment DeepEP reads while building (``EP_DISABLE_GIN`` set on one node only). The wrapper's
:class:`Blueprint` carries both into the backend decision's one all-gather:

* every ``DeepepWrapperConfig`` field except the per-rank ones (:data:`PER_RANK_FIELDS`);
* every variable of :data:`deepep_switch.settings.DEEP_EP_BUILD_ENV`, read when ``create`` runs (DeepEP reads
  them when it builds, not when deepep-switch's settings were loaded).

Any difference makes :func:`mismatch` return one message, computed from the gathered table alone, so every rank
raises the same ``ValueError`` naming the field, its values and the ranks holding each.

Each value travels as one int64: config fields as their integer (booleans 0/1, enums by position), environment
values as their raw text packed into the integer when it is at most 7 bytes (every value DeepEP documents), as
a digest otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Optional

from .config import DeepepWrapperConfig
from .settings import DEEP_EP_BUILD_ENV

PER_RANK_FIELDS = frozenset({"ep_rank", "local_rank"})
"""Config fields that differ between ranks by design."""
ABSENT = -(1 << 62)
"""No config given (a bare ``resolve_backend`` call): nothing to agree on."""
_UNSET = -1
_PACKED_BYTES = 7


def _agreed_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(DeepepWrapperConfig) if f.name not in PER_RANK_FIELDS]


_FIELD_TYPES = typing.get_type_hints(DeepepWrapperConfig)


def encode_config_value(value: Any) -> int:
    """A config field's value as an int64: ints as they are, booleans 0/1, enum members by position."""
    if isinstance(value, Enum):
        return list(type(value)).index(value)
    return int(value)


def encode_env_value(raw: Optional[str]) -> int:
    """An environment variable's raw value as an int64: -1 unset; up to 7 bytes packed with their length (so
    every rank can print every rank's value); longer values as a negative 56-bit digest."""
    if raw is None:
        return _UNSET
    data = raw.encode("utf-8", "surrogateescape")
    if len(data) <= _PACKED_BYTES:
        return (len(data) << (8 * _PACKED_BYTES)) | int.from_bytes(data, "big")
    return -2 - int.from_bytes(hashlib.blake2b(data, digest_size=_PACKED_BYTES).digest(), "big")


def _show_env(code: int) -> str:
    if code == _UNSET:
        return "unset"
    if code >= 0:
        length = code >> (8 * _PACKED_BYTES)
        data = (code & ((1 << (8 * _PACKED_BYTES)) - 1)).to_bytes(_PACKED_BYTES, "big")[_PACKED_BYTES - length:]
        return repr(data.decode("utf-8", "surrogateescape"))
    return f"a value longer than {_PACKED_BYTES} bytes (digest {-2 - code:014x})"


def _show_config(name: str, code: int) -> str:
    kind = _FIELD_TYPES[name]
    if isinstance(kind, type) and issubclass(kind, Enum):
        members = list(kind)
        return members[code].name if 0 <= code < len(members) else f"<unknown {kind.__name__} #{code}>"
    if kind is bool:
        return str(bool(code))
    return str(code)


@dataclass(frozen=True)
class Blueprint:
    """One rank's view of what the ranks are about to build, as integers for the decision's all-gather.

    Attributes:
        values: one int64 per name of :meth:`names`, in that order (config fields, then environment variables).
    """

    values: tuple[int, ...]

    @staticmethod
    def names() -> list[str]:
        """The agreed config fields, then the agreed environment variables."""
        return [f.name for f in _agreed_fields()] + list(DEEP_EP_BUILD_ENV)

    @classmethod
    def width(cls) -> int:
        return len(cls.names())

    @classmethod
    def absent(cls) -> "Blueprint":
        """Nothing to agree on (``resolve_backend`` called without a wrapper config)."""
        return cls((ABSENT,) * cls.width())

    @classmethod
    def local(cls, config: DeepepWrapperConfig, environment: Mapping[str, Optional[str]]) -> "Blueprint":
        """This rank's blueprint: ``config`` and ``environment`` (variable -> raw value or None, as
        :func:`deepep_switch.settings.read_deep_ep_environment` returns it)."""
        config_values = [encode_config_value(getattr(config, f.name)) for f in _agreed_fields()]
        env_values = [encode_env_value(environment.get(name)) for name in DEEP_EP_BUILD_ENV]
        return cls(tuple(config_values + env_values))

    @property
    def is_absent(self) -> bool:
        return all(v == ABSENT for v in self.values)

    def describe(self) -> dict[str, str]:
        """Name -> the value as people write it (for the decision record)."""
        return {name: show(name, code) for name, code in zip(self.names(), self.values)}


def show(name: str, code: int) -> str:
    """How ``name``'s encoded value reads in messages."""
    if code == ABSENT:
        return "no config"
    return _show_env(code) if name in DEEP_EP_BUILD_ENV else _show_config(name, code)


def disagreements(table: list[Blueprint]) -> dict[str, dict[str, list[int]]]:
    """Name -> value -> the ranks holding it, for every name on which the ranks differ."""
    out: dict[str, dict[str, list[int]]] = {}
    for i, name in enumerate(Blueprint.names()):
        by_value: dict[int, list[int]] = {}
        for rank, blueprint in enumerate(table):
            by_value.setdefault(blueprint.values[i], []).append(rank)
        if len(by_value) > 1:
            out[name] = {show(name, code): ranks for code, ranks in by_value.items()}
    return out


def mismatch(table: list[Blueprint]) -> Optional[str]:
    """The error every rank raises when the ranks would build different buffers, else None."""
    differ = disagreements(table)
    if not differ:
        return None
    parts = ["{}: {}".format(name, ", ".join(f"{value} on ranks {ranks}" for value, ranks in by_value.items()))
             for name, by_value in differ.items()]
    return ("deepep-switch: the ranks would build different buffers, so none is built: " + "; ".join(parts)
            + ". Give every rank the same layer config (all but ep_rank/local_rank) and the same DeepEP "
            "environment")
