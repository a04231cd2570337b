"""DeepEP's buffer-size hints, written out in Python for the reference providers.

The formulas follow DeepEP 2.1.0's C++ (``csrc/legacy/config.hpp`` and ``csrc/elastic/buffer.hpp``) and, for
``EPBuffer``, DeepEP 2.5.0's (``csrc/buffers/ep.hpp``), for a single node (direct mode, NVLink scale-up). The GPU test ``test_gpu_core.py::test_reference_hints_match_deep_ep`` checks them
against the real library, so the wrapper sizes the same way with either provider.
"""

from __future__ import annotations

import math

_NUM_MAX_NVL_PEERS = 8
_NUM_MAX_TOPK = 128          # kNumMaxTopK in the legacy kernels
_NUM_MAX_SCALES = 128        # kNumMaxScales
_TOPK_IDX_BYTES = 8          # topk_idx_t = int64
_SOURCE_META_BYTES = 8       # SourceMeta: two ints
_ELASTIC_ALIGNMENT = 2 * 1024 * 1024  # buffer allocations (2.1 and 2.5)
_RDMA_ALIGNMENT = 64                   # DeepEP 2.5 rounds each EPBuffer token slot up to this


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class ReferenceConfig:
    """DeepEP's legacy ``Config``: the chunking of the normal kernels, and the buffer size it implies.

    Args:
        num_sms: SMs used by the normal kernels (two per channel).
        num_max_nvl_chunked_send_tokens / num_max_nvl_chunked_recv_tokens: NVLink ring chunk sizes.
        num_max_rdma_chunked_send_tokens / num_max_rdma_chunked_recv_tokens: RDMA ring chunk sizes.
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        if num_sms < 0 or not 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens:
            raise ValueError("invalid NVL chunk configuration")
        rdma_recv = _align(num_max_rdma_chunked_recv_tokens, num_max_rdma_chunked_send_tokens)
        if not 0 < num_max_rdma_chunked_send_tokens <= rdma_recv // 2:
            raise ValueError("invalid RDMA chunk configuration")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if not (num_ranks < _NUM_MAX_NVL_PEERS or num_ranks % _NUM_MAX_NVL_PEERS == 0):
            raise ValueError(f"unsupported rank count {num_ranks}")
        rdma_ranks = max(num_ranks // _NUM_MAX_NVL_PEERS, 1)
        nvl_ranks = min(num_ranks, _NUM_MAX_NVL_PEERS)
        channels = self.num_sms // 2
        per_token = (hidden_bytes + _SOURCE_META_BYTES + _NUM_MAX_TOPK * _TOPK_IDX_BYTES
                     + _NUM_MAX_TOPK * 4 + _NUM_MAX_SCALES * 4)
        total = channels * nvl_ranks * (2 * rdma_ranks + 3) * 4
        total += channels * nvl_ranks * self.num_max_nvl_chunked_recv_tokens * per_token
        return _align(total, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if num_ranks <= _NUM_MAX_NVL_PEERS:
            return 0
        rdma_ranks = num_ranks // _NUM_MAX_NVL_PEERS
        channels = self.num_sms // 2
        recv = self.num_max_rdma_chunked_recv_tokens
        per_token = (hidden_bytes + _SOURCE_META_BYTES + _NUM_MAX_TOPK * _TOPK_IDX_BYTES
                     + _NUM_MAX_TOPK * 4 + _NUM_MAX_SCALES * 4 + 16)
        total = channels * rdma_ranks * (_NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4
        total += channels * rdma_ranks * recv * per_token * 2
        return _align(total, 128)


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """``Buffer.get_low_latency_rdma_size_hint``: double-buffered send/recv slabs plus signalling."""
    del num_ranks  # DeepEP's formula does not depend on the rank count
    tokens = num_max_dispatch_tokens_per_rank
    scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
    combine_msg = scales * 4 + hidden * 2
    send = max(tokens * dispatch_msg, num_experts * tokens * combine_msg)
    recv = max(num_experts * tokens * dispatch_msg, num_experts * tokens * combine_msg)
    signalling = _align(num_experts * 4, 128)
    total = 2 * send + 2 * recv + 2 * signalling
    return (total + 128) // 128 * 128


def elastic_buffer_size_hint(num_ranks: int, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_multiple_reduction: bool = True) -> int:
    """``ElasticBuffer.get_buffer_size_hint`` for one NVLink domain (direct mode)."""
    return _direct_mode_size(num_ranks, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                             allow_multiple_reduction, token_alignment=1)


def ep_buffer_size_hint(num_ranks: int, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                        use_fp8_dispatch: bool = False, allow_multiple_reduction: bool = True) -> int:
    """DeepEP 2.5's ``EPBuffer.get_buffer_size_hint`` (and its ``num_bytes=None`` sizing) for one NVLink domain.

    2.5's formula (``csrc/buffers/ep.hpp`` ``calculate_buffer_size``, ``layout/ep/token.cuh``) is 2.1's with one
    change: each token slot is rounded up to 64 bytes (the RDMA alignment). Where 2.1's slots are already multiples
    of 64 both agree: 4 MiB (T=128) and 114 MiB (T=4096) at EP2, H=7168, K=8, bf16 or FP8; smaller layers can get
    more on 2.5 (EP2, T=7680, H=256, K=2, bf16: each 544-byte dispatch slot becomes 576, and 8 MiB becomes 10).
    """
    if math.ceil(hidden / 32) * 4 > hidden:
        raise ValueError(f"hidden {hidden} is too small for EPBuffer's FP8 scale slots")
    return _direct_mode_size(num_ranks, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                             allow_multiple_reduction, token_alignment=_RDMA_ALIGNMENT)


def _direct_mode_size(num_ranks: int, num_max_tokens_per_rank: int, hidden: int, num_topk: int,
                      use_fp8_dispatch: bool, allow_multiple_reduction: bool, token_alignment: int) -> int:
    """max(dispatch, combine) receive buffers of one NVLink domain, 2 MiB aligned; each token slot is its
    TMA-aligned (32-byte) fields, the whole rounded up to ``token_alignment``."""
    if num_max_tokens_per_rank <= 0 or hidden <= 0:
        raise ValueError("num_max_tokens_per_rank and hidden must be positive")
    topk = 32 if num_topk == 0 else num_topk
    a32 = lambda x: _align(x, 32)  # noqa: E731 - TMA alignment of each token field
    elem = 1 if use_fp8_dispatch else 2
    sf_packs = math.ceil(hidden / 32) if use_fp8_dispatch else 0
    dispatch_token = _align(a32(hidden * elem) + a32(sf_packs * 4) + a32(topk * 8 + (1 + topk) * 4), token_alignment)
    dispatch = num_ranks * num_max_tokens_per_rank * dispatch_token
    combine_token = _align(a32(hidden * 2) + a32(topk * 8), token_alignment)
    reductions = min(num_ranks, topk) if allow_multiple_reduction else topk
    combine = reductions * num_max_tokens_per_rank * combine_token
    return _align(max(dispatch, combine), _ELASTIC_ALIGNMENT)
