"""What each RTP_LLM_DEEPEP_VALIDATE mode costs, measured two ways (numbers go to docs/payload-contract.md).

1. the validation work alone: exactly the calls ``prepare``/``finalize`` make (host checks, ``full``'s value
   checks, the id clean-up, the output check), per prepare+finalize, for a decode and a prefill shape (H=7168,
   K=8, E=256). ``--device cuda`` synchronises after every call, so device time counts.
2. the router round trip of ``deepep-switch bench`` (prepare -> identity executor -> finalize, then a barrier) on
   2 gloo ranks with the reference providers. CPU reference providers: the exchange dominates and the numbers
   say nothing about DeepEP's speed, only how much each mode adds around it.

Modes are interleaved (``--rounds``) so that load on a shared machine hits them alike; each cell is the minimum
and the median of the samples.

    python scripts/validation_cost.py                 # both parts on CPU (a few minutes on 2 cores)
    python scripts/validation_cost.py --device cuda --skip-round-trip
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from deepep_switch.settings import Validation
from routers.validation import check_output, validator_for

HIDDEN, TOPK, EXPERTS = 7168, 8, 256
SHAPES = {"decode": 128, "prefill": 4096}


def _timed(fn: Callable[[], object], iters: int, sync: Callable[[], None]) -> list[float]:
    """Microseconds of ``iters`` calls of ``fn``, each followed by ``sync``, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def validators(device: torch.device, iters: int, rounds: int) -> dict[tuple[str, int, str], list[float]]:
    """(shape, tokens, mode) -> µs samples of the validation work of one prepare+finalize; modes interleaved."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    samples: dict[tuple[str, int, str], list[float]] = {}
    for shape, tokens in SHAPES.items():
        a1 = torch.randn((tokens, HIDDEN), generator=gen).to(torch.bfloat16).to(device)
        ids = torch.rand((tokens, EXPERTS), generator=gen).argsort(dim=1)[:, :TOPK].to(device)
        weights = torch.rand((tokens, TOPK), generator=gen).to(device)
        y = torch.empty((tokens, HIDDEN), dtype=torch.bfloat16, device=device)
        for _ in range(rounds):
            for mode in Validation:
                v = validator_for(mode, HIDDEN, TOPK, EXPERTS, device)

                def call() -> None:
                    v.check_inputs(a1, weights, ids)
                    v.check_values(a1, weights, ids)
                    v.clean_ids(ids)
                    check_output(y, y.shape, device)

                samples.setdefault((shape, tokens, mode.value), []).extend(_timed(call, iters, sync))
    return samples


def graph_replays(device: torch.device, replays: int) -> dict[tuple[str, int], float]:
    """(shape, tokens) -> µs per replay of basic's check + id clean-up captured alone in a CUDA graph: what it
    adds to a captured decode step (full captures the same work)."""
    out = {}
    for shape, tokens in SHAPES.items():
        a1 = torch.zeros((tokens, HIDDEN), dtype=torch.bfloat16, device=device)
        ids = torch.zeros((tokens, TOPK), dtype=torch.int64, device=device)
        weights = torch.ones((tokens, TOPK), device=device)
        v = validator_for(Validation.BASIC, HIDDEN, TOPK, EXPERTS, device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            v.clean_ids(ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            v.check_inputs(a1, weights, ids)
            v.clean_ids(ids)
        for _ in range(10):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        out[(shape, tokens)] = start.elapsed_time(end) * 1000.0 / replays
    return out


def _trip_worker(rank: int, world: int, iters: int, rounds: int) -> dict[tuple[str, str, int, str], list[float]]:
    """One rank: router round trips (identity executor) per backend, router mode and validation mode, the
    validation modes interleaved ``rounds`` times so that load on a shared machine hits them alike."""
    import torch.distributed as dist

    from deepep_switch.bench import _inputs, _router_round_trip
    from deepep_switch.settings import load_settings
    from deepep_switch.testing import layer_config
    from deepep_switch.wrapper import DeepEPWrapper
    from routers import LowLatencyRouter, NormalRouter

    spec = _TripSpec()
    samples: dict[tuple[str, str, int, str], list[float]] = {}
    for _ in range(rounds):
        for backend in ("legacy", "elastic"):
            for low_latency, tokens in ((False, 128), (False, 1024), (True, 128)):
                for mode in Validation:
                    cfg = layer_config(rank, world, hidden=spec.hidden, experts=spec.num_experts, topk=spec.topk,
                                       capacity=tokens, low_latency=low_latency)
                    wrapper = DeepEPWrapper.create(cfg, settings=load_settings(backend_raw=backend, validation=mode))
                    try:
                        router = (LowLatencyRouter if low_latency else NormalRouter)(wrapper)
                        trip = _router_round_trip(router, *_inputs(rank, tokens, spec, torch.device("cpu")))

                        def barrier_trip() -> None:
                            trip()
                            dist.barrier()

                        key = (backend, "low_latency" if low_latency else "normal", tokens, mode.value)
                        samples.setdefault(key, []).extend(_timed(barrier_trip, iters, lambda: None))
                    finally:
                        DeepEPWrapper.reset()
    return samples


class _TripSpec:
    """The layer of the round-trip part (what ``deepep_switch.bench._inputs`` reads)."""

    hidden, num_experts, topk = 2048, 64, 8


def round_trips(iters: int, rounds: int) -> dict[tuple[str, str, int, str], list[float]]:
    """Per key, the slowest rank's samples (round trips are collective: the slowest rank sets the time)."""
    from deepep_switch.launch import spawn

    per_rank = spawn(_trip_worker, 2, args=(iters, rounds), env={"DEEPEP_SWITCH_PROVIDER": "reference"},
                     timeout_s=900)
    return {key: [max(vals) for vals in zip(*(r[key] for r in per_rank))] for key in per_rank[0]}


def _cell(values: list[float], digits: int) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of every mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by load)")
    parser.add_argument("--skip-round-trip", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; cells: min / median us of {args.iters * args.rounds}")
    print(f"\nvalidation work of one prepare+finalize (H={HIDDEN}, K={TOPK}, E={EXPERTS}):")
    print("| shape | tokens | off | basic | full |\n|---|---|---|---|---|")
    work = validators(device, args.iters, args.rounds)
    for shape, tokens in SHAPES.items():
        print(f"| {shape} | {tokens} | " + " | ".join(_cell(work[(shape, tokens, m.value)], 1) for m in Validation)
              + " |")
    if args.device == "cuda":
        print("\nbasic's check + clean-up captured in a CUDA graph, us per replay (mean of 1000 back-to-back):")
        for (shape, tokens), us in graph_replays(device, 1000).items():
            print(f"| {shape} | {tokens} | {us:.1f} |")
    if args.skip_round_trip or args.device == "cuda":
        return
    print("\nrouter round trip (prepare -> identity executor -> finalize), 2 gloo ranks, reference providers "
          f"(H={_TripSpec.hidden}, K={_TripSpec.topk}, E={_TripSpec.num_experts}), slowest rank:")
    print("| backend | router | tokens | off | basic | full |\n|---|---|---|---|---|---|")
    trips = round_trips(args.iters, args.rounds)
    for backend, router, tokens in dict.fromkeys(k[:3] for k in trips):
        print(f"| {backend} | {router} | {tokens} | "
              + " | ".join(_cell(trips[(backend, router, tokens, m.value)], 0) for m in Validation) + " |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
