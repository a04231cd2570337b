"""The one rule every kernel family here follows: its Triton version on CUDA, its torch version elsewhere or when
Triton cannot serve (not installed, or unable to build for this GPU), with one warning saying so."""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def triton_on_cuda(device: torch.device, build: Callable[[], T], fallback: T, what: str, instead: str,
                   log: logging.Logger) -> T:
    """``build()`` on a CUDA ``device``: it imports the Triton version (and compiles it where a failure can only
    show then). Elsewhere ``fallback``; also when ``build`` raises, after the warning
    ``"Triton {what} unavailable ({error}); {instead}"`` on ``log``."""
    if device.type == "cuda":
        try:
            return build()
        except Exception as exc:  # no Triton, or one that cannot build here: correct but slower
            log.warning("Triton %s unavailable (%s); %s", what, exc, instead)
    return fallback
