"""The registry of DeepEP generations: the one place that knows which generations exist.

Generations register themselves when their module is imported (``deepep_switch.backends`` imports the built-in
ones). The registration order is the order of the failure masks in each rank's vote, so every rank must register
the same generations in the same order; the vote carries :func:`digest` to prove it.
"""

from __future__ import annotations

import zlib

from ..backend import Backend
from .spec import BackendSpec

FALLBACK = Backend.LEGACY
"""Where every failed or disagreeing request lands: the generation every DeepEP install has had longest."""
MAX_BACKENDS = 8
"""Slots for failure masks in a vote (fixed, so ranks with different registries still exchange equal lengths)."""

_SPECS: dict[str, BackendSpec] = {}
_BUILT_IN = frozenset(b.value for b in Backend)


def register(spec: BackendSpec) -> BackendSpec:
    """Add a generation. Raises ValueError for a duplicate name, a bad name or a full registry."""
    name = spec.name
    if not name or name != name.strip().lower() or name == "auto":
        raise ValueError(f"invalid backend name {name!r}: lower case, not 'auto'")
    if name in _SPECS:
        raise ValueError(f"backend {name!r} is already registered")
    if len(_SPECS) >= MAX_BACKENDS:
        raise ValueError(f"at most {MAX_BACKENDS} backends can be registered")
    _SPECS[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a generation registered at run time (tests, plug-ins); built-in ones stay."""
    if name in _BUILT_IN:
        raise ValueError(f"built-in backend {name!r} cannot be unregistered")
    _SPECS.pop(name, None)
    from ..settings import BackendChoice

    for enum_cls in (Backend, BackendChoice):  # forget the pseudo-members made for it
        enum_cls._value2member_map_.pop(name, None)


def is_registered(name: str) -> bool:
    return name in _SPECS


def registered() -> tuple[BackendSpec, ...]:
    """Every generation, in registration order."""
    return tuple(_SPECS.values())


def names() -> tuple[str, ...]:
    return tuple(_SPECS)


def get_spec(backend: "Backend | str") -> BackendSpec:
    """The spec of ``backend``; ValueError naming the registered ones when there is none."""
    name = backend.value if isinstance(backend, Backend) else str(backend)
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"no backend {name!r} is registered (registered: {', '.join(_SPECS)})") from None


def digest() -> int:
    """A stable 31-bit fingerprint of the registered names and their order."""
    return zlib.crc32(",".join(_SPECS).encode()) & 0x7FFFFFFF
