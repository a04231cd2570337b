"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/config/quant_config.py``: ``QuantizationConfig``.

The base class's interface the DeepEP code uses: ``get_method()`` (e.g. ``"FP8_PER_BLOCK"``, ``"modelopt_fp4"``)
and ``is_quanted()``. rtp-llm's concrete subclasses, registry and checkpoint loading are left out; no ported test
quantises its model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class QuantizationConfig(ABC):
    """A checkpoint's quantisation: its method name and whether weights are quantised."""

    def __init__(self, bits: int, group_size: int, is_quanted: bool, **kwargs: Any) -> None:
        self._bits = bits
        self._group_size = group_size
        self._is_quanted = is_quanted

    @property
    def bits(self) -> int:
        return self._bits

    @classmethod
    @abstractmethod
    def get_method(cls) -> str:
        """Name of the quantisation method."""

    def is_quanted(self) -> bool:
        return self._is_quanted

    def group_size(self) -> int:
        return self._group_size
