"""Where the buffer classes come from: real ``deep_ep`` (imported lazily) or the reference providers.

The wrapper asks :func:`load_provider` once and never imports ``deep_ep`` itself, so a V1-only ``deep_ep`` (no
``ElasticBuffer``) or no ``deep_ep`` at all still imports cleanly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

from ..settings import ProviderChoice


@dataclass(frozen=True)
class Provider:
    """The classes one provider offers.

    Attributes:
        choice: which provider this is.
        Buffer: the legacy buffer class (``deep_ep.Buffer`` or ``ReferenceBuffer``).
        ElasticBuffer: the V2 buffer class, or None when this ``deep_ep`` has none.
        Config: the legacy ``Config`` class (normal-mode chunking and size hints).
    """

    choice: ProviderChoice
    Buffer: Any
    ElasticBuffer: Optional[Any]
    Config: Any


def load_provider(choice: ProviderChoice) -> Provider:
    """Import the provider's classes. Raises ImportError (with DeepEP's own message) when deep_ep is unusable."""
    if choice is ProviderChoice.REFERENCE:
        from .reference import ReferenceBuffer, ReferenceConfig, ReferenceElasticBuffer

        return Provider(choice, ReferenceBuffer, ReferenceElasticBuffer, ReferenceConfig)
    try:
        deep_ep = importlib.import_module("deep_ep")
    except ImportError:
        raise
    except Exception as exc:  # DeepEP asserts at import time (NCCL mismatch, CUDA major): surface as ImportError
        raise ImportError(f"deep_ep failed to import: {type(exc).__name__}: {exc}") from exc
    return Provider(choice, deep_ep.Buffer, getattr(deep_ep, "ElasticBuffer", None), deep_ep.Config)


def provider_importable(choice: ProviderChoice) -> bool:
    """Whether :func:`load_provider` would succeed (cheap after the first import)."""
    try:
        load_provider(choice)
    except ImportError:
        return False
    return True
