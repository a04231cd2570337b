"""Which DeepEP generations this process can run on real DeepEP: the backend lists of the GPU tests.

A GPU test names the generations it covers (:data:`GENERATIONS`); :func:`generation_params` turns them into
pytest parameters, each one that this process cannot run marked skip with the reason preflight gives. So on the
DeepEP 2.1 stack (sgl-deep-ep, NCCL 2.30.7) legacy and elastic run and ep skips ("ep_api: EPBuffer missing from
deep_ep ..."); on the DeepEP 2.5 stack (sgl-deep-ep beside sgl-deep-ep-v25, NCCL >= 2.32.3) legacy and ep run and
elastic skips ("nccl_build_match: ... below 2.31 they must be equal"); without GPUs everything skips.

Decided once per process, at collection: the suite's ``clean_settings`` fixture removes ``EP_DISABLE_GIN`` from
the environment before each test body, so its value is read when this module is imported (the device's install
script sets it) and :data:`GPU_ENV` hands it to the GPU ranks.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import multiprocessing
import os
from typing import Any, Iterable, Optional

import pytest
import torch

logger = logging.getLogger("deepep_switch.tests.generations")

GENERATIONS: tuple[str, ...] = ("legacy", "elastic", "ep")
"""Every built-in generation, in registration order."""
V2_GENERATIONS: tuple[str, ...] = ("elastic", "ep")
"""The NCCL-based generations (2.1's ElasticBuffer, 2.5's EPBuffer): one dispatch/combine, hidden % 256 == 0."""
DEEP_EP_MODULES: tuple[str, ...] = ("deep_ep", "deep_ep_v25")
"""sgl-deep-ep's (legacy, elastic; upstream 2.5's has ep) and sgl-deep-ep-v25's (ep)."""

_EP_DISABLE_GIN: Optional[str] = os.environ.get("EP_DISABLE_GIN")
GPU_ENV: dict[str, Optional[str]] = {"EP_DISABLE_GIN": _EP_DISABLE_GIN}
"""For ``spawn(..., env=GPU_ENV)``: ``EP_DISABLE_GIN`` as the process started with (None removes it)."""


def gpu_ready(min_gpus: int = 2) -> tuple[bool, str]:
    """GPU tests need at least ``min_gpus`` CUDA devices and a real DeepEP module (sgl-deep-ep's ``deep_ep`` or
    sgl-deep-ep-v25's ``deep_ep_v25``)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < min_gpus:
        return False, f"needs >= {min_gpus} CUDA GPUs"
    if not any(importlib.util.find_spec(name) for name in DEEP_EP_MODULES):
        return False, ("needs deep_ep (pip install 'deepep-switch[gpu]') or deep_ep_v25 (pip install "
                       "sgl-deep-ep-v25)")
    return True, ""


@functools.lru_cache(maxsize=None)
def unavailable() -> dict[str, str]:
    """``{generation: why this process cannot run it on real DeepEP}``; a runnable generation is absent.

    Without GPUs or DeepEP nothing is imported (every generation gets :func:`gpu_ready`'s reason); otherwise
    deepep-switch's own preflight decides, with ``EP_DISABLE_GIN`` as the process started with. Only the pytest
    process decides: in the ranks it spawns (which import the test modules to find their workers) nothing is
    probed.
    """
    if multiprocessing.parent_process() is not None:
        # A spawned rank importing a test module to run its worker: the marks made from this are never used there,
        # and probing here would import DeepEP and touch CUDA before the rank has picked its GPU.
        return {name: "decided in the pytest process, not in its ranks" for name in GENERATIONS}
    ready, why = gpu_ready()
    if not ready:
        return {name: why for name in GENERATIONS}
    from deepep_switch.preflight import run_preflight
    from deepep_switch.settings import load_settings

    overrides: dict[str, Any] = {"provider": "deep_ep", "ep_disable_gin": _EP_DISABLE_GIN or False}
    out = unavailable_in(run_preflight(load_settings(**overrides).settings))
    for name in GENERATIONS:
        logger.info("GPU tests: %s", out.get(name, f"{name}: runnable"))
    return out


def unavailable_in(report: Any) -> dict[str, str]:
    """``{generation: preflight's summary of why not}`` for the generations ``report`` (a
    :class:`~deepep_switch.preflight.PreflightReport`) rules out."""
    from deepep_switch.backend import Backend

    return {name: report.summary(Backend(name)) for name in GENERATIONS if not report.can_run(Backend(name))}


def why_not(generation: str) -> Optional[str]:
    """Why this process cannot run ``generation`` on real DeepEP, or None when it can."""
    return unavailable().get(generation)


def runnable(candidates: Iterable[str] = GENERATIONS) -> tuple[str, ...]:
    """The ``candidates`` this process can run, in their order."""
    return tuple(name for name in candidates if why_not(name) is None)


def generation_params(candidates: Iterable[str] = GENERATIONS, marks: Iterable[Any] = ()) -> list[Any]:
    """One ``pytest.param(name, id=name)`` per candidate, with ``marks``; one this process cannot run is marked
    skip with preflight's reason (so e.g. elastic rows skip, not fail, on the DeepEP 2.5 stack)."""
    params = []
    for name in candidates:
        reason = why_not(name)
        extra = [pytest.mark.skip(reason=f"{name} cannot run in this process: {reason}")] if reason else []
        params.append(pytest.param(name, marks=[*marks, *extra], id=name))
    return params
