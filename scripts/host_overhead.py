"""Host (CPU) time deepep-switch adds to a round trip, measured without DeepEP: the library's calls are replaced by
stubs that return a recorded result at once, so what is left is the router's own Python and torch work.

    PYTHONPATH=. python scripts/host_overhead.py [--iters N] [--tokens T] [--profile]

Two gloo ranks with the reference providers: each rank records one real round trip per backend and mode, then
times ``iters`` round trips of (a) the stubbed raw calls alone and (b) the router over the same stubs; the
difference is deepep-switch's host work. On CPU a torch op runs its kernel inline (tiny tensors here), while on a
GPU it queues one, so the numbers are a guide to the Python and op-count part of the GPU host overhead, not to
DeepEP's own cost. ``--profile`` prints cProfile's top functions of the router trip (rank 0).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

_STUBBED = ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine")


def _stub(buffer: Any) -> dict[Any, list[Any]]:
    """Record each library call's result on first use (per call name and layout flags), then return it without
    running anything."""
    recorded: dict[Any, list[Any]] = {}
    for name in _STUBBED:
        real = getattr(buffer, name, None)
        if real is None:
            continue

        def stub(*args: Any, _real: Callable[..., Any] = real, _name: str = name, **kwargs: Any) -> Any:
            key = (_name, kwargs.get("do_expand"), kwargs.get("do_cpu_sync"))
            if key not in recorded:
                recorded[key] = [_real(*args, **kwargs)]
            return recorded[key][0]
        setattr(buffer, name, stub)
    return recorded


def _time(fn: Callable[[], Any], iters: int) -> float:
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _worker(rank: int, world: int, iters: int, tokens: int, profile: bool) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from deepep_switch.bench import BenchSpec, _inputs, _raw_round_trip, _router_round_trip
    from deepep_switch.settings import load_settings
    from deepep_switch.testing import layer_config
    from deepep_switch.wrapper import DeepEPWrapper
    from routers import LowLatencyRouter, NormalRouter

    torch.set_num_threads(1)
    spec = BenchSpec(hidden=512, num_experts=16, topk=4)
    out: dict[str, dict[str, float]] = {}
    for backend, low_latency, layout in (("legacy", False, None), ("legacy", True, None), ("elastic", False, None),
                                         ("elastic", True, "token"), ("elastic", True, "expand")):
        extra = {"elastic_ll_layout": layout} if layout else {}
        cfg = layer_config(rank, world, hidden=spec.hidden, experts=spec.num_experts, topk=spec.topk,
                           capacity=tokens, low_latency=low_latency)
        wrapper = DeepEPWrapper.create(cfg, settings=load_settings(backend_raw=backend, **extra))
        try:
            x, ids, w = _inputs(rank, tokens, spec, torch.device("cpu"))
            router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper)
            raw = _raw_round_trip(wrapper, low_latency, x, ids, w, spec)
            trip = _router_round_trip(router, x, ids, w)
            raw()
            trip()  # real communication once: the stubs record results from the same inputs
            dist.barrier()
            _stub(wrapper.native_buffer)
            raw()
            trip()
            key = f"{backend} {'low_latency' if low_latency else 'normal'}{' ' + layout if layout else ''}"
            raw_us, router_us = _time(raw, iters), _time(trip, iters)
            out[key] = {"raw_stub_us": round(raw_us, 1), "router_stub_us": round(router_us, 1),
                        "router_minus_raw_us": round(router_us - raw_us, 1)}
            if profile and rank == 0:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(lambda: [trip() for _ in range(200)])
                print(f"===== {key}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(14)
            dist.barrier()
        finally:
            DeepEPWrapper.reset()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from deepep_switch.launch import spawn

    per_rank = spawn(_worker, 2, args=(args.iters, args.tokens, args.profile),
                     env={"DEEPEP_SWITCH_PROVIDER": "reference"}, timeout_s=600)
    print(f"host microseconds per round trip, median of {args.iters} (stubbed library calls; rank 0 / rank 1):")
    for key in per_rank[0]:
        cells = " / ".join(f"{r[key]['router_minus_raw_us']:6.1f}" for r in per_rank)
        print(f"  {key:28} raw {per_rank[0][key]['raw_stub_us']:7.1f}  router {per_rank[0][key]['router_stub_us']:7.1f}"
              f"  router - raw {cells}")


if __name__ == "__main__":
    main()
