"""``deepep-switch bench``: what the switch costs, measured on the ranks that run it.

For each backend and mode (and, on elastic/ep low-latency, each layout) it times, per rank, the median of
``iters`` round trips of:

* ``raw``        - the library's calls alone, as a hand-written integration would make them (FP8 quantised once,
  outside the round trip);
* ``raw+w``      - (elastic/ep low-latency) the cheapest *correct* hand-written round trip: quantise, expand dispatch,
  the top-k weighting V2's combine never does (one Triton launch over the valid rows on CUDA), combine. This is the
  baseline the router has to meet;
* ``router``     - ``prepare`` -> identity executor -> ``finalize`` through deepep-switch;
* ``... graph``  - (low-latency, CUDA) the same round trips captured once in a CUDA graph and replayed, which is how
  decode runs in production.

No side pays for an executor: bf16 payloads are passed on, FP8 ones get a preallocated bf16 output of their shape
(:class:`~deepep_switch.backends.baselines.Bf16Outputs`). Each row also carries the logical bytes of the round trip
and the time they would take at NVLink's 450 GB/s per direction (``floor_us``; see :mod:`.bench_report`), the
buffer bytes, the device memory the wrapper took, and the router's validation mode. An optional sweep times the
elastic normal router per ``num_sms`` (and ``prefer_overlap_with_compute=False``). Timings use CUDA events after a
barrier; on CPU (reference providers) they are wall-clock and mean nothing for DeepEP's speed.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .quant import Quant

NVLINK_BYTES_PER_S = 450e9
"""H100/H200 NVLink 4, per direction per GPU (18 links x 25 GB/s)."""


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run: layer shape, token counts per rank, repetitions, variants and the SM sweep."""

    normal_tokens: tuple[int, ...] = (128, 4096)
    low_latency_tokens: tuple[int, ...] = (128,)
    hidden: int = 7168
    num_experts: int = 64
    topk: int = 8
    iters: int = 30
    warmup: int = 5
    backends: tuple[str, ...] = ("legacy", "elastic")
    use_fp8: bool = False
    profile_path: Optional[str] = None  # rank 0 appends torch.profiler tables and kernel shares here
    validation: Optional[str] = None  # off/basic/full; None: RTP_LLM_DEEPEP_VALIDATE (default basic)
    ll_layouts: tuple[str, ...] = ("token", "expand")  # elastic/ep low-latency rows, one per layout
    graphs: bool = True  # low-latency rows on CUDA: also time CUDA-graph replays
    table: bool = True  # the raw/router rows (False: the sweep only)
    sweep_sms: tuple[int, ...] = ()  # elastic/ep normal router per num_sms (0: DeepEP's own choice)
    sweep_tokens: tuple[int, ...] = (512, 4096, 8192)
    sweep_overlap: bool = False  # the sweep also tries prefer_overlap_with_compute=False
    sweep_iters: int = 10


@dataclass(frozen=True)
class Job:
    """One row: a wrapper built for ``tokens`` in one mode, with ``overrides`` (settings field -> value)."""

    backend: str
    low_latency: bool
    tokens: int
    variant: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    sweep: bool = False

    @property
    def mode(self) -> str:
        return "low_latency" if self.low_latency else "normal"

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.backend, self.mode, self.variant, f"tokens={self.tokens}") if p)


def elastic_family(backend: str) -> bool:
    """Whether ``backend`` runs the elastic paths (elastic, ep): it has low-latency layouts and an SM sweep."""
    from .backends import get_spec
    from .backends.elastic_ll import ElasticLowLatencyPath

    try:
        return issubclass(get_spec(backend).low_latency_path, ElasticLowLatencyPath)
    except (KeyError, ValueError):  # auto: not known before the decision
        return False


def plan_jobs(spec: BenchSpec) -> list[Job]:
    """Every row the ranks will time, in order (the CLI checks their configs and counts progress with it)."""
    jobs: list[Job] = []
    if spec.table:
        for backend in spec.backends:
            jobs += [Job(backend, False, tokens) for tokens in spec.normal_tokens]
            for tokens in spec.low_latency_tokens:
                if elastic_family(backend):
                    jobs += [Job(backend, True, tokens, layout, (("elastic_ll_layout", layout),))
                             for layout in spec.ll_layouts]
                else:
                    jobs.append(Job(backend, True, tokens))
    for backend in (b for b in spec.backends if elastic_family(b)) if spec.sweep_sms else ():
        for tokens in spec.sweep_tokens:
            jobs += [Job(backend, False, tokens, f"sms={n}", (("num_sms", n),), sweep=True) for n in spec.sweep_sms]
            if spec.sweep_overlap:
                jobs.append(Job(backend, False, tokens, "overlap=0", (("elastic_prefer_overlap", False),), sweep=True))
    return jobs


def spread_us(samples: list[float]) -> tuple[float, float]:
    """(p10, p90) of ``samples`` (at least one), by the nearest-rank rule."""
    ordered = sorted(samples)
    last = len(ordered) - 1
    return ordered[round(0.1 * last)], ordered[round(0.9 * last)]


class _Timer:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def median_us(self, fn: Callable[[], Any], iters: int, warmup: int, group: Optional[dist.ProcessGroup]) -> float:
        return statistics.median(self.samples_us(fn, iters, warmup, group))

    def time_into(self, row: dict[str, Any], key: str, fn: Callable[[], Any], iters: int, warmup: int,
                  group: Optional[dist.ProcessGroup]) -> None:
        """``row[key]`` = the median of ``iters`` timings (µs) and ``row["spread"][key]`` = their (p10, p90)."""
        samples = self.samples_us(fn, iters, warmup, group)
        row[key] = statistics.median(samples)
        row.setdefault("spread", {})[key] = spread_us(samples)

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


def _inputs(rank: int, tokens: int, spec: Any, device: torch.device):
    """bf16 ``x [T, H]``, int64 ``ids [T, K]`` (distinct random experts), float32 ``weights [T, K]`` of ``rank``."""
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn((tokens, spec.hidden), generator=gen).to(torch.bfloat16).to(device)
    ids = torch.rand((tokens, spec.num_experts), generator=gen).argsort(dim=1)[:, :spec.topk].to(device)
    weights = torch.rand((tokens, spec.topk), generator=gen).float().to(device)
    return x, ids, weights


@functools.lru_cache(maxsize=16)
def _token_rows(world: int, tokens: int, hidden: int, experts: int, topk: int) -> int:
    """Token rows the busiest rank sends or receives in one dispatch: one per (token, destination rank), the
    local rank included, as DeepEP V2's tests count them. Every rank's routing is regenerated on the CPU."""
    spec = BenchSpec(hidden=hidden, num_experts=experts, topk=topk)
    per_rank = experts // world
    sent, received = [], torch.zeros(world, dtype=torch.int64)
    for source in range(world):
        ids = _inputs(source, tokens, spec, torch.device("cpu"))[1]
        to_rank = torch.zeros((tokens, world), dtype=torch.bool)
        to_rank.scatter_(1, ids // per_rank, True)
        sent.append(int(to_rank.sum()))
        received += to_rank.sum(dim=0)
    return max(max(sent), int(received.max()))


def logical_bytes(world: int, tokens: int, spec: BenchSpec) -> int:
    """Dispatch (rows x (H x element size + FP8 scales)) plus combine (rows x H x 2, bf16) for the busiest rank."""
    rows = _token_rows(world, tokens, spec.hidden, spec.num_experts, spec.topk)
    dispatch = spec.hidden + spec.hidden // 128 * 4 if spec.use_fp8 else spec.hidden * 2
    return rows * (dispatch + spec.hidden * 2)


def _raw_round_trip(wrapper: Any, low_latency: bool, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                    spec: BenchSpec, weighted: bool = False) -> Optional[Callable[[], Any]]:
    """The running generation's raw-call baseline (``weighted``: its raw+w one), or None when it declares none."""
    raw = wrapper.spec.raw_weighted_round_trip if weighted else wrapper.spec.raw_round_trip
    if raw is None:
        return None
    return raw(wrapper.native_buffer, low_latency, wrapper.ll_num_max_token_per_rank, spec.num_experts, x, ids, w,
               _quant(spec))


def _router_round_trip(router: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Callable[[], Any]:
    """prepare -> identity executor (bf16: the payload itself; FP8: a preallocated bf16 output) -> finalize."""
    from routers import CombineForwardPayload

    from .backends.baselines import Bf16Outputs

    outputs = Bf16Outputs()
    original = {"original_num_tokens": x.shape[0]}

    def round_trip() -> Any:
        payload = router.prepare(x, None, None, w, ids)
        y = payload.expert_x if payload.expert_x_scale is None else outputs(payload.expert_x)
        return router.finalize(CombineForwardPayload(y), payload.expert_topk_weights, payload.expert_topk_ids,
                               False, original)
    return round_trip


def _graph_round_trip(round_trip: Callable[[], Any], group: dist.ProcessGroup) -> Callable[[], Any]:
    from .cuda_graph import capture

    return capture(round_trip, group)[0].replay


def bench_rank(rank: int, world: int, spec: BenchSpec, cuda: bool, progress: Any = None) -> list[dict[str, Any]]:
    """One rank of the benchmark (called through :func:`deepep_switch.launch.spawn`). ``progress``: a queue;
    rank 0 puts ``(done, total, what)`` after each row."""
    jobs = plan_jobs(spec)
    rows = []
    for done, job in enumerate(jobs, 1):
        rows.append(_run_job(rank, world, spec, cuda, job))
        if progress is not None and rank == 0:
            progress.put((done, len(jobs), job.label))
    return rows


def _run_job(rank: int, world: int, spec: BenchSpec, cuda: bool, job: Job) -> dict[str, Any]:
    from routers import LowLatencyRouter, NormalRouter, RouterOptions

    from .bench_profile import host_breakdown, profile_trips
    from .settings import load_settings
    from .wrapper import DeepEPWrapper

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    timer = _Timer(cuda)
    overrides = dict(job.overrides, **({"validation": spec.validation} if spec.validation else {}))
    settings = load_settings(backend_raw=job.backend, **overrides)
    free_before = torch.cuda.mem_get_info()[0] if cuda else 0
    wrapper = DeepEPWrapper.create(bench_config(rank, world, spec, job.tokens, job.low_latency), settings=settings)
    try:
        used = free_before - torch.cuda.mem_get_info()[0] if cuda else 0
        x, ids, w = _inputs(rank, job.tokens, spec, device)
        router = (LowLatencyRouter if job.low_latency else NormalRouter)(wrapper, RouterOptions(quant=_quant(spec)))
        iters, warmup = (spec.sweep_iters, 2) if job.sweep else (spec.iters, spec.warmup)
        trips: dict[str, Optional[Callable[[], Any]]] = {"router": _router_round_trip(router, x, ids, w)}
        if not job.sweep:
            trips["raw"] = _raw_round_trip(wrapper, job.low_latency, x, ids, w, spec)
            trips["raw_weighted"] = _raw_round_trip(wrapper, job.low_latency, x, ids, w, spec, weighted=True)
        row: dict[str, Any] = {
            "backend": wrapper.backend.value, "mode": job.mode, "variant": job.variant, "tokens": job.tokens,
            "sweep": job.sweep, "validation": router.validation.value, "buffer_bytes": wrapper.buffer_bytes,
            "device_bytes": int(used), "layout_ops": getattr(router, "layout_ops", None) if job.low_latency else None,
            "weighting": getattr(trips.get("raw_weighted"), "name", None),
            "bytes": logical_bytes(world, job.tokens, spec)}
        row["floor_us"] = row["bytes"] / NVLINK_BYTES_PER_S * 1e6
        for name, trip in trips.items():
            row[f"{name}_us"] = None
            if trip is not None:
                timer.time_into(row, f"{name}_us", trip, iters, warmup, wrapper.group)
        graphs: dict[str, Callable[[], Any]] = {}
        if job.low_latency and cuda and spec.graphs:
            for name, trip in trips.items():
                if trip is not None:
                    graphs[name] = _graph_round_trip(trip, wrapper.group)
                    timer.time_into(row, f"{name}_graph_us", graphs[name], iters, warmup, wrapper.group)
        if job.sweep:
            row["sms_used"] = _sms_used(wrapper, job, spec)
        if spec.profile_path and job.tokens <= 128 and not job.sweep:
            label = f"{row['backend']} {job.mode} {job.variant} {job.tokens}".replace("  ", " ")
            row["kernels"] = profile_trips(label, trips, graphs, rank, spec.profile_path, wrapper.group, cuda)
            dist.barrier(group=wrapper.group)
            row["host_us"] = host_breakdown(router, trips["router"], trips.get("raw"), 20)
        del graphs
        return row
    finally:
        DeepEPWrapper.reset()


def _sms_used(wrapper: Any, job: Job, spec: BenchSpec) -> Optional[int]:
    """The SM count the elastic kernels ran with: the setting, or DeepEP's model for 0 (None if unknown)."""
    requested = dict(job.overrides).get("num_sms", 0)
    if requested:
        return int(requested)
    theoretical = getattr(wrapper.native_buffer, "get_theoretical_num_sms", None)
    try:
        return int(theoretical(spec.num_experts, spec.topk)) if theoretical else None
    except Exception:  # the model reads nvidia-smi; never fail a benchmark over a label
        return None
