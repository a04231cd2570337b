"""The documentation's code runs as written."""

from __future__ import annotations

import importlib
import pathlib
import re
import sys

import pytest

DOCS = pathlib.Path(__file__).parents[1] / "docs"


@pytest.mark.timeout(240)
def test_engine_test_example_in_testing_without_gpus(tmp_path, monkeypatch):
    text = (DOCS / "testing-without-gpus.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "engine_example_test.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned ranks inherit sys.path and import it from there
    module = importlib.import_module("engine_example_test")
    try:
        module.test_both_backends()
    finally:
        sys.modules.pop("engine_example_test", None)
