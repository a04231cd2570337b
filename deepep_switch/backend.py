"""The DeepEP communication generations deepep-switch can run."""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional


class Backend(str, Enum):
    """A DeepEP generation. ``.value`` is the string operators write in ``RTP_LLM_DEEPEP_BACKEND``.

    The members are the built-in generations. A generation registered at run time (see
    :mod:`deepep_switch.backends`) is ``Backend(name)``: the registry makes it a member on first lookup.
    """

    LEGACY = "legacy"
    """``deep_ep.Buffer`` (V1 API): normal and low-latency kernels."""

    ELASTIC = "elastic"
    """``deep_ep.ElasticBuffer`` (DeepEP 2.1's V2 API): one NCCL-based dispatch/combine."""

    EP = "ep"
    """``EPBuffer`` (DeepEP 2.5: ``deep_ep_v25`` from sgl-deep-ep-v25, or upstream ``deep_ep`` 2.5): the V2 API's
    successor, JIT-compiled at run time."""

    @classmethod
    def _missing_(cls, value: Any) -> Optional["Backend"]:
        return registered_member(cls, value)


def registered_member(enum_cls: type, value: Any) -> Any:
    """A pseudo-member of ``enum_cls`` for a generation registered at run time, else None (-> ValueError).

    Created once and cached in the enum's value map, so ``Backend("x") is Backend("x")`` holds.
    """
    from .backends.registry import is_registered

    if not isinstance(value, str) or not is_registered(value):
        return None
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = value.upper(), value
    enum_cls._value2member_map_[value] = member  # type: ignore[attr-defined]
    return member
