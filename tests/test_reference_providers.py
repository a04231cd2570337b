"""Multi-process (gloo) checks of the reference providers against DeepEP 2.1.0's semantics (and 2.5's EPBuffer,
which moves tokens as 2.1's ElasticBuffer does).

One ``spawn`` per world size (2 and 4 ranks) runs every case on every rank (``tests/_ref_workers.py``) and brings
the raw outputs back. The expectations below are computed here, in one process, with plain Python loops over all
ranks' regenerated inputs: they follow DeepEP 2.1.0's documented semantics (legacy normal, low-latency, ElasticBuffer) and never call the
providers' own code paths.

Notation as in the semantics doc: R ranks, E experts, L = E/R local experts, owner(e) = e // L, rank s holds
X_s [T_s,H], I_s [T_s,K], W_s [T_s,K]; D_s(t) = {owner(I_s[t,j]) : I_s[t,j] >= 0}; S_{s->r} = {t : r in D_s(t)}.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest
import torch

from _ref_workers import make_inputs, run_cases
from deepep_switch.launch import spawn

pytestmark = pytest.mark.timeout(200)

SPAWN_TIMEOUT_S = 120
FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------- cases
def _case(name: str, world: int, tokens: list[int], hidden: int, experts: int, topk: int, align: int,
          drop: float, seed: int, elastic_m: int | None = None) -> dict:
    assert len(tokens) == world and experts % world == 0 and hidden % 128 == 0
    n = max(max(tokens), 1)
    return dict(name=name, world=world, tokens=tokens, hidden=hidden, experts=experts, topk=topk, align=align,
                drop=drop, seed=seed, ll_n=n + 3, elastic_m=elastic_m or n + 5)


def _random_case(name: str, world: int, seed: int) -> dict:
    rng = random.Random(seed)
    experts = rng.choice([e for e in (8, 16, 32, 64) if e % world == 0])
    tokens = [rng.randint(0, 48) for _ in range(world)]
    tokens[rng.randrange(world)] = 0
    return _case(name, world, tokens, rng.choice([128, 256]), experts, rng.randint(1, min(8, experts)),
                 rng.choice([1, 2, 4, 8]), rng.choice([0.0, 0.1, 0.3]), seed)


CASES: dict[int, list[dict]] = {
    2: [
        _case("ep2_rank0_empty_e8_k4_a1", 2, [0, 37], 128, 8, 4, 1, 0.2, 11),
        _case("ep2_uneven_e16_k6_a4", 2, [23, 9], 256, 16, 6, 4, 0.1, 12),
        _case("ep2_e64_k8_a128", 2, [40, 41], 128, 64, 8, 128, 0.3, 13, elastic_m=64),
        _random_case("ep2_random", 2, 14),
    ],
    4: [
        _case("ep4_rank1_empty_e8_k3_a1", 4, [12, 0, 30, 7], 128, 8, 3, 1, 0.15, 21),
        _case("ep4_uneven_e64_k8_a128", 4, [25, 31, 1, 0], 256, 64, 8, 128, 0.25, 22),
        _random_case("ep4_random", 4, 24),
    ],
}


# ---------------------------------------------------------------------------------------------------- model
class Model:
    """Every rank's inputs for one case and the DeepEP-semantics expectations, computed with plain loops."""

    def __init__(self, case: dict) -> None:
        self.case = case
        self.name = case["name"]
        self.R, self.E, self.K, self.H = case["world"], case["experts"], case["topk"], case["hidden"]
        self.L = self.E // self.R
        self.A = case["align"]
        self.M = case["elastic_m"]
        self.inp = [make_inputs(case, s) for s in range(self.R)]
        self.ids = [i["ids"].tolist() for i in self.inp]
        self.w = [i["w"].tolist() for i in self.inp]

    def T(self, s: int) -> int:
        return self.case["tokens"][s]

    @functools.lru_cache(maxsize=None)
    def dests(self, s: int, t: int) -> tuple[int, ...]:
        return tuple(sorted({e // self.L for e in self.ids[s][t] if e >= 0}))

    @functools.lru_cache(maxsize=None)
    def sent(self, s: int, r: int) -> tuple[int, ...]:
        """S_{s->r}, ascending."""
        return tuple(t for t in range(self.T(s)) if r in self.dests(s, t))

    @functools.lru_cache(maxsize=None)
    def legacy_rows(self, r: int) -> tuple[tuple[int, int], ...]:
        """(source rank, token) of every row rank r receives, in legacy order."""
        return tuple((s, t) for s in range(self.R) for t in self.sent(s, r))

    def local_ids(self, r: int, s: int, t: int) -> list[int]:
        return [e - r * self.L if e >= 0 and e // self.L == r else -1 for e in self.ids[s][t]]

    def kept_w(self, r: int, s: int, t: int) -> list[float]:
        return [wv if i >= 0 else 0.0 for wv, i in zip(self.w[s][t], self.local_ids(r, s, t))]

    def masked_w(self, s: int) -> torch.Tensor:
        """W_s with 0.0 where I_s == -1."""
        return torch.tensor([[wv if e >= 0 else 0.0 for wv, e in zip(ws, es)] for ws, es in
                             zip(self.w[s], self.ids[s])], dtype=torch.float32).reshape(self.T(s), self.K)

    @functools.lru_cache(maxsize=None)
    def expert_counts(self, r: int) -> tuple[int, ...]:
        """c_l = #{(s,t,j) : I_s[t,j] == r*L + l}."""
        c = [0] * self.L
        for s in range(self.R):
            for row in self.ids[s]:
                for e in row:
                    if e >= 0 and e // self.L == r:
                        c[e - r * self.L] += 1
        return tuple(c)

    def aligned(self, r: int, a: int | None = None) -> list[int]:
        a = a or self.A
        return [-(-c // a) * a for c in self.expert_counts(r)]

    def rows_of(self, key: str, rows: Any) -> torch.Tensor:
        """Stack ``inp[s][key][t]`` for (s, t) in rows."""
        rows = list(rows)
        if not rows:
            ref = self.inp[0][key]
            return ref.new_empty((0, *ref.shape[1:]))
        return torch.stack([self.inp[s][key][t] for s, t in rows])

    def rank_prefix_matrix(self) -> list[list[int]]:
        return [[sum(len(self.sent(s2, r)) for s2 in range(s + 1)) for r in range(self.R)] for s in range(self.R)]

    def num_recv(self, r: int) -> int:
        return len(self.legacy_rows(r))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view for exact comparisons (NaN-safe, -0.0 != 0.0)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == FP8:
        return t.view(torch.uint8)
    return t


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def fp8_from_u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(FP8)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's ``utils/math.py`` similarity measure."""
    x, y = x.double() + 1, y.double() + 1
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom)


def group_ends(psum: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(v) for v in psum.tolist()]
    return list(zip([0] + ends[:-1], ends))


def legacy_combined(model: Model, s: int) -> torch.Tensor:
    """combined[t] = bf16(|D_s(t)| * f32(X_s[t])), exact: n <= 4 copies of a bf16 value sum exactly in fp32."""
    n = torch.tensor([len(model.dests(s, t)) for t in range(model.T(s))], dtype=torch.float32).unsqueeze(1)
    # A token routed nowhere combines to +0.0 (nothing is added), not to 0 * x (which may be -0.0).
    return torch.where(n > 0, model.inp[s]["x"].float() * n, torch.zeros(())).to(torch.bfloat16)


def expand_combined(model: Model, s: int) -> torch.Tensor:
    """Expand combine (allow_multiple_reduction): bf16( Σ_r f32( bf16( c_r(t) * x ) ) ), c_r = #j with owner r."""
    x = model.inp[s]["x"].float()
    out = torch.zeros_like(x)
    for t in range(model.T(s)):
        for r in model.dests(s, t):
            c = sum(1 for e in model.ids[s][t] if e >= 0 and e // model.L == r)
            out[t] += (x[t] * c).to(torch.bfloat16).float()
    return out.to(torch.bfloat16)


def fp8_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|dequant - x| bound for e4m3 with per-128 scale: half an ulp (2^-4 relative) or half the subnormal step."""
    groups = x.float().reshape(*x.shape[:-1], -1, 128)
    bound = torch.maximum(groups.abs() * 2.0 ** -4, scale.unsqueeze(-1) * 2.0 ** -9) * 1.001 + 1e-12
    return bound.reshape(x.shape)


# ---------------------------------------------------------------------------------------------------- fixture
class World:
    def __init__(self, world: int, results: list[dict]) -> None:
        self.world = world
        self.results = results
        self.models = [Model(c) for c in CASES[world]]

    def each(self, kind: str):
        """Yield (model, rank, label, that rank's outputs of ``kind`` for the case)."""
        for model in self.models:
            for r in range(self.world):
                yield model, r, f"{model.name} rank {r}", self.results[r][model.name][kind]


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def ep(request) -> World:
    world = request.param
    results = spawn(run_cases, world, args=(CASES[world],), backend="gloo", env={"OMP_NUM_THREADS": "1"},
                    timeout_s=SPAWN_TIMEOUT_S)
    return World(world, results)


# ---------------------------------------------------------------------------------------------------- sanity
@pytest.mark.parametrize("world", [2, 4])
def test_cases_cover_the_edge_shapes(world):
    models = [Model(c) for c in CASES[world]]
    assert any(0 in m.case["tokens"] for m in models), "some rank must have 0 tokens"
    assert any(len(set(m.case["tokens"])) > 1 for m in models), "token counts must be uneven"
    assert any(any(e < 0 for s in range(m.R) for row in m.ids[s] for e in row) for m in models), "need -1 ids"
    assert any(any(not m.dests(s, t) for s in range(m.R) for t in range(m.T(s))) for m in models), \
        "need a token routed nowhere"
    assert any(any(len([e for e in row if e >= 0]) > len(m.dests(s, t))
                   for s in range(m.R) for t, row in enumerate(m.ids[s])) for m in models), \
        "need a token with two experts on one rank"
    assert {m.A for m in models} & {1} and any(m.A > 1 for m in models), "need alignment 1 and > 1"
    assert all(8 <= m.E <= 64 and m.E % world == 0 and m.H % 128 == 0 for m in models)


# ---------------------------------------------------------------------------------------------------- legacy normal
def test_legacy_get_dispatch_layout(ep):
    for m, r, label, out in ep.each("legacy"):
        lay = out["layout"]
        T = m.T(r)
        assert lay["per_rdma"] is None, f"{label}: num_tokens_per_rdma_rank must be None intranode"
        exp_in_rank = torch.tensor([[q in m.dests(r, t) for q in range(m.R)] for t in range(T)],
                                   dtype=torch.bool).reshape(T, m.R)
        assert lay["in_rank"].dtype == torch.bool and torch.equal(lay["in_rank"], exp_in_rank), \
            f"{label}: is_token_in_rank"
        exp_per_rank = torch.tensor([len(m.sent(r, q)) for q in range(m.R)], dtype=torch.int32)
        assert lay["per_rank"].dtype == torch.int32 and torch.equal(lay["per_rank"], exp_per_rank), \
            f"{label}: num_tokens_per_rank {lay['per_rank'].tolist()} != {exp_per_rank.tolist()}"
        exp_per_expert = [0] * m.E
        for row in m.ids[r]:
            for e in row:
                if e >= 0:
                    exp_per_expert[e] += 1
        assert lay["per_expert"].dtype == torch.int32 and lay["per_expert"].tolist() == exp_per_expert, \
            f"{label}: num_tokens_per_expert"


def test_legacy_dispatch_rows_and_order(ep):
    for m, r, label, out in ep.each("legacy"):
        d = out["dispatch"]
        rows = m.legacy_rows(r)
        assert d["x"].shape == (len(rows), m.H), f"{label}: recv_x shape {tuple(d['x'].shape)}, {len(rows)} rows"
        assert bitwise_equal(d["x"], m.rows_of("x", rows)), f"{label}: recv_x rows/order (source rank, token)"
        assert d["src_idx"].tolist() == [t for _, t in rows], f"{label}: handle[3] recv_src_idx"


def test_legacy_dispatch_ids_weights_counts(ep):
    for m, r, label, out in ep.each("legacy"):
        d = out["dispatch"]
        rows = m.legacy_rows(r)
        exp_idx = [m.local_ids(r, s, t) for s, t in rows]
        exp_w = torch.tensor([m.kept_w(r, s, t) for s, t in rows], dtype=torch.float32).reshape(len(rows), m.K)
        assert d["idx"].tolist() == exp_idx, f"{label}: recv_topk_idx must be local ids with -1 elsewhere"
        assert bitwise_equal(d["w"], exp_w), f"{label}: recv_topk_weights (kept, exactly 0.0 where id -1)"
        assert d["counts"] == m.aligned(r), f"{label}: counts {d['counts']} != aligned {m.aligned(r)}"
        assert isinstance(d["counts"], list)
        for l, c in enumerate(m.expert_counts(r)):
            assert int((d["idx"] == l).sum()) == c, f"{label}: recv_topk_idx.eq({l}).sum()"


def test_legacy_dispatch_rank_prefix_matrix(ep):
    for m, r, label, out in ep.each("legacy"):
        d = out["dispatch"]
        rpm = d["rpm"]
        assert d["handle_len"] == 6, f"{label}: intranode handle is a 6-tuple"
        assert rpm.dtype == torch.int32 and rpm.tolist() == m.rank_prefix_matrix(), f"{label}: rank_prefix_matrix"
        # DeepEP's own check: the rows [rpm[s-1][r], rpm[s][r]) all come from source rank s.
        start = 0
        rows = m.legacy_rows(r)
        for s in range(m.R):
            end = int(rpm[s][r])
            assert all(src == s for src, _ in rows[start:end]), f"{label}: group of source {s}"
            start = end
        assert start == len(rows)


def test_legacy_dispatch_fp8_tuple(ep):
    for m, r, label, out in ep.each("legacy"):
        f = out["fp8"]
        rows = m.legacy_rows(r)
        assert bitwise_equal(fp8_from_u8(f["q"]), m.rows_of("x_fp8", rows)), f"{label}: FP8 payload bytes"
        assert bitwise_equal(f["s"], m.rows_of("scales", rows)), f"{label}: FP8 scales [T, H/128] f32"
        assert f["s"].shape == (len(rows), m.H // 128)
        assert f["idx"].tolist() == [m.local_ids(r, s, t) for s, t in rows], f"{label}: FP8 recv ids"
        assert f["counts"] == m.aligned(r)
        assert bitwise_equal(fp8_from_u8(f["cached_q"]), m.rows_of("x_fp8", rows)), f"{label}: cached FP8"
        assert bitwise_equal(f["cached_s"], m.rows_of("scales", rows)), f"{label}: cached FP8 scales"


def test_legacy_dispatch_without_topk(ep):
    """DeepEP without topk_idx: the same rows and prefix matrix, no ids or weights, counts from the senders'
    num_tokens_per_expert (aligned), and combine brings the rows back."""
    for m, r, label, out in ep.each("legacy"):
        n, d = out["no_topk"], out["dispatch"]
        assert n["none"] == (True, True, True), label
        assert bitwise_equal(n["x"], d["x"]) and torch.equal(n["rpm"], d["rpm"]), f"{label}: rows as with top-k"
        assert n["counts"] == m.aligned(r), f"{label}: aligned counts {n['counts']}"
        assert torch.equal(n["comb"], out["combine"]["x_nw"]), f"{label}: combine"


def test_legacy_cached_dispatch(ep):
    for m, r, label, out in ep.each("legacy"):
        c = out["cached"]
        rows = m.legacy_rows(r)
        assert c["rest_none"] == [True] * 4, f"{label}: cached dispatch returns (recv_x, None, None, None, None, ev)"
        assert bitwise_equal(c["x"], out["dispatch"]["x"]), f"{label}: cached rows == original rows"
        assert bitwise_equal(c["x2"], m.rows_of("x2", rows)), f"{label}: cached dispatch of new data, same layout"


def test_legacy_num_worst_tokens(ep):
    for m, r, label, out in ep.each("legacy"):
        w = out["worst"]
        n = m.num_recv(r)
        W = w["num"]
        assert w["x"].shape == (W, m.H) and w["idx"].shape == (W, m.K) and w["w"].shape == (W, m.K), \
            f"{label}: num_worst_tokens={W} pads every output"
        d = out["dispatch"]
        assert bitwise_equal(w["x"][:n], d["x"]), f"{label}: first N_recv rows equal the normal result"
        assert torch.equal(w["idx"][:n], d["idx"]) and bitwise_equal(w["w"][:n], d["w"]), f"{label}: ids/weights"
        assert bool((w["idx"][n:] == -1).all()), f"{label}: padded recv_topk_idx must be -1"
        assert w["counts"] == [], f"{label}: num_worst_tokens returns [] counts"
        assert bitwise_equal(w["comb"], legacy_combined(m, r)), f"{label}: combine of the padded tensor"
        assert bitwise_equal(w["comb_w"], m.masked_w(r)), f"{label}: combined weights of the padded tensor"


def test_legacy_combine_is_unweighted_sum(ep):
    for m, r, label, out in ep.each("legacy"):
        c = out["combine"]
        exp = legacy_combined(m, r)
        assert c["x"].dtype == torch.bfloat16 and c["x"].shape == (m.T(r), m.H)
        assert bitwise_equal(c["x"], exp), f"{label}: combined == x * |D(t)| (0 for tokens routed nowhere)"
        assert bitwise_equal(c["x_nw"], exp), f"{label}: combine without topk_weights"
        assert c["w_none"], f"{label}: combined_topk_weights is None without topk_weights"


def test_legacy_combine_topk_weights_and_bias(ep):
    for m, r, label, out in ep.each("legacy"):
        c = out["combine"]
        assert bitwise_equal(c["w"], m.masked_w(r)), \
            f"{label}: combined_topk_weights (sum over ranks of zero-masked recv weights) == W masked to ids >= 0"
        inp = m.inp[r]
        n = torch.tensor([len(m.dests(r, t)) for t in range(m.T(r))], dtype=torch.float64).unsqueeze(1)
        terms = (inp["bias0"].double(), inp["bias1"].double(), inp["x"].double() * n)
        exact = sum(terms)  # bf16(f32(b0) + f32(b1) + Σ f32(y)): one final bf16 rounding (half an ulp, 2^-8 rel)
        bound = exact.abs() * 2.0 ** -8 + sum(t.abs() for t in terms) * 2.0 ** -22
        err = (c["x_bias"].double() - exact).abs()
        assert bool((err <= bound).all()), f"{label}: combine with bias (b0, b1), max error {float(err.max())}"


# ---------------------------------------------------------------------------------------------------- legacy LL
def _ll_blocks(m: Model, r: int, out: dict, label: str):
    """Check recv_count / layout_range / src_info and yield (l, s, slots, tokens) per (expert, source) block."""
    count, lr, src = out["count"], out["layout_range"], out["src_info"]
    assert count.dtype == torch.int32 and count.tolist() == list(m.expert_counts(r)), f"{label}: recv_count"
    assert lr.shape == (m.L, m.R) and lr.dtype == torch.int64, f"{label}: layout_range [L, R] int64"
    assert src.shape == (m.L, m.R * m.case["ll_n"]) and src.dtype == torch.int32, f"{label}: src_info [L, R*N]"
    for l in range(m.L):
        e = r * m.L + l
        covered = []
        for s in range(m.R):
            begin, cnt = int(lr[l, s]) >> 32, int(lr[l, s]) & 0xFFFFFFFF
            exp_tokens = sorted(t for t in range(m.T(s)) for ej in m.ids[s][t] if ej == e)
            assert cnt == len(exp_tokens), f"{label}: layout_range count of expert {l} from source {s}"
            got_tokens = src[l, begin:begin + cnt].tolist()
            assert sorted(got_tokens) == exp_tokens, f"{label}: src_info multiset of expert {l}, source {s}"
            covered.extend(range(begin, begin + cnt))
            yield l, s, list(range(begin, begin + cnt)), got_tokens
        assert sorted(covered) == list(range(int(count[l]))), f"{label}: blocks tile [0, recv_count) of expert {l}"


def test_low_latency_dispatch_bf16_layout(ep):
    for m, r, label, out in ep.each("ll"):
        b = out["bf16"]
        n = m.case["ll_n"]
        assert b["x"].shape == (m.L, m.R * n, m.H) and b["x"].dtype == torch.bfloat16, f"{label}: [L, R*N, H]"
        assert b["handle_len"] == 5 and b["handle_tail"] == (n, m.H, m.E), f"{label}: handle (.., N, H, E)"
        assert torch.equal(b["stats"], b["count"]), f"{label}: cumulative_local_expert_recv_stats"
        checked = 0
        for l, s, slots, tokens in _ll_blocks(m, r, b, label):
            exp = m.rows_of("x", [(s, t) for t in tokens])
            assert bitwise_equal(b["x"][l, slots], exp), f"{label}: rows of expert {l} from source {s}"
            checked += len(slots)
        assert checked == sum(m.expert_counts(r)), f"{label}: one message per (token, expert)"


@pytest.mark.parametrize("variant", ["fp8", "fp8_round"])
def test_low_latency_dispatch_fp8(ep, variant):
    for m, r, label, out in ep.each("ll"):
        f = out[variant]
        n = m.case["ll_n"]
        label = f"{label} {variant}"
        assert f["q_dtype"] == str(FP8) and f["s_dtype"] == "torch.float32"
        assert f["s_shape"] == (m.L, m.R * n, m.H // 128), f"{label}: scales [L, R*N, H/128]"
        assert f["s_stride"][1] == 1 and f["s_stride"][2] == m.R * n, \
            f"{label}: scales token dim contiguous (column-major), strides {f['s_stride']}"
        q = fp8_from_u8(f["q"]).view(m.L, m.R * n, m.H)
        for l, s, slots, tokens in _ll_blocks(m, r, f, label):
            if not slots:
                continue
            x = m.rows_of("x", [(s, t) for t in tokens]).float()
            amax = x.reshape(len(slots), -1, 128).abs().amax(dim=-1).clamp(min=1e-4)
            scale = f["s"][l, slots]
            if variant == "fp8":
                torch.testing.assert_close(scale, amax / 448.0, rtol=2e-7, atol=0,
                                           msg=lambda e: f"{label}: scale = amax/448, expert {l} src {s}: {e}")
            else:
                mant, _ = torch.frexp(scale)
                assert bool((mant == 0.5).all()), f"{label}: round_scale gives powers of two"
                assert bool((scale >= amax / 448.0).all()) and bool((scale < amax / 448.0 * 2).all()), \
                    f"{label}: round_scale is the next power of two of amax/448"
            deq = (q[l, slots].float().reshape(len(slots), -1, 128) * scale.unsqueeze(-1)).reshape(x.shape)
            err = (deq - x).abs()
            assert bool((err <= fp8_bound(x, scale)).all()), \
                f"{label}: dequantised values off by {float(err.max())} (expert {l}, source {s})"


def test_low_latency_combine_weighted(ep):
    for m, r, label, out in ep.each("ll"):
        x = m.inp[r]["x"].float().double()
        wsum = m.masked_w(r).double().sum(dim=1, keepdim=True)
        exp = x * wsum
        for variant, tol in (("bf16", 1e-5), ("fp8", 9e-4), ("fp8_round", 9e-4)):
            got = out[variant]["comb"]
            assert got.dtype == torch.bfloat16 and got.shape == (m.T(r), m.H), f"{label} {variant}: shape"
            assert bool((got[wsum.squeeze(1) == 0] == 0).all()), f"{label} {variant}: tokens routed nowhere are 0"
            if m.T(r):
                diff = calc_diff(got.double(), exp)
                assert diff < tol, f"{label} {variant}: calc_diff(out, x * sum(valid w)) = {diff}"
        torch.testing.assert_close(out["bf16"]["comb"].double(), exp, rtol=2 ** -7, atol=1e-6,
                                   msg=lambda e: f"{label}: bf16 weighted combine {e}")


def test_low_latency_dispatch_ue8m0_packs_exponent_bytes(ep):
    """use_ue8m0: int32 [L, R*N, H/512], token dim contiguous, byte g%4 of int g//4 = the exponent byte of the
    round_scale float scale of group g (DeepEP's extract_required_scale_format); the FP8 data is unchanged."""
    for m, r, label, out in ep.each("ll"):
        u = out["ue8m0"]
        n, slots = m.case["ll_n"], m.R * m.case["ll_n"]
        assert u["s_dtype"] == "torch.int32" and u["s_shape"] == (m.L, slots, 1), f"{label}: [L, R*N, 512/512]"
        assert u["s_stride"][1] == 1, f"{label}: token dim contiguous, strides {u['s_stride']}"
        assert torch.equal(u["q"], u["round_q"]), f"{label}: same FP8 codes as round_scale float scales"
        assert u["count"].tolist() == list(m.expert_counts(r))
        packed = u["s"].reshape(m.L, slots).view(torch.uint8).view(m.L, slots, 4)
        exponent = (u["round_s"].view(torch.int32) >> 23) & 0xFF
        for l, c in enumerate(u["count"].tolist()):
            assert torch.equal(packed[l, :c].to(torch.int32), exponent[l, :c]), f"{label}: exponent bytes, expert {l}"
            # rtp-llm's per_token_cast_back reading of int scales: (byte << 23) viewed as float32
            decoded = (packed[l, :c].to(torch.int32) << 23).view(torch.float32)
            assert torch.equal(decoded, u["round_s"][l, :c]), f"{label}: UE8M0 decodes to the float scale"
        assert "round_scale" in u["without_round_scale"], f"{label}: UE8M0 needs round_scale"


def test_low_latency_zero_copy_combine_reads_the_combine_buffer(ep):
    for m, r, label, out in ep.each("ll"):
        z = out["zero_copy"]
        assert z["shape"] == (m.L, m.R * m.case["ll_n"], m.H) and z["dtype"] == "torch.bfloat16", label
        assert z["uninitialised"] and z["same"], f"{label}: one uninitialised (NaN) tensor per (N, H, E)"
        assert torch.equal(z["comb"], out["bf16"]["comb"]), f"{label}: zero_copy combine == combine of the same rows"


def test_legacy_intranode_nvl_bytes_bound_the_config(ep):
    """DeepEP's intranode EP_HOST_ASSERTs (csrc/legacy/buffer.hpp): a Config needs, per channel (num_sms/2) and
    rank, num_max_nvl_chunked_recv_tokens ring rows of data + source index + top-k ids/weights + FP8 scales."""
    R, H, K = ep.world, 7168, 8
    for r in range(R):
        out = ep.results[r]["nvl_capacity"]
        nvl = int(out["nvl"])
        for label in ("zero", "sized"):
            for key in ("dispatch/default", "dispatch/cfg20_bf16", "dispatch/cfg24_fp8", "combine/default"):
                assert out[f"{label}/{key}"] == "ok", (r, label, key, out[f"{label}/{key}"])
        # a zero-byte reference buffer is unbounded (what the library's own tests build)
        assert out["zero/dispatch/cfg24_bf16"] == "ok" and out["zero/combine/cfg24_bf16"] == "ok"
        c = 24 // 2
        dispatch_need = R * R * 4 + 4 * c * R * 4 + c * R * 256 * (H * 2 + 4 + K * (8 + 4))
        combine_need = 2 * c * R * 4 + c * R * 256 * (H * 2 + 4 + K * 4)
        assert dispatch_need > nvl and combine_need > nvl
        for key, need in (("dispatch", dispatch_need), ("combine", combine_need)):
            msg = out[f"sized/{key}/cfg24_bf16"]
            assert f"needs {need} NVL bytes" in msg and f"num_nvl_bytes={nvl}" in msg, (r, key, msg)


# ---------------------------------------------------------------------------------------------------- elastic
# Every check below runs on both V2-API buffers: DeepEP 2.1's ElasticBuffer and DeepEP 2.5's EPBuffer (which moves
# tokens exactly as 2.1 does; only its API changed, see tests/test_ep.py).
@pytest.fixture(params=["elastic", "ep"])
def v2(request) -> str:
    return request.param


def _check_elastic_rows(m: Model, r: int, label: str, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                        meta: torch.Tensor, psum_rank: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """Check the first n non-expand rows: grouped by source rank, metadata names the row, data matches it.

    Returns the (source rank, token) of each row, in output order.
    """
    exp_psum = [sum(len(m.sent(s, r)) for s in range(q + 1)) for q in range(m.R)]
    assert psum_rank.tolist() == exp_psum, f"{label}: psum_num_recv_tokens_per_scaleup_rank"
    src_global = meta[:n, 0].tolist()
    rows = [(g // m.M, g % m.M) for g in src_global]
    for s, (start, end) in enumerate(group_ends(psum_rank)):
        assert sorted(t for _, t in rows[start:end]) == list(m.sent(s, r)) and \
            all(src == s for src, _ in rows[start:end]), f"{label}: row set of source group {s}"
    assert bitwise_equal(x[:n], m.rows_of("x", rows)), f"{label}: recv_x[i] == X_s[t] for metadata s*M+t"
    assert idx[:n].tolist() == [m.local_ids(r, s, t) for s, t in rows], f"{label}: recv_topk_idx"
    exp_w = torch.tensor([m.w[s][t] for s, t in rows], dtype=torch.float32).reshape(n, m.K)
    assert bitwise_equal(w[:n], exp_w), f"{label}: recv_topk_weights must NOT be zeroed where id is -1"
    return rows


def _sorted_equals_legacy(m: Model, r: int, label: str, x, idx, w, meta, n: int) -> None:
    order = torch.sort(meta[:n, 0].long(), stable=True).indices
    rows = m.legacy_rows(r)
    assert meta[:n, 0][order].tolist() == [s * m.M + t for s, t in rows], f"{label}: sorted src_global"
    assert bitwise_equal(x[:n][order], m.rows_of("x", rows)), f"{label}: sorted rows == legacy rows"
    assert idx[:n][order].tolist() == [m.local_ids(r, s, t) for s, t in rows], f"{label}: sorted ids == legacy"
    legacy_w = torch.tensor([m.kept_w(r, s, t) for s, t in rows], dtype=torch.float32).reshape(n, m.K)
    assert bitwise_equal(w[:n][order].masked_fill(idx[:n][order] < 0, 0.0), legacy_w), \
        f"{label}: sorted weights masked to ids >= 0 == legacy weights"


def test_elastic_dispatch_sync_rows_and_counts(ep, v2):
    for m, r, label, out in ep.each(v2):
        d = out["sync"]
        n = m.num_recv(r)
        assert d["x"].shape == (n, m.H) and d["num_recv_tokens"] == n, f"{label}: N_recv rows with do_cpu_sync"
        assert d["meta"].shape == (n, m.K + 2) and d["meta"].dtype == torch.int32, f"{label}: recv_src_metadata"
        _check_elastic_rows(m, r, label, d["x"], d["idx"], d["w"], d["meta"], d["psum_rank"], n)
        _sorted_equals_legacy(m, r, label, d["x"], d["idx"], d["w"], d["meta"], n)
        assert d["counts_list"] == m.aligned(r), f"{label}: num_recv_tokens_per_expert_list"
        exp_psum = [sum(m.aligned(r)[:l + 1]) for l in range(m.L)]
        assert d["psum_expert"].tolist() == exp_psum, f"{label}: psum_num_recv_tokens_per_expert (aligned)"
        assert d["unaligned"].tolist() == list(m.expert_counts(r)), f"{label}: unaligned counts"
        assert d["stats"].tolist() == list(m.expert_counts(r)), f"{label}: cumulative_local_expert_recv_stats"


def test_elastic_order_is_shuffled_within_groups(ep, v2):
    shuffled = []
    for m, r, label, out in ep.each(v2):
        d = out["sync"]
        n = m.num_recv(r)
        got = d["meta"][:n, 0].tolist()
        legacy = [s * m.M + t for s, t in m.legacy_rows(r)]
        if got != legacy:
            shuffled.append(label)
    assert shuffled, "elastic non-deterministic order never differed from legacy order (it should be shuffled)"


def test_elastic_deterministic_matches_legacy_order(ep, v2):
    for m, r, label, out in ep.each(v2):
        d = out["det"]
        rows = m.legacy_rows(r)
        n = len(rows)
        assert d["meta"][:, 0].tolist() == [s * m.M + t for s, t in rows], f"{label}: deterministic order"
        assert bitwise_equal(d["x"], m.rows_of("x", rows)), f"{label}: deterministic recv_x == legacy recv_x"
        assert d["idx"].tolist() == [m.local_ids(r, s, t) for s, t in rows], f"{label}: deterministic ids"
        exp_w = torch.tensor([m.w[s][t] for s, t in rows], dtype=torch.float32).reshape(n, m.K)
        assert bitwise_equal(d["w"], exp_w), f"{label}: deterministic weights (unmasked)"
        # Expand + deterministic: inside each expert, slots follow ascending src_global.
        meta = d["emeta"]
        starts = [sum(m.aligned(r)[:l]) for l in range(m.L)]
        for l in range(m.L):
            slots = sorted((int(meta[i, 2 + j]), int(meta[i, 0])) for i in range(n) for j in range(m.K)
                           if m.local_ids(r, *rows[i])[j] == l)
            assert [sl for sl, _ in slots] == list(range(starts[l], starts[l] + len(slots))), f"{label}: slots"
            assert [g for _, g in slots] == sorted(g for _, g in slots), f"{label}: deterministic expand order"


def test_elastic_no_cpu_sync(ep, v2):
    for m, r, label, out in ep.each(v2):
        d = out["nosync"]
        n = m.num_recv(r)
        worst = m.R * m.M
        assert d["x"].shape == (worst, m.H) and d["idx"].shape == (worst, m.K) and d["w"].shape == (worst, m.K), \
            f"{label}: do_cpu_sync=False returns R*M rows"
        assert d["meta"].shape[0] == worst and d["num_recv_tokens"] == worst, f"{label}: worst-case handle rows"
        assert int(d["psum_rank"][-1]) == n, f"{label}: psum[-1] is the valid count"
        assert d["counts_list"] == [], f"{label}: no expert count list without CPU sync"
        assert d["psum_expert"].tolist() == [sum(m.aligned(r)[:l + 1]) for l in range(m.L)]
        _check_elastic_rows(m, r, label, d["x"], d["idx"], d["w"], d["meta"], d["psum_rank"], n)
        _sorted_equals_legacy(m, r, label, d["x"], d["idx"], d["w"], d["meta"], n)
        if worst > n:
            assert not bool((d["idx"][n:] == -1).all()), f"{label}: tail ids are garbage, not -1"
        assert bitwise_equal(d["comb"], legacy_combined(m, r)), f"{label}: combine of the padded R*M tensor"
        assert bitwise_equal(d["comb_w"], m.masked_w(r)), f"{label}: combined_topk_weights from padded tensor"
        assert bitwise_equal(d["cached_x"][:n], d["x"][:n]) and torch.equal(d["cached_idx"][:n], d["idx"][:n]), \
            f"{label}: cached dispatch on a no-sync handle"


def _expand_layout(m: Model, r: int, a: int) -> tuple[list[int], list[int]]:
    counts = list(m.expert_counts(r))
    aligned = [-(-c // a) * a for c in counts]
    return counts, [sum(aligned[:l]) for l in range(m.L)]


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_elastic_expand_layout(ep, v2, sync):
    for m, r, label, out in ep.each(v2):
        rows = m.legacy_rows(r)
        n = len(rows)
        for (a, s_flag), d in out["expand"].items():
            if s_flag != sync:
                continue
            lab = f"{label} expand A={a} sync={sync}"
            counts, starts = _expand_layout(m, r, a)
            aligned_total = sum(-(-c // a) * a for c in counts)
            if sync:
                exp_rows = aligned_total
            else:
                worst = m.R * m.M * min(m.K, m.L) + (a - 1) * m.L
                exp_rows = -(-worst // a) * a
            assert d["x"].shape == (exp_rows, m.H), f"{lab}: rows {d['x'].shape[0]} != {exp_rows}"
            assert d["idx_none"], f"{lab}: recv_topk_idx is None"
            assert d["w"].shape == (exp_rows,), f"{lab}: weights are 1-D per slot"
            assert d["unaligned"].tolist() == counts, f"{lab}: num_unaligned_recv_tokens_per_expert"
            assert d["psum_expert"].tolist() == [starts[l] + counts[l] for l in range(m.L)], \
                f"{lab}: psum_num_recv_tokens_per_expert[l] == start_l + c_l"
            assert d["counts_list"] == ([-(-c // a) * a for c in counts] if sync else []), f"{lab}: count list"
            assert int(d["psum_rank"][-1]) == n, f"{lab}: psum_num_recv_tokens_per_scaleup_rank[-1]"
            assert d["meta"].shape[0] == (n if sync else m.R * m.M), f"{lab}: recv_src_metadata rows"
            meta = d["meta"]
            src_rows = [(g // m.M, g % m.M) for g in meta[:n, 0].tolist()]
            assert sorted(src_rows) == sorted(rows), f"{lab}: metadata row set"
            used: list[list[int]] = [[] for _ in range(m.L)]
            for i, (s, t) in enumerate(src_rows):
                ids = m.local_ids(r, s, t)
                for j in range(m.K):
                    slot = int(meta[i, 2 + j])
                    if ids[j] < 0:
                        assert slot == -1, f"{lab}: slot of a non-local (token, k) must be -1"
                        continue
                    l = ids[j]
                    assert starts[l] <= slot < starts[l] + counts[l], f"{lab}: slot {slot} outside expert {l}"
                    used[l].append(slot)
                    assert bitwise_equal(d["x"][slot], m.inp[s]["x"][t]), f"{lab}: x at slot {slot}"
                    assert bitwise_equal(d["w"][slot], torch.tensor(m.w[s][t][j])), f"{lab}: w at slot {slot}"
            for l in range(m.L):
                assert sorted(used[l]) == list(range(starts[l], starts[l] + counts[l])), \
                    f"{lab}: expert {l} occupies exactly [start_l, start_l + c_l)"


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_elastic_expand_combine(ep, v2, sync):
    for m, r, label, out in ep.each(v2):
        exp = expand_combined(m, r)
        pairs = torch.tensor([sum(1 for e in row if e >= 0) for row in m.ids[r]], dtype=torch.float32)
        for (a, s_flag), d in out["expand"].items():
            if s_flag != sync:
                continue
            lab = f"{label} expand A={a} sync={sync}"
            assert bitwise_equal(d["comb"], exp), f"{lab}: combine sums every expert copy (per-rank bf16 partials)"
            torch.testing.assert_close(d["comb"].float(), m.inp[r]["x"].float() * pairs.unsqueeze(1),
                                       rtol=2 ** -7, atol=0,
                                       msg=lambda e: f"{lab}: combined ~= x * #(token, expert) pairs: {e}")
            assert bitwise_equal(d["comb_w"], m.masked_w(r)), f"{lab}: combined_topk_weights from 1-D weights"


def test_elastic_expand_combine_without_multiple_reduction(ep, v2):
    for m, r, label, out in ep.each(v2):
        pairs = torch.tensor([sum(1 for e in row if e >= 0) for row in m.ids[r]], dtype=torch.float32).unsqueeze(1)
        exp = torch.where(pairs > 0, m.inp[r]["x"].float() * pairs, torch.zeros(())).to(torch.bfloat16)
        assert bitwise_equal(out["expand_single_reduction"]["comb"], exp), \
            f"{label}: allow_multiple_reduction=False: bf16(Σ_j f32(y[slot(t,j)])), one rounding"


def test_elastic_cached_expand_zero_padding(ep, v2):
    for m, r, label, out in ep.each(v2):
        for (a, sync), d in out["expand"].items():
            lab = f"{label} cached expand A={a} sync={sync}"
            counts, starts = _expand_layout(m, r, a)
            for l in range(m.L):
                pad = slice(starts[l] + counts[l], starts[l] + -(-counts[l] // a) * a)
                assert bool((d["zero_x"][pad] == 0).all()), f"{lab}: padding x of expert {l} zeroed"
                assert bool((d["zero_w"][pad] == 0).all()), f"{lab}: padding w of expert {l} zeroed"


def test_elastic_cached_expand_rows(ep, v2):
    for m, r, label, out in ep.each(v2):
        for (a, sync), d in out["expand"].items():
            lab = f"{label} cached expand A={a} sync={sync}"
            n = m.num_recv(r)
            slots = d["meta"][:n, 2:]
            valid = slots[slots >= 0].long()
            assert d["zero_x"].shape == d["x"].shape, f"{lab}: cached expand row count"
            assert bitwise_equal(d["zero_x"][valid], d["x"][valid]), f"{lab}: cached expand x at every slot"
            assert bitwise_equal(d["zero_w"][valid], d["w"][valid]), f"{lab}: cached expand weights"


def test_elastic_combine(ep, v2):
    for m, r, label, out in ep.each(v2):
        d = out["sync"]
        exp = legacy_combined(m, r)
        assert bitwise_equal(d["comb"], exp), f"{label}: combined == x * |D(t)| (unweighted)"
        assert bitwise_equal(d["comb_nw"], exp), f"{label}: topk_weights must not change combined_x"
        assert d["comb_w_none"], f"{label}: combined_topk_weights None without topk_weights"


def test_elastic_combine_topk_weights_is_owner_value(ep, v2):
    for m, r, label, out in ep.each(v2):
        # recv weights are not zeroed, so every destination rank sends W[t, j] back; only the owner's counts.
        assert bitwise_equal(out["sync"]["comb_w"], m.masked_w(r)), \
            f"{label}: combined_topk_weights == W where id >= 0, 0 where -1 (owner's value, not a sum)"


def test_elastic_cached_dispatch(ep, v2):
    for m, r, label, out in ep.each(v2):
        d, c = out["sync"], out["cached"]
        n = m.num_recv(r)
        assert bitwise_equal(c["x"], d["x"]), f"{label}: cached rows identical, in identical order"
        assert torch.equal(c["idx"], d["idx"]), f"{label}: cached recv_topk_idx recomputed identically"
        assert c["w_none"], f"{label}: cached dispatch without topk_weights returns None weights"
        assert c["same_handle"], f"{label}: cached dispatch returns the handle"
        rows = [(g // m.M, g % m.M) for g in d["meta"][:n, 0].tolist()]
        assert bitwise_equal(c["x2"], m.rows_of("x2", rows)), f"{label}: cached dispatch of new data, same slots"
        assert bitwise_equal(c["w2"], d["w"]), f"{label}: cached dispatch with topk_weights"
        assert torch.equal(c["idx2"], d["idx"])


def test_elastic_dispatch_fp8_tuple(ep, v2):
    for m, r, label, out in ep.each(v2):
        f = out["fp8"]
        n = m.num_recv(r)
        rows = [(g // m.M, g % m.M) for g in f["meta"][:n, 0].tolist()]
        assert sorted(rows) == sorted(m.legacy_rows(r)), f"{label}: FP8 row set"
        assert bitwise_equal(fp8_from_u8(f["q"]), m.rows_of("x_fp8", rows)), f"{label}: FP8 bytes moved bitwise"
        assert bitwise_equal(f["s"], m.rows_of("scales", rows)), f"{label}: sf moved bitwise"
        assert f["idx"].tolist() == [m.local_ids(r, s, t) for s, t in rows]
        assert f["w_none"], f"{label}: recv_topk_weights is None without topk_weights"


def test_elastic_expand_fp8_tuple(ep, v2):
    for m, r, label, out in ep.each(v2):
        f = out["expand_fp8"]
        n = m.num_recv(r)
        q = fp8_from_u8(f["q"])
        for i, g in enumerate(f["meta"][:n, 0].tolist()):
            s, t = g // m.M, g % m.M
            for j in range(m.K):
                slot = int(f["meta"][i, 2 + j])
                if slot >= 0:
                    assert bitwise_equal(q[slot], m.inp[s]["x_fp8"][t]), f"{label}: expand FP8 x at slot {slot}"
                    assert bitwise_equal(f["s"][slot], m.inp[s]["scales"][t]), f"{label}: expand sf at {slot}"


def test_elastic_tma_aligned_col_major_sf_strides(ep, v2):
    for m, r, label, out in ep.each(v2):
        f = out["expand_fp8"]
        rows = f["q"].shape[0]
        assert f["s_stride"] == (1, -(-rows // 4) * 4), f"{label}: sf strides {f['s_stride']}"
