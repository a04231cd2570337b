"""The ported rtp-llm tests import rtp-llm's modules from the stand-in (``standin/rtp_llm``, alibaba/rtp-llm @
4b8d39cd). This fixture puts it on ``sys.path`` for each test module here (spawned ranks inherit ``sys.path``),
and afterwards takes it off again and drops every ``rtp_llm*`` module (and a ``routers.rtp_llm`` bound to them):
the rest of the suite checks how deepep-switch behaves *without* rtp-llm, by making ``import rtp_llm`` fail,
which a cached ``rtp_llm.*`` submodule would defeat. Test modules here import rtp-llm's names only inside tests
and rank bodies, never at collection.
"""

from __future__ import annotations

import inspect
import os
import sys

import pytest

import routers

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin")


def _ours(name: str) -> bool:
    return name in ("rtp_llm", "routers.rtp_llm") or name.startswith("rtp_llm.")


def _forget_in_inspect() -> None:
    """Drop ``inspect``'s file cache entries for the stand-in's modules.

    ``inspect.getframeinfo`` (the stand-in's ``ConditionChecker``, pytest's tracebacks) records each module's file
    by name. Once the stand-in is gone, ``import rtp_llm`` elsewhere in the suite (``routers.rtp_llm`` probing for
    rtp-llm) finds ``tests/rtp_llm`` as a namespace package, whose ``__file__`` is None; a later
    ``inspect.getmodule`` scan (e.g. torch registering custom ops on the first ``torch.testing.assert_close``) then
    sees a name whose file changed and raises ``TypeError: <module 'rtp_llm'> is a built-in module``. Unrecorded
    names with no file are skipped by that scan.
    """
    for name in [n for n in inspect._filesbymodname if _ours(n)]:  # type: ignore[attr-defined]
        del inspect._filesbymodname[name]  # type: ignore[attr-defined]
    for path in [p for p, n in inspect.modulesbyfile.items() if _ours(n)]:
        del inspect.modulesbyfile[path]


@pytest.fixture(scope="module", autouse=True)
def rtp_llm_standin():
    # Whatever other tests left under these names (fakes, None) is set aside and put back afterwards.
    saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _ours(n)]}
    saved_attr = routers.__dict__.pop("rtp_llm", None)
    sys.path.insert(0, STANDIN)
    try:
        yield STANDIN
    finally:
        sys.path.remove(STANDIN)
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        _forget_in_inspect()
        sys.modules.update(saved)
        routers.__dict__.pop("rtp_llm", None)
        if saved_attr is not None:
            routers.rtp_llm = saved_attr  # type: ignore[attr-defined]
