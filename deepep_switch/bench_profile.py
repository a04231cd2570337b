"""``deepep-switch bench --profile FILE``: where the time goes, for rows of at most 128 tokens.

* :func:`profile_trips`: rank 0 appends torch.profiler tables of each round trip (raw, raw+w, router; eager, and
  CUDA-graph replays on GPUs) to FILE, sorted by device time, and returns the router's kernels with their share of
  its device time (from the graph replay when there is one: what decode pays);
* :func:`host_breakdown`: mean host microseconds per round trip: the router's whole trip, the raw trip, the bound
  path's ``dispatch``/``combine`` and the library calls inside them. ``router-raw`` is what deepep-switch adds on
  the host.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

_LIBRARY_CALLS = ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine")
_CALLS = 10


def _device_time(evt: Any) -> float:
    """An averaged profiler event's own device time in microseconds (the attribute was renamed in torch 2.4)."""
    value = getattr(evt, "self_device_time_total", None)
    return float(value if value is not None else getattr(evt, "self_cuda_time_total", 0.0))


def kernel_shares(prof: Any, calls: int) -> list[dict[str, Any]]:
    """Each device kernel (and memset/memcpy) of a profile: name, microseconds per call, share of the total."""
    kernels = [(evt.key, _device_time(evt)) for evt in prof.key_averages()
               if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA and _device_time(evt) > 0]
    total = sum(t for _, t in kernels) or 1.0
    return [{"kernel": name[:90], "us_per_call": round(t / calls, 2), "share_pct": round(100.0 * t / total, 1)}
            for name, t in sorted(kernels, key=lambda k: -k[1])]


def _table(prof: Any, cuda: bool) -> str:
    for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=20)
        except (AttributeError, KeyError, ValueError):  # an older torch names the device column differently
            continue
    return prof.key_averages().table(row_limit=20)


def profile_trips(label: str, trips: dict[str, Optional[Callable[[], Any]]],
                  graphs: dict[str, Callable[[], Any]], rank: int, path: str, group: dist.ProcessGroup,
                  cuda: bool) -> Optional[list[dict[str, Any]]]:
    """Profile ``_CALLS`` calls of every trip and graph replay; every rank runs them (they are collective), rank 0
    writes the tables to ``path`` and returns the router's kernel shares (None elsewhere, or on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runs = [(name, fn) for name, fn in trips.items() if fn is not None]
    runs += [(f"{name} graph", fn) for name, fn in graphs.items()]
    shares = None
    for name, fn in runs:
        dist.barrier(group=group)
        if rank != 0:
            for _ in range(_CALLS):
                fn()
            if cuda:
                torch.cuda.synchronize()
            continue
        with profile(activities=activities) as prof:
            for _ in range(_CALLS):
                fn()
            if cuda:
                torch.cuda.synchronize()
        found = kernel_shares(prof, _CALLS) if cuda else None
        with open(path, "a") as f:
            f.write(f"\n===== {label} {name}: {_CALLS} calls =====\n{_table(prof, cuda)}")
            if found:
                f.write("kernels by device time (us per call, share of this trip's device time):\n")
                f.writelines(f"  {k['share_pct']:5.1f}%  {k['us_per_call']:8.2f}  {k['kernel']}\n" for k in found)
        if name == "router" or (name == "router graph" and found):  # the graph's when the profiler sees them
            shares = found
    return shares


def host_breakdown(router: Any, trip: Callable[[], Any], raw_trip: Optional[Callable[[], Any]],
                   iters: int) -> dict[str, float]:
    """Mean host (CPU) microseconds per round trip: ``trip`` (the router's), ``raw_trip``, their difference
    ``router-raw``, the bound path's dispatch/combine and the library calls inside them (``deep_ep.*``)."""
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return inner

    if raw_trip is not None:
        start = time.perf_counter()
        for _ in range(iters):
            raw_trip()
        timings["raw_trip"] = time.perf_counter() - start
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    path, buffer = router.path, router.path.buffer
    patched = [(path, "dispatch", "path.dispatch"), (path, "combine", "path.combine")]
    patched += [(buffer, name, f"deep_ep.{name}") for name in _LIBRARY_CALLS if hasattr(buffer, name)]
    for obj, attr, name in patched:
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    try:
        start = time.perf_counter()
        for _ in range(iters):
            trip()
        timings["trip"] = time.perf_counter() - start
    finally:
        for obj, attr, _ in patched:
            delattr(obj, attr)
    out = {k: round(v / iters * 1e6, 1) for k, v in timings.items()}
    if "raw_trip" in out:
        out["router-raw"] = round(out["trip"] - out["raw_trip"], 1)
    return out
