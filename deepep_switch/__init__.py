"""deepep-switch: run an engine's MoE expert-parallel communication on DeepEP's legacy ``Buffer``, its 2.1
``ElasticBuffer`` or its 2.5 ``EPBuffer``, chosen per replica by ``RTP_LLM_DEEPEP_BACKEND`` and agreed by every rank.

Data flow: settings -> preflight -> decision (rank consensus) -> wrapper (buffer lifecycle) -> router
(prepare/finalize, in the top-level ``routers`` package) -> executor.
"""

from .backend import Backend
from .config import DeepEPMode, DeepepWrapperConfig
from .decision import BackendDecision, BackendUnavailableError, resolve_backend
from .consensus import ConsensusTimeout
from .deadline import CommunicationTimeout
from .preflight import PreflightReport, run_preflight
from .settings import BackendChoice, ProviderChoice, SwitchSettings, get_settings, reload_settings
from .wrapper import DeepEPWrapper

__all__ = [
    "Backend", "BackendChoice", "BackendDecision", "BackendUnavailableError", "CommunicationTimeout",
    "ConsensusTimeout", "DeepEPMode",
    "DeepEPWrapper", "DeepepWrapperConfig", "PreflightReport", "ProviderChoice", "SwitchSettings",
    "get_settings", "reload_settings", "resolve_backend", "run_preflight",
]

__version__ = "0.1.0"
