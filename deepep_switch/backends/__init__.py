"""DeepEP generations: one module each, found through the registry.

======================  ==========================================================================
module                  what it declares
======================  ==========================================================================
``spec.py``             :class:`BackendSpec`, :class:`Library`, :class:`BufferPlan`
``contracts.py``        the path protocols and dispatch result types routers rely on
``registry.py``         :func:`register`, :func:`get_spec`, :func:`registered`, the fallback
``legacy.py``           ``deep_ep.Buffer`` (V1)
``elastic.py``          ``deep_ep.ElasticBuffer`` (DeepEP 2.1's V2)
``ep.py``               ``EPBuffer`` (DeepEP 2.5: ``deep_ep_v25``, or upstream ``deep_ep``)
======================  ==========================================================================

Importing this package registers the built-in generations, in this order (the order of the vote's masks).
See ``docs/architecture.md``, "Adding a generation".
"""

from . import legacy, elastic, ep  # noqa: F401  (registration order: legacy first, the fallback)
from .contracts import (Capabilities, LowLatencyDispatch, LowLatencyPath, NormalDispatch, NormalPath, PathContext,
                        WeightsAppliedBy)
from .registry import FALLBACK, digest, get_spec, is_registered, names, register, registered, unregister
from .spec import BackendSpec, BufferPlan, Library

__all__ = [
    "FALLBACK", "BackendSpec", "BufferPlan", "Capabilities", "Library", "LowLatencyDispatch", "LowLatencyPath",
    "NormalDispatch", "NormalPath", "PathContext", "WeightsAppliedBy", "digest", "get_spec", "is_registered",
    "names", "register", "registered", "unregister",
]
