"""Shared test setup: a clean deepep-switch environment per test, and the ``gpu`` marker's skip rule."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from deepep_switch.settings import get_settings

_OUR_PREFIXES = ("RTP_LLM_DEEPEP_", "DEEPEP_SWITCH_")


def gpu_ready(min_gpus: int = 2) -> tuple[bool, str]:
    """GPU tests need real deep_ep (sgl-deep-ep) and at least ``min_gpus`` CUDA devices."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < min_gpus:
        return False, f"needs >= {min_gpus} CUDA GPUs"
    if importlib.util.find_spec("deep_ep") is None:
        return False, "needs deep_ep (pip install 'deepep-switch[gpu]')"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ready, why = gpu_ready()
    if ready:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch: pytest.MonkeyPatch):
    """Every test starts from an environment without deepep-switch variables and with no cached settings."""
    for name in list(os.environ):
        if name.startswith(_OUR_PREFIXES) or name == "EP_DISABLE_GIN":
            monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
