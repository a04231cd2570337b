"""Capture one step in a CUDA graph the way every multi-rank user here does (bench, ab, metrics-bench, the GPU
tests): warm the step up once on a side stream (Triton/DeepEP JIT, allocator, cached SM counts), wait, let every
rank arrive (a rank must not capture while a peer still runs eager communication), then capture."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


def capture(step: Callable[[], Any], group: Optional[dist.ProcessGroup] = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``(graph, output)``: ``step`` captured once after one warm-up call and a barrier on ``group`` (None: the
    default group). ``output`` is what the captured call returned; a replay rewrites it in place. The graph reads
    ``step``'s input tensors at every replay, so the caller keeps them alive as long as the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier(group=group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    torch.cuda.synchronize()
    return graph, output
