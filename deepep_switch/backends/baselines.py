"""Helpers for the benchmark baselines (``BackendSpec.raw_round_trip``) and bench's router round trip.

A benchmark compares communication, not expert compute: the "executor" between dispatch and combine must cost
the same (nothing) on every side. With bf16 payloads the identity is free (the received tensor is passed on);
with FP8 payloads the combine needs bf16 rows of the payload's shape, and converting the FP8 rows would charge
one side for a full pass over worst-case buffers (the legacy low-latency ``[E_local, R*N, H]`` is ~58M elements at
H=7168, E=64, N=128 on 2 ranks, ~100 us). :class:`Bf16Outputs` hands out one preallocated bf16 tensor per shape
instead: a host dictionary lookup, no device work.
"""

from __future__ import annotations

import torch


class Bf16Outputs:
    """An identity executor's output for FP8 payloads: a zero-filled bf16 tensor of ``like``'s shape and device,
    allocated on first use of each shape and reused (its contents are whatever the last combine left: the
    benchmark does not read them)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[torch.Size, torch.device], torch.Tensor] = {}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.shape, like.device)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = torch.zeros(like.shape, dtype=torch.bfloat16, device=like.device)
        return out
