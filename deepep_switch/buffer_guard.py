"""What ``DeepEPWrapper.buffer`` hands engine code that calls the buffer directly.

rtp-llm code outside the routers (e.g. its DSv4 MoE strategy) calls V1 methods (``get_dispatch_layout``,
``dispatch`` with a layout, ``low_latency_dispatch``) on the wrapper's buffer. On a generation without them the
library itself would fail with a bare AttributeError deep inside the caller; the guard turns that into an error
that names the running backend, the call and what to do. Routers never go through it (their paths hold the
buffer itself), so it costs nothing on their hot path.
"""

from __future__ import annotations

from typing import Any


class GuardedBuffer:
    """Delegates every attribute to ``buffer``; a missing one raises AttributeError naming ``backend``.

    Args:
        buffer: the generation's buffer object.
        backend: the generation's name (``RTP_LLM_DEEPEP_BACKEND`` value).
        class_name: its class, for the message (e.g. ``deep_ep.ElasticBuffer``).
    """

    __slots__ = ("_buffer", "_backend", "_class_name")

    def __init__(self, buffer: Any, backend: str, class_name: str) -> None:
        object.__setattr__(self, "_buffer", buffer)
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_class_name", class_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._buffer, name)
        except AttributeError:
            raise AttributeError(
                f"DeepEPWrapper.buffer is a {self._class_name} (RTP_LLM_DEEPEP_BACKEND={self._backend}), which has no "
                f"{name!r}: this code calls the legacy deep_ep.Buffer API directly. Run it with "
                f"RTP_LLM_DEEPEP_BACKEND=legacy, or go through deepep-switch's routers, which work on every backend"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._buffer, name, value)

    def __repr__(self) -> str:
        return f"GuardedBuffer({self._buffer!r}, backend={self._backend})"

    @property
    def unwrapped(self) -> Any:
        """The buffer itself."""
        return self._buffer
