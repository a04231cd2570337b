"""``deepep-switch bench``: what the switch costs, measured on the ranks that run it.

For each backend (legacy, elastic) and mode it times, per rank, the median of ``iters`` round trips:

* ``raw``       - DeepEP calls alone, as a hand-written integration would make them;
* ``router``    - ``prepare`` -> identity executor -> ``finalize`` through deepep-switch;
* ``raw graph`` / ``graph`` - (low-latency) the same two round trips captured once in a CUDA graph and replayed,
  which is how decode runs in production (no Python or launch overhead left).

It also reports the buffer bytes each backend was sized to and the device memory the wrapper took, and the
router's validation mode (``BenchSpec.validation``, else ``RTP_LLM_DEEPEP_VALIDATE``, which the spawned ranks
inherit). Timings use CUDA events after a barrier; on CPU (reference providers) they are wall-clock and mean
nothing for speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .quant import Quant


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run: layer shape, token counts per rank, repetitions."""

    normal_tokens: tuple[int, ...] = (128, 4096)
    low_latency_tokens: tuple[int, ...] = (128,)
    hidden: int = 7168
    num_experts: int = 64
    topk: int = 8
    iters: int = 30
    warmup: int = 5
    backends: tuple[str, ...] = ("legacy", "elastic")
    use_fp8: bool = False
    profile_path: Optional[str] = None  # rank 0 appends torch.profiler tables (raw vs router) here
    validation: Optional[str] = None  # off/basic/full; None: RTP_LLM_DEEPEP_VALIDATE (default basic)


@dataclass
class Row:
    backend: str
    mode: str
    tokens: int
    raw_us: Optional[float]
    router_us: float
    raw_graph_us: Optional[float] = None
    graph_us: Optional[float] = None
    buffer_bytes: dict[str, int] = field(default_factory=dict)
    device_bytes: int = 0
    layout_ops: Optional[str] = None
    host_us: Optional[dict[str, float]] = None
    validation: str = ""


class _Timer:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def median_us(self, fn: Callable[[], Any], iters: int, warmup: int, group: Optional[dist.ProcessGroup]) -> float:
        return statistics.median(self.samples_us(fn, iters, warmup, group))

    def samples_us(self, fn: Callable[[], Any], iters: int, warmup: int,
                   group: Optional[dist.ProcessGroup]) -> list[float]:
        """``iters`` timings of ``fn`` in microseconds, each after a barrier (CUDA events on GPUs, wall clock on
        CPU), after ``warmup`` untimed calls."""
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            dist.barrier(group=group)
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1000.0)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
        return samples


def _quant(spec: BenchSpec) -> Quant:
    return Quant.FP8_BLOCK if spec.use_fp8 else Quant.NONE


def bench_config(rank: int, world: int, spec: BenchSpec, tokens: int, low_latency: bool) -> Any:
    """The wrapper config bench builds for one (tokens, mode) row (the CLI validates exactly these)."""
    from .testing import layer_config

    return layer_config(rank, world, hidden=spec.hidden, experts=spec.num_experts, topk=spec.topk, capacity=tokens,
                        low_latency=low_latency, quant=_quant(spec))


def _inputs(rank: int, tokens: int, spec: BenchSpec, device: torch.device):
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn((tokens, spec.hidden), generator=gen).to(torch.bfloat16).to(device)
    ids = torch.rand((tokens, spec.num_experts), generator=gen).argsort(dim=1)[:, :spec.topk].to(device)
    weights = torch.rand((tokens, spec.topk), generator=gen).float().to(device)
    return x, ids, weights


def _raw_round_trip(wrapper: Any, low_latency: bool, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                    spec: BenchSpec) -> Optional[Callable[[], Any]]:
    """The running generation's raw-call baseline (None when its module declares none)."""
    raw = wrapper.spec.raw_round_trip
    if raw is None:
        return None
    return raw(wrapper.native_buffer, low_latency, wrapper.ll_num_max_token_per_rank, spec.num_experts, x, ids, w,
               _quant(spec))


def _router_round_trip(router: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Callable[[], Any]:
    from routers import CombineForwardPayload

    def round_trip() -> Any:
        payload = router.prepare(x, None, None, w, ids)
        y = payload.expert_x if payload.expert_x_scale is None else payload.expert_x.to(torch.bfloat16)
        return router.finalize(CombineForwardPayload(y), payload.expert_topk_weights, payload.expert_topk_ids,
                               False, {"original_num_tokens": x.shape[0]})
    return round_trip


def _graph_round_trip(round_trip: Callable[[], Any], group: dist.ProcessGroup) -> Callable[[], Any]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        round_trip()  # warm up JIT and allocator outside capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    dist.barrier(group=group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        round_trip()
    torch.cuda.synchronize()
    return graph.replay


def _profile(label: str, fn: Callable[[], Any], iters: int, rank: int, path: Optional[str],
             group: dist.ProcessGroup) -> None:
    """Rank 0 appends a torch.profiler table of ``iters`` calls of ``fn``; every rank runs them (collectives)."""
    from torch.profiler import ProfilerActivity, profile

    dist.barrier(group=group)
    if rank != 0 or path is None:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"\n===== {label}: {iters} calls =====\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


_LIBRARY_CALLS = ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine")


def _host_breakdown(router: Any, trip: Callable[[], Any], iters: int) -> dict[str, float]:
    """Mean host (CPU) microseconds per round trip: the whole trip, the bound path's dispatch/combine, and the
    DeepEP calls inside them. What is left is deepep-switch's own work on the host."""
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return inner

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
    return {k: round(v / iters * 1e6, 1) for k, v in timings.items()}


def bench_rank(rank: int, world: int, spec: BenchSpec, cuda: bool) -> list[dict[str, Any]]:
    """One rank of the benchmark (called through :func:`deepep_switch.launch.spawn`)."""
    from routers import LowLatencyRouter, NormalRouter, RouterOptions

    from .settings import load_settings
    from .wrapper import DeepEPWrapper

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    timer = _Timer(cuda)
    rows: list[dict[str, Any]] = []
    for backend in spec.backends:
        settings = load_settings(backend_raw=backend,
                                 **({"validation": spec.validation} if spec.validation else {}))
        for low_latency, token_list in ((False, spec.normal_tokens), (True, spec.low_latency_tokens)):
            for tokens in token_list:
                free_before = torch.cuda.mem_get_info()[0] if cuda else 0
                wrapper = DeepEPWrapper.create(bench_config(rank, world, spec, tokens, low_latency), settings=settings)
                try:
                    used = free_before - torch.cuda.mem_get_info()[0] if cuda else 0
                    x, ids, w = _inputs(rank, tokens, spec, device)
                    router = (LowLatencyRouter if low_latency else NormalRouter)(
                        wrapper, RouterOptions(quant=_quant(spec)))
                    raw_trip = _raw_round_trip(wrapper, low_latency, x, ids, w, spec)
                    raw = (timer.median_us(raw_trip, spec.iters, spec.warmup, wrapper.group)
                           if raw_trip is not None else None)
                    trip = _router_round_trip(router, x, ids, w)
                    routed = timer.median_us(trip, spec.iters, spec.warmup, wrapper.group)
                    raw_graph = graph = None
                    if low_latency and cuda:
                        raw_graph = (timer.median_us(_graph_round_trip(raw_trip, wrapper.group), spec.iters,
                                                     spec.warmup, wrapper.group) if raw_trip is not None else None)
                        graph = timer.median_us(_graph_round_trip(trip, wrapper.group), spec.iters, spec.warmup,
                                                wrapper.group)
                    host = None
                    if spec.profile_path and cuda and tokens <= 128:
                        label = f"{wrapper.backend.value} {'low_latency' if low_latency else 'normal'} {tokens}"
                        if raw_trip is not None:
                            _profile(f"{label} raw", raw_trip, 10, rank, spec.profile_path, wrapper.group)
                        _profile(f"{label} router", trip, 10, rank, spec.profile_path, wrapper.group)
                        dist.barrier(group=wrapper.group)
                        host = _host_breakdown(router, trip, 20)
                    row = Row(wrapper.backend.value, "low_latency" if low_latency else "normal", tokens, raw, routed,
                              raw_graph, graph, wrapper.buffer_bytes, int(used),
                              getattr(router, "layout_ops", None) if low_latency else None, host,
                              router.validation.value)
                    rows.append(asdict(row))
                finally:
                    DeepEPWrapper.reset()
    return rows


def summarise(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge ranks: the slowest rank's median is the layer's latency."""
    merged = []
    for i, row in enumerate(per_rank[0]):
        out = dict(row)
        for key in ("raw_us", "router_us", "raw_graph_us", "graph_us"):
            values = [r[i][key] for r in per_rank if r[i][key] is not None]
            out[key] = max(values) if values else None
        merged.append(out)
    return merged


def format_table(rows: list[dict[str, Any]]) -> str:
    """Median microseconds per round trip (slowest rank); overhead = router / raw - 1."""
    def cell(value: Optional[float]) -> str:
        return f"{value:10.1f}" if value is not None else f"{'-':>10}"

    def pct(a: Optional[float], b: Optional[float]) -> str:
        return f"{(a / b - 1.0) * 100:8.1f}%" if a is not None and b else f"{'-':>9}"

    head = (f"{'backend':8} {'mode':12} {'validate':8} {'tokens':>6} {'raw':>10} {'router':>10} {'overhead':>9} "
            f"{'raw graph':>10} {'graph':>10} {'overhead':>9}  buffer bytes")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:8} {r['mode']:12} {r.get('validation', ''):8} {r['tokens']:6d} "
                     f"{cell(r['raw_us'])} {cell(r['router_us'])} "
                     f"{pct(r['router_us'], r['raw_us'])} {cell(r['raw_graph_us'])} {cell(r['graph_us'])} "
                     f"{pct(r['graph_us'], r['raw_graph_us'])}  {r['buffer_bytes']}")
    for r in rows:
        if r.get("host_us"):
            lines.append(f"host us per round trip, {r['backend']} {r['mode']} {r['tokens']}: {r['host_us']}")
    return "\n".join(lines)
