"""Helpers shared by the multi-process test workers (imported in spawned ranks from the tests directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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


_INTERPRETER_PROBE = textwrap.dedent("""
    import sys
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr):
        for i in range(0, tl.program_id(0) + 1, 1):
            tl.store(out_ptr + i, i)

    try:
        _probe[(2,)](torch.zeros(2, dtype=torch.int32))
    except Exception as exc:  # e.g. Triton 3.6's interpreter with NumPy >= 2.4: 1-element program ids
        print(f"Triton's interpreter cannot run here: {exc!r}")
        sys.exit(77)
""")


def run_in_triton_interpreter(code: str, tmp_path: Any) -> None:
    """Run ``code`` (which must print "interpreted ok") in a subprocess with ``TRITON_INTERPRET=1``; skip the calling
    test where Triton is missing or its interpreter cannot run a trivial kernel (Triton 3.6 with NumPy >= 2.4)."""
    import pytest

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(paths))
    script = tmp_path / "interpreted.py"  # a file: triton.jit reads its kernels' source
    script.write_text(_INTERPRETER_PROBE + textwrap.dedent(code))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=root,
                          timeout=280)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "interpreted ok" in proc.stdout, proc.stdout + proc.stderr
