"""The two DeepEP communication generations deepep-switch can run."""

from __future__ import annotations

from enum import Enum


class Backend(str, Enum):
    """A DeepEP generation. ``.value`` is the string operators write in ``RTP_LLM_DEEPEP_BACKEND``."""

    LEGACY = "legacy"
    """``deep_ep.Buffer`` (V1 API): normal and low-latency kernels."""

    ELASTIC = "elastic"
    """``deep_ep.ElasticBuffer`` (V2 API): one NCCL-based dispatch/combine."""
