"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/kernels/cuda/deepgemm_wrapper.py``:
``is_deep_gemm_e8m0_used`` only (``routers/rtp_llm.py`` asks it whether DeepGEMM wants UE8M0 scales).

rtp-llm asks the CUDA device unconditionally; without CUDA (the CPU runs on the reference providers) this
stand-in answers False instead of raising: there is no DeepGEMM there either.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def is_deep_gemm_e8m0_used() -> bool:
    """Blackwell (SM 10.x / 12.x) DeepGEMM consumes UE8M0 scales."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] in [10, 12]
