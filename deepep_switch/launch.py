"""Run a function on N local processes with torch.distributed initialised, bounded by a timeout.

Used by the CLI (demo, bench) and the multi-process tests. A rank that raises or hangs fails the whole run with
the rank's traceback (or the list of ranks that did not finish) instead of hanging the caller: after the timeout
every child is killed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional, Sequence


class LaunchError(RuntimeError):
    """A rank failed or did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, backend: str, args: Sequence[Any],
           env: dict[str, Optional[str]], timeout_s: float, results: Any) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    try:
        kwargs: dict[str, Any] = dict(backend=backend, rank=rank, world_size=world_size,
                                      timeout=datetime.timedelta(seconds=timeout_s))
        if backend != "nccl":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # no oversubscription on CPU
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(init_method=f"tcp://127.0.0.1:{port}", **kwargs)
        try:
            # Plain pickle: tensors travel as bytes, not as shared-memory handles that die with the child.
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
        finally:
            if dist.is_initialized():  # fn may have torn the group down itself (an engine's own teardown)
                dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))


def spawn(fn: Callable[..., Any], world_size: int, *, args: Sequence[Any] = (), backend: str = "gloo",
          env: Optional[dict[str, Optional[str]]] = None, timeout_s: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results by rank.

    Args:
        fn: a module-level (picklable) function. It finds the default process group initialised and may
            destroy it (and initialise new ones) itself, as an engine's own distributed setup does.
        world_size: number of processes (ranks).
        args: extra positional arguments for ``fn`` (picklable).
        backend: torch.distributed backend: "gloo" (CPU) or "nccl" (one GPU per rank).
        env: environment variables set (or, with value None, removed) in every child before it imports
            anything else.
        timeout_s: wall-clock limit for the whole run; the process-group timeout too.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, backend, tuple(args), dict(env or {}),
                                               timeout_s, results), daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if failures or any(p.exitcode not in (None, 0) for p in procs):
                    # A rank died without reporting (killed, segfault) or already failed: peers may wait forever.
                    time.sleep(2.0)
                    _drain(results, out, failures)
                    break
                continue
            if ok:
                out[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if failures:
        raise LaunchError("\n".join(failures))
    missing = [r for r in range(world_size) if r not in out]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        died = {r: c for r, c in codes.items() if c not in (None, 0, -9)}
        if died:
            raise LaunchError(f"ranks {sorted(died)} died without reporting (exit codes {codes})")
        raise LaunchError(f"ranks {missing} did not finish within {timeout_s:.0f}s (exit codes {codes})")
    return [out[r] for r in range(world_size)]


def _drain(results: Any, out: dict[int, Any], failures: list[str]) -> None:
    while True:
        try:
            rank, ok, value = results.get_nowait()
        except queue.Empty:
            return
        if ok:
            out[rank] = pickle.loads(value)
        else:
            failures.append(f"rank {rank} failed:\n{value}")
