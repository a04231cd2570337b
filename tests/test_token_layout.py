"""The elastic low-latency token layout (non-expand dispatch, expanded by deepep-switch): the torch versions
against explicit loops (CPU); the Triton kernels against the torch versions under Triton's interpreter (CPU, when
Triton is installed) and on a GPU."""

from __future__ import annotations

import textwrap

import pytest
import torch

from _helpers import run_in_triton_interpreter
from deepep_switch.kernels.token_layout import (TORCH_TOKEN_OPS, fold_tokens_torch, pack_tokens_torch,
                                                token_ops_for, token_slots_torch)


def random_rows(seed: int, rows: int, valid: int, topk: int, local: int, hidden: int = 256, repeat: bool = False,
                device: str = "cpu"):
    """Non-expand dispatch output: ``valid`` initialised rows of local ids / -1 (each row has at least one local
    id), then a garbage tail (ids that are neither -1 nor in range, NaN rows)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, topk), -1, dtype=torch.int64)
    for i in range(valid):
        chosen = torch.randperm(local, generator=gen)[:topk]
        keep = torch.rand(topk, generator=gen) < 0.6
        keep[0] = True
        ids[i] = torch.where(keep, chosen, torch.full_like(chosen, -1))
        if repeat and i % 3 == 0 and topk > 1:
            ids[i, 1] = ids[i, 0]
    ids[valid:] = torch.randint(-(1 << 20), 1 << 20, (rows - valid, topk), generator=gen)
    x = torch.randn((rows, hidden), generator=gen).to(torch.bfloat16)
    x[valid:] = float("nan")
    w = torch.rand((rows, topk), generator=gen)
    return ids.to(device), x.to(device), w.to(device), torch.tensor([valid], dtype=torch.int32, device=device)


def loop_slots(ids: torch.Tensor, valid: int, local: int, capacity: int):
    dest = torch.full(ids.shape, -1, dtype=torch.int32)
    counts = [0] * local
    for i in range(valid):
        for j in range(ids.shape[1]):
            e = int(ids[i, j])
            if 0 <= e < local:
                dest[i, j] = e * capacity + counts[e]
                counts[e] += 1
    return dest, torch.tensor(counts, dtype=torch.int32)


CASES = [(0, 12, 9, 4, 6, 12), (1, 30, 30, 8, 16, 40), (2, 8, 0, 2, 4, 8), (3, 16, 5, 1, 3, 16), (4, 20, 11, 3, 3, 33)]


@pytest.mark.parametrize("seed,rows,valid,topk,local,capacity", CASES)
def test_slots_pack_and_fold_match_loops(seed, rows, valid, topk, local, capacity):
    ids, x, w, valid_t = random_rows(seed, rows, valid, topk, local)
    want_dest, want_counts = loop_slots(ids, valid, local, capacity)
    dest, counts = token_slots_torch(ids, valid_t, local, capacity)
    assert torch.equal(dest, want_dest) and torch.equal(counts, want_counts)

    sf = torch.rand(rows, 2)
    expert_x, expert_sf, dest2, counts2 = pack_tokens_torch(x, sf, ids, valid_t, local, capacity)
    assert torch.equal(dest2, want_dest) and torch.equal(counts2, want_counts)
    assert expert_x.shape == (local, capacity, x.shape[1]) and expert_sf.shape == (local, capacity, 2)
    assert expert_sf.stride(1) == 1  # DeepEP's layout: the token dimension is contiguous
    for i in range(valid):
        for j in range(topk):
            d = int(want_dest[i, j])
            if d >= 0:
                assert torch.equal(expert_x[d // capacity, d % capacity], x[i])
                assert torch.equal(expert_sf[d // capacity, d % capacity], sf[i])

    y = torch.full((local, capacity, x.shape[1]), float("nan")).to(torch.bfloat16)  # NaN where no slot
    flat = y.view(-1, x.shape[1])
    for d in want_dest[want_dest >= 0].tolist():
        flat[d] = torch.randn(x.shape[1]).to(torch.bfloat16)
    out = fold_tokens_torch(y, dest, w)
    assert out.shape == (rows, x.shape[1]) and out.dtype == torch.bfloat16
    for i in range(valid):
        acc = torch.zeros(x.shape[1])
        for j in range(topk):
            d = int(want_dest[i, j])
            if d >= 0:
                acc += w[i, j] * flat[d].float()
        assert torch.equal(out[i], acc.to(torch.bfloat16)), i
    assert not torch.isnan(out[:valid].float()).any()


def test_positions_are_grouped_by_source_row_order():
    """Inside each expert, slots follow the received row order, so rows grouped by source rank stay grouped."""
    ids, _, _, valid_t = random_rows(9, 40, 40, 4, 5)
    dest, counts = token_slots_torch(ids, valid_t, 5, 40)
    for e in range(5):
        rows_in_order = [i for i in range(40) for j in range(4) if int(ids[i, j]) == e]
        slots = sorted((int(dest[i, j]) % 40, i) for i in range(40) for j in range(4) if int(ids[i, j]) == e)
        assert [i for _, i in slots] == rows_in_order
        assert int(counts[e]) == len(rows_in_order)


def test_repeated_ids_get_distinct_slots():
    ids, x, _, valid_t = random_rows(5, 9, 9, 3, 4, repeat=True)
    want_dest, want_counts = loop_slots(ids, 9, 4, 27)
    dest, counts = token_slots_torch(ids, valid_t, 4, 27)
    assert torch.equal(dest, want_dest) and torch.equal(counts, want_counts)
    taken = dest[dest >= 0]
    assert taken.unique().numel() == taken.numel()


def test_fp8_rows_pack_as_bytes():
    ids, x, _, valid_t = random_rows(6, 10, 7, 2, 3)
    q = x.float().clamp(-400, 400).nan_to_num(0.0).to(torch.float8_e4m3fn)
    expert_x, _, dest, _ = pack_tokens_torch(q, None, ids, valid_t, 3, 10)
    for i in range(7):
        for d in dest[i][dest[i] >= 0].tolist():
            assert torch.equal(expert_x.view(-1, x.shape[1])[d].view(torch.uint8), q[i].view(torch.uint8))


def test_cpu_tensors_use_the_torch_ops():
    assert token_ops_for(torch.device("cpu")) is TORCH_TOKEN_OPS


_INTERPRETED = textwrap.dedent("""
    import torch
    from deepep_switch.kernels.token_layout import fold_tokens_torch, pack_tokens_torch
    from deepep_switch.kernels.triton_token_layout import fold_tokens_triton, pack_tokens_triton
    from tests.test_token_layout import random_rows
    for seed, rows, valid, topk, local, capacity, hidden in [(0, 12, 9, 4, 6, 12, 256), (1, 40, 33, 8, 16, 40, 384),
                                                            (2, 6, 0, 2, 3, 6, 128), (3, 9, 9, 3, 4, 27, 128),
                                                            (4, 9, 9, 3, 4, 4, 128)]:
        ids, x, w, valid_t = random_rows(seed, rows, valid, topk, local, hidden, repeat=seed == 3)
        sf = torch.rand(rows, hidden // 128)
        ex, esf, dest, counts = pack_tokens_triton(x, sf, ids, valid_t, local, capacity)
        rx, rsf, rdest, rcounts = pack_tokens_torch(x, sf, ids, valid_t, local, capacity)
        assert torch.equal(dest[:valid], rdest[:valid]) and torch.equal(counts, rcounts), (seed, dest, rdest)
        assert esf.stride() == rsf.stride(), (esf.stride(), rsf.stride())
        for e in range(local):
            n = int(counts[e])
            assert torch.equal(ex[e, :n].view(torch.int16), rx[e, :n].view(torch.int16)), seed
            assert torch.equal(esf[e, :n], rsf[e, :n]), seed
        y = torch.randn(local, capacity, hidden).to(torch.bfloat16)
        got = fold_tokens_triton(y, dest, w, valid_t)[:valid].float()
        want = fold_tokens_torch(y, rdest, w)[:valid].float()
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2), (seed, (got - want).abs().max())
        q = x.float().clamp(-400, 400).nan_to_num(0.0).to(torch.float8_e4m3fn)
        qx, _, _, _ = pack_tokens_triton(q, None, ids, valid_t, local, capacity)
        rq, _, _, _ = pack_tokens_torch(q, None, ids, valid_t, local, capacity)
        for e in range(local):
            n = int(counts[e])
            assert torch.equal(qx[e, :n].view(torch.uint8), rq[e, :n].view(torch.uint8)), seed
    print("interpreted ok")
""")


def test_triton_kernels_match_torch_in_the_interpreter(tmp_path):
    """The Triton kernels under ``TRITON_INTERPRET=1`` (NumPy on the CPU): the code path the GPU runs, checked
    here before any GPU sees it. Skipped where Triton is not installed or its interpreter cannot run."""
    run_in_triton_interpreter(_INTERPRETED, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_token_kernels_match_torch_on_gpu(fp8):
    from deepep_switch.kernels.triton_token_layout import fold_tokens_triton, pack_tokens_triton

    device = "cuda"
    rows, valid, topk, local, hidden = 256, 201, 8, 32, 7168
    capacity = rows
    ids, x, w, valid_t = random_rows(21, rows, valid, topk, local, hidden, device=device)
    sf = torch.rand(rows, hidden // 128, device=device) if fp8 else None
    if fp8:
        x = x.float().clamp(-400, 400).nan_to_num(0.0).to(torch.float8_e4m3fn)
    ex, esf, dest, counts = pack_tokens_triton(x, sf, ids, valid_t, local, capacity)
    rx, rsf, rdest, rcounts = pack_tokens_torch(x, sf, ids, valid_t, local, capacity)
    assert torch.equal(dest[:valid], rdest[:valid]) and torch.equal(counts, rcounts)
    for e in range(local):
        n = int(counts[e])
        assert torch.equal(ex[e, :n].view(torch.uint8), rx[e, :n].view(torch.uint8))
        if fp8:
            assert torch.equal(esf[e, :n], rsf[e, :n])
    y = torch.randn(local, capacity, hidden, device=device).to(torch.bfloat16)
    got = fold_tokens_triton(y, dest, w, valid_t)[:valid]
    want = fold_tokens_torch(y, rdest, w)[:valid]
    # Same fp32 terms, summed in a different order: at most a rounding step of bf16 apart.
    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(fold_tokens_triton(y, dest, w, valid_t)[:valid], got)  # deterministic


def test_an_expert_never_overflows_its_capacity():
    """Repeated ids (validation off) could name one expert more than C times: the extra entries are dropped."""
    ids = torch.zeros((4, 3), dtype=torch.int64)  # every entry names local expert 0
    dest, counts = token_slots_torch(ids, torch.tensor([4]), 2, 5)
    assert int(counts[0]) == 5 and int(counts[1]) == 0
    assert sorted(dest[dest >= 0].tolist()) == [0, 1, 2, 3, 4] and int((dest < 0).sum()) == 7
