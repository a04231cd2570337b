"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/utils/arch.py``: the SM queries.

``get_sm`` reads the current (or given) CUDA device's compute capability, as rtp-llm does: without CUDA it raises
(``torch.cuda`` is not available), so ``check_conditions`` of the DeepEP routers, which ask ``get_sm()``, only run
on GPUs. rtp-llm's ``is_cuda()`` (device type, ``rtp_llm.device``) is ``torch.cuda.is_available()`` here.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch


def _canonical_cuda_device(device_id: Optional[Union[int, torch.device]]) -> int:
    if device_id is None or (isinstance(device_id, torch.device) and device_id.index is None):
        return torch.cuda.current_device()
    return device_id.index if isinstance(device_id, torch.device) else int(device_id)


@functools.cache
def _get_sm_for_device(device_id: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device_id)
    return major, minor


def get_sm(device_id: Optional[Union[int, torch.device]] = None) -> tuple[int, int]:
    """``(major, minor)`` compute capability of the device."""
    return _get_sm_for_device(_canonical_cuda_device(device_id))


def is_sm90(device_id: Optional[Union[int, torch.device]] = None) -> bool:
    """SM 9.x Hopper."""
    return torch.cuda.is_available() and get_sm(device_id)[0] == 9


def is_sm10x(device_id: Optional[Union[int, torch.device]] = None) -> bool:
    """SM 10.x datacenter Blackwell."""
    return torch.cuda.is_available() and get_sm(device_id)[0] == 10
