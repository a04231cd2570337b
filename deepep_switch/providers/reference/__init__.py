"""Pure-PyTorch implementations of the deep_ep surface deepep-switch uses.

They run across real processes over torch.distributed (gloo on CPU, NCCL on GPU) with DeepEP's return tuples and
semantics, so engine engineers can unit-test MoE routers without GPUs (``DEEPEP_SWITCH_PROVIDER=reference``).
"""

from .elastic import ReferenceElasticBuffer, ReferenceEPHandle
from .ep import ReferenceEPBuffer, ReferenceEPBufferHandle
from .hints import ReferenceConfig
from .legacy import ReferenceBuffer

__all__ = ["ReferenceBuffer", "ReferenceElasticBuffer", "ReferenceEPBuffer", "ReferenceEPBufferHandle",
           "ReferenceEPHandle", "ReferenceConfig"]
