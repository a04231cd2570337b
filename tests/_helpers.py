"""Helpers shared by the multi-process test workers (imported in spawned ranks from the tests directory)."""

from __future__ import annotations

import json
import os
from typing import Any

from deepep_switch.settings import LoadedSettings, load_settings


def settings_from_env(**env: str) -> LoadedSettings:
    """This process's settings with every ``RTP_LLM_DEEPEP_*`` variable replaced by ``env``."""
    for key in [k for k in os.environ if k.startswith("RTP_LLM_DEEPEP_")]:
        del os.environ[key]
    os.environ.update(env)
    return load_settings()


def record_gpu_results(name: str, results: Any) -> None:
    """Keep raw GPU measurements for docs/gpu-validation.md when GPU_RECORD_DIR is set (the device run sets it)."""
    directory = os.environ.get("GPU_RECORD_DIR")
    if directory:
        with open(os.path.join(directory, f"{name}.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
