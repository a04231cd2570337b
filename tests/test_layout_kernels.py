"""The elastic low-latency layout conversion: torch versions against explicit loops (CPU); Triton vs torch (GPU)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from _helpers import run_in_triton_interpreter
from deepep_switch.kernels.layout import (TORCH_OPS, layout_ops_for, pack_rows_torch, row_weighter_for,
                                          unpack_rows_torch, weight_rows_torch)


def random_layout(seed: int, experts: int, capacity: int, alignment: int = 1, slack: int = 5):
    """Expanded rows as ElasticBuffer lays them out: expert e at [start[e], start[e]+count[e]), aligned starts."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, capacity + 1, (experts,), generator=gen)
    counts[torch.randint(0, experts, (1,), generator=gen)] = 0  # always one empty expert
    aligned = (counts + alignment - 1) // alignment * alignment
    start = torch.cumsum(aligned, 0) - aligned
    rows = int(aligned.sum()) + slack  # the worst-case tail past the valid rows
    return (start + counts).to(torch.int32), counts.to(torch.int32), rows  # (end, count, rows)


@pytest.mark.parametrize("seed,experts,capacity,alignment", [(0, 4, 8, 1), (1, 8, 16, 4), (2, 1, 5, 1), (3, 16, 1, 1)])
def test_pack_and_unpack_match_loops(seed, experts, capacity, alignment):
    end, counts, num_rows = random_layout(seed, experts, capacity, alignment)
    start = end - counts
    hidden, scales = 256, 2
    rows = torch.randn(num_rows, hidden).to(torch.bfloat16)
    sf = torch.rand(num_rows, scales)
    weights = torch.rand(num_rows)

    packed = pack_rows_torch(rows, end, counts, capacity)
    sf_out = torch.empty(experts, scales, capacity).transpose(1, 2)  # DeepEP's column-major scale layout
    pack_rows_torch(sf, end, counts, capacity, out=sf_out)
    y = torch.randn(experts, capacity, hidden).to(torch.bfloat16)
    unpacked = unpack_rows_torch(y, weights, end, counts, num_rows)
    assert unpacked.shape == (num_rows, hidden) and unpacked.dtype == torch.bfloat16
    assert sf_out.stride(1) == 1

    for e in range(experts):
        s, n = int(start[e]), int(counts[e])
        assert torch.equal(packed[e, :n], rows[s:s + n]), e
        assert torch.equal(sf_out[e, :n], sf[s:s + n]), e
        expected = (y[e, :n].float() * weights[s:s + n, None]).to(torch.bfloat16)
        assert torch.equal(unpacked[s:s + n], expected), e


def test_nan_in_unused_rows_never_reaches_valid_rows():
    end, counts, num_rows = random_layout(7, 6, 10)
    start = end - counts
    y = torch.full((6, 10, 128), float("nan")).to(torch.bfloat16)
    for e in range(6):
        y[e, :int(counts[e])] = 1.0
    out = unpack_rows_torch(y, torch.ones(num_rows), end, counts, num_rows)
    for e in range(6):
        s, n = int(start[e]), int(counts[e])
        assert bool((out[s:s + n] == 1.0).all())


def test_cpu_tensors_use_the_torch_ops():
    assert layout_ops_for(torch.device("cpu")) is TORCH_OPS


def test_weighting_of_expanded_rows():
    rows = torch.randn(7, 256).to(torch.bfloat16)
    w = torch.rand(7)
    want = (rows.float() * w[:, None]).to(torch.bfloat16)
    assert torch.equal(weight_rows_torch(rows.clone(), w, torch.tensor([7], dtype=torch.int32)), want)
    assert row_weighter_for(torch.device("cpu"))[0] == "torch (all rows)"


_INTERPRETED = textwrap.dedent("""
    import torch
    from deepep_switch.kernels.layout import pack_rows_torch, unpack_rows_torch
    from deepep_switch.kernels.triton_layout import pack_rows_triton, unpack_rows_triton, weight_rows_triton
    from test_layout_kernels import random_layout
    end, counts, num_rows = random_layout(11, 6, 20, 1)
    start = end - counts
    rows = torch.randn(num_rows, 256).to(torch.bfloat16)
    got, want = pack_rows_triton(rows, end, counts, 20), pack_rows_torch(rows, end, counts, 20)
    y = torch.randn(6, 20, 256).to(torch.bfloat16)
    w = torch.rand(num_rows)
    un_got, un_want = unpack_rows_triton(y, w, end, counts, num_rows), unpack_rows_torch(y, w, end, counts, num_rows)
    # The interpreter's fp32 -> bf16 cast is not round-to-nearest-even (the GPU's is, and there the kernels are
    # bitwise equal to torch: GPU test below): one bf16 step apart at most.
    def close(a, b):
        return torch.allclose(a.float(), b.float(), rtol=1 / 64, atol=1e-6)

    for e in range(6):
        s, n = int(start[e]), int(counts[e])
        assert torch.equal(got[e, :n], want[e, :n]) and close(un_got[s:s + n], un_want[s:s + n]), e
    total = int(end[-1])
    weighted = weight_rows_triton(rows.clone(), w, end[-1:].clone())
    assert close(weighted[:total], (rows[:total].float() * w[:total, None]).to(torch.bfloat16))
    assert torch.equal(weighted[total:].view(torch.int16), rows[total:].view(torch.int16))  # past the count: untouched
    print("interpreted ok")
""")


def test_triton_layout_kernels_match_torch_in_the_interpreter(tmp_path):
    """pack/unpack and the bench's row weighting under ``TRITON_INTERPRET=1`` (skipped without Triton)."""
    run_in_triton_interpreter(_INTERPRETED, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_triton_kernels_match_torch_on_gpu(dtype):
    from deepep_switch.kernels.triton_layout import pack_rows_triton, unpack_rows_triton

    device = torch.device("cuda", 0)
    end, counts, num_rows = random_layout(11, 16, 256, 1)
    start = end - counts
    end, counts = end.to(device), counts.to(device)
    hidden = 7168
    rows = torch.randn(num_rows, hidden, device=device).to(dtype)
    sf = torch.rand(num_rows, hidden // 128, device=device)
    weights = torch.rand(num_rows, device=device)
    got = pack_rows_triton(rows, end, counts, 256)
    want = pack_rows_torch(rows, end, counts, 256)
    sf_got = torch.empty(16, hidden // 128, 256, device=device).transpose(1, 2)
    sf_want = torch.empty_like(sf_got)
    pack_rows_triton(sf, end, counts, 256, out=sf_got)
    pack_rows_torch(sf, end, counts, 256, out=sf_want)
    y = torch.randn(16, 256, hidden, device=device).to(torch.bfloat16)
    un_got = unpack_rows_triton(y, weights, end, counts, num_rows)
    un_want = unpack_rows_torch(y, weights, end, counts, num_rows)
    for e in range(16):
        s, n = int(start[e]), int(counts[e])
        assert torch.equal(got[e, :n].view(torch.uint8), want[e, :n].view(torch.uint8))
        assert torch.equal(sf_got[e, :n], sf_want[e, :n])
        assert torch.equal(un_got[s:s + n], un_want[s:s + n])


@pytest.mark.gpu
@pytest.mark.parametrize("round_scale", [False, True])
def test_triton_fp8_quantiser_matches_the_reference(round_scale):
    from deepep_switch.quant.fp8 import dequantize_fp8, quantize_fp8
    from deepep_switch.quant.triton_fp8 import quantize_fp8_triton

    x = (torch.randn(333, 7168, device="cuda") * torch.rand(333, 1, device="cuda") * 10).to(torch.bfloat16)
    x[7] = 0  # an all-zero token uses the 1e-4 floor
    q, s = quantize_fp8_triton(x, round_scale)
    q_ref, s_ref = quantize_fp8(x, round_scale)
    assert q.shape == q_ref.shape and s.shape == s_ref.shape and q.dtype == torch.float8_e4m3fn
    # Scales are bit-exact (IEEE division, as DeepEP's kernel). Triton's fp32 -> e4m3 cast may round a rare tie
    # differently from torch's: such codes differ by one e4m3 step (at most 1/8 relative), never more.
    assert torch.equal(s, s_ref)
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert differ.float().mean().item() < 1e-3
    a, b = dequantize_fp8(q, s)[differ], dequantize_fp8(q_ref, s_ref)[differ]
    assert bool(((a - b).abs() <= 0.125 * torch.maximum(a.abs(), b.abs()) + 1e-12).all())
    empty_q, empty_s = quantize_fp8_triton(x[:0], round_scale)
    assert empty_q.shape == (0, 7168) and empty_s.shape == (0, 56)


@pytest.mark.gpu
def test_triton_row_weighting_matches_torch_on_gpu():
    from deepep_switch.kernels.triton_layout import weight_rows_triton

    rows = torch.randn(300, 7168, device="cuda").to(torch.bfloat16)
    w = torch.rand(300, device="cuda")
    total = torch.tensor([211], dtype=torch.int32, device="cuda")
    got = weight_rows_triton(rows.clone(), w, total)
    assert torch.equal(got[:211], (rows[:211].float() * w[:211, None]).to(torch.bfloat16))
    assert torch.equal(got[211:], rows[211:])  # past the valid rows: untouched
    assert row_weighter_for(torch.device("cuda", 0))[0] == "triton (valid rows)"
