"""Shared test setup: a clean deepep-switch environment per test, and the ``gpu`` marker's skip rule."""

from __future__ import annotations

import os

import pytest

from _generations import gpu_ready  # the rule: >= 2 GPUs and deep_ep or deep_ep_v25
from deepep_switch.settings import get_settings

_OUR_PREFIXES = ("RTP_LLM_DEEPEP_", "DEEPEP_SWITCH_")


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
