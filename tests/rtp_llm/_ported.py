"""What replaces rtp-llm's test infrastructure in the ported tests (``mp.spawn`` / ``PortManager`` / Bazel's GPU
pinning), shared by ``test_deepep_normal_router.py``, ``test_deepep_low_latency_router.py`` and ``test_deepep.py``.

Every ported test runs twice per generation (legacy, elastic, ep): on CPU (2 gloo ranks, deepep-switch's reference
providers) and, marked ``gpu``, on 2 GPUs (NCCL, real DeepEP); a GPU row whose generation this process cannot run
(elastic on the DeepEP 2.5 stack, ep on the 2.1 stack) is skipped with preflight's reason (``tests/_generations``).
``spawn_ranks`` starts the 2 ranks through ``deepep_switch.launch.spawn`` (bounded by a timeout) with the
environment a replica would have: ``RTP_LLM_DEEPEP_BACKEND`` and, so that a backend that cannot run fails the test
instead of falling back, ``RTP_LLM_DEEPEP_STRICT=1``.
"""

from __future__ import annotations

import importlib
import os
import traceback
from typing import Any, Callable, Optional, Sequence

import pytest
import torch

from _generations import GENERATIONS, GPU_ENV, V2_GENERATIONS, why_not
from deepep_switch.launch import free_port, spawn

# The stand-in's collective_torch reads it: "gloo" (CPU ranks) or "nccl" (GPU ranks).
DIST_BACKEND_ENV = "RTP_LLM_STANDIN_DIST_BACKEND"
# Read at collection, before the suite's per-test environment cleaning: a GPU host without RDMA NICs needs
# EP_DISABLE_GIN=1 for ElasticBuffer and EPBuffer (its install script sets it).
_EP_DISABLE_GIN = GPU_ENV["EP_DISABLE_GIN"]

CPU, GPU = "cpu", "gpu"


def variants(gpu_marks: Optional[dict[str, Any]] = None, cpu_marks: Optional[dict[str, Any]] = None,
             backends: Sequence[str] = GENERATIONS) -> list[Any]:
    """``(where, backend)`` parameters: every generation on CPU and (marked ``gpu``) on GPU, a GPU row this process
    cannot run marked skip with preflight's reason. ``*_marks`` add marks to one backend's variant."""
    out = []
    for where, extra in ((CPU, cpu_marks or {}), (GPU, gpu_marks or {})):
        for backend in backends:
            marks = ([pytest.mark.gpu] if where == GPU else []) + list(extra.get(backend, []))
            reason = why_not(backend) if where == GPU else None
            if reason:
                marks.append(pytest.mark.skip(reason=f"{backend} cannot run in this process: {reason}"))
            out.append(pytest.param(where, backend, marks=marks, id=f"{where}-{backend}"))
    return out


def is_v2(backend: str) -> bool:
    """An NCCL-based generation (ElasticBuffer, EPBuffer): no V1 calls on ``wrapper.buffer``, hidden % 256."""
    return backend in V2_GENERATIONS


def spawn_ranks(fn: Callable[..., Any], where: str, backend: str, args: Sequence[Any] = (), timeout_s: float = 240,
                extra_env: Optional[dict[str, str]] = None) -> list[Any]:
    """Run ``fn(rank, 2, *args)`` on 2 ranks (``where``: "cpu" or "gpu") with ``backend`` requested."""
    env: dict[str, Optional[str]] = {k: None for k in os.environ if k.startswith(("RTP_LLM_DEEPEP_", "DEEPEP_SWITCH_"))}
    env.update({"RTP_LLM_DEEPEP_BACKEND": backend, "RTP_LLM_DEEPEP_STRICT": "1",
                "DEEPEP_SWITCH_PROVIDER": "deep_ep" if where == GPU else "reference",
                DIST_BACKEND_ENV: "nccl" if where == GPU else "gloo"})
    if where == GPU:
        env["EP_DISABLE_GIN"] = _EP_DISABLE_GIN
    env.update(extra_env or {})
    return spawn(fn, 2, args=tuple(args), backend="nccl" if where == GPU else "gloo", env=env, timeout_s=timeout_s)


def free_ports(n: int) -> list[int]:
    """``PortManager().get_consecutive_ports`` stand-in: ``n`` free TCP ports for re-initialised process groups."""
    return [free_port() for _ in range(n)]


# ---------------------------------------------------------------------------------------------- in the ranks
def on_gpu() -> bool:
    return os.environ.get(DIST_BACKEND_ENV) == "nccl"


def device() -> torch.device:
    """Where the test's tensors live: the rank's GPU (``cuda:{rank}`` in rtp-llm's tests), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def set_device(local_rank: int) -> None:
    """rtp-llm's ``torch.cuda.set_device(local_rank); torch.set_default_device(f"cuda:{local_rank}")``; nothing
    on CPU."""
    if on_gpu():
        torch.cuda.set_device(local_rank)
        torch.set_default_device(f"cuda:{local_rank}")


def install_and_import(namespace: dict[str, Any], imports: Sequence[tuple[str, Sequence[str]]]) -> None:
    """What an engine does at start-up, then the original file's imports.

    ``routers.rtp_llm.install()`` binds deepep-switch's ``DeepEPWrapper``, ``DeepepWrapperConfig``,
    ``init_deepep_wrapper`` and DeepEP routers in rtp-llm's modules; only then are rtp-llm's names imported into
    ``namespace`` (the test module's globals), so the test body finds deepep-switch's objects under them, as
    rtp-llm's own code would (a ``from X import Y`` made before ``install()`` keeps rtp-llm's object).
    """
    from routers.rtp_llm import install

    install()
    for module, names in imports:
        mod = importlib.import_module(module)
        namespace.update({name: getattr(mod, name) for name in names})


def assert_backend(wrapper: Any) -> None:
    """(deepep-switch) the wrapper runs the backend this replica asked for (strict mode would have raised)."""
    requested = os.environ["RTP_LLM_DEEPEP_BACKEND"]
    assert wrapper.backend.value == requested, f"RTP_LLM_DEEPEP_BACKEND={requested} but running {wrapper.backend}"


def run_subtests(subtests: Sequence[tuple[str, Callable[[], Any]]]) -> dict[str, Optional[str]]:
    """Run one rank's share of several tests in one process (one spawn per backend instead of one per test):
    ``{name: None if it passed, else its traceback}``. After a failure the wrapper and the distributed
    environment a test left behind are torn down, so the next one starts clean."""
    from rtp_llm.models_py.distributed.collective_torch import destroy_distributed_environment
    from rtp_llm.models_py.distributed.deepep_wrapper import DeepEPWrapper

    results: dict[str, Optional[str]] = {}
    for name, body in subtests:
        try:
            body()
            results[name] = None
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails that test
            results[name] = traceback.format_exc()
            if torch.distributed.is_initialized():
                DeepEPWrapper.reset()
                destroy_distributed_environment()
    return results


def check_subtest(results: list[dict[str, Optional[str]]], name: str) -> None:
    """Fail with the ranks' tracebacks if ``name`` failed on any rank."""
    failures = [f"rank {rank}:\n{r[name]}" for rank, r in enumerate(results) if r[name] is not None]
    if failures:
        raise AssertionError("\n".join(failures))
