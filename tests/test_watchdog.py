"""The watchdog ends a process whose guarded call blocks past its deadline plus the grace, whether or not the call
holds the GIL (DeepEP's pybind11 calls do), with ONE fatal line and a documented exit status; guards are cheap,
leave fast calls alone and turn a late ``RuntimeError`` into ``CommunicationTimeout``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

from deepep_switch import CommunicationTimeout
from deepep_switch.watchdog import EXIT_CODE, Watchdog

ROOT = pathlib.Path(__file__).parents[1]

BLOCKED = r'''
import ctypes, sys, time
from deepep_switch.watchdog import Watchdog
watchdog = Watchdog(grace_s=0.3, tick_s=0.05)
guard = watchdog.guard("destroy", 0.5, rank=1, world_size=2)
for _ in range(3):
    with guard:
        time.sleep(0.2)  # calls that return within the deadline are left alone
print("blocking at", time.monotonic(), flush=True)
with guard:
    if sys.argv[1] == "gil":
        ctypes.PyDLL(None).sleep(60)  # blocks while holding the GIL, as DeepEP's pybind11 calls do
    else:
        time.sleep(60)
print("survived", flush=True)
'''


def _run(source: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", source, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("gil", ["gil", "nogil"])
def test_a_blocked_guarded_call_ends_the_process_with_one_fatal_line(gil):
    proc = _run(BLOCKED, gil)
    ended = time.monotonic()  # CLOCK_MONOTONIC: comparable with the child's clock
    assert proc.returncode == EXIT_CODE, (proc.returncode, proc.stderr)
    assert "survived" not in proc.stdout
    blocked_at = float(proc.stdout.split("blocking at")[1].split()[0])
    assert 0.8 <= ended - blocked_at < 5.0, ended - blocked_at  # deadline 0.5 s + grace 0.3 s, then a tick or two
    fatal = [line for line in proc.stderr.splitlines() if "FATAL" in line]
    assert len(fatal) == 1, proc.stderr
    for part in ("rank 1/2", "destroy has blocked", "0.5s deadline", "0.3s grace", f"exit status {EXIT_CODE}",
                 "RTP_LLM_DEEPEP_TIMEOUT_S"):
        assert part in fatal[0], (part, fatal[0])


QUIET = r'''
import os, sys, time
from deepep_switch.watchdog import Watchdog
watchdog = Watchdog(grace_s=0.2, tick_s=0.05)
print("watchdog", watchdog._process.pid, flush=True)
with watchdog.guard("dispatch", 0.3, rank=0, world_size=4):
    time.sleep(0.1)
time.sleep(0.8)  # unguarded time is never watched
if sys.argv[1] == "killed":
    os.kill(os.getpid(), 9)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("end", ["normal", "killed"])
def test_the_watchdog_process_never_outlives_its_process(end):
    proc = _run(QUIET, end)
    assert proc.returncode == (0 if end == "normal" else -9), proc.stderr
    assert "FATAL" not in proc.stderr
    pid = int(proc.stdout.split("watchdog")[1].split()[0])
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"watchdog process {pid} still runs after its process ended ({end})")


@pytest.fixture(scope="module")
def watchdog():
    dog = Watchdog(grace_s=30.0, tick_s=0.05)
    yield dog
    dog.close()


def test_a_runtime_error_after_the_deadline_becomes_a_communication_timeout(watchdog):
    guard = watchdog.guard("dispatch", 0.05, rank=3, world_size=8)
    with pytest.raises(CommunicationTimeout) as info:
        with guard:
            time.sleep(0.1)
            raise RuntimeError("DeepEP error: CPU recv timeout")
    exc = info.value
    assert (exc.operation, exc.rank, exc.world_size, exc.timeout_s, exc.missing_ranks) == ("dispatch", 3, 8, 0.05, [])
    assert isinstance(exc.__cause__, RuntimeError) and "CPU recv timeout" in str(exc)
    with pytest.raises(RuntimeError, match="^early$"):  # before the deadline: left as it is
        with watchdog.guard("dispatch", 5.0, rank=3, world_size=8):
            raise RuntimeError("early")
    with pytest.raises(ValueError):
        with guard:
            time.sleep(0.1)
            raise ValueError("not a communication problem")


def test_guards_are_cheap_and_shared(watchdog):
    guard = watchdog.guard("combine", 1.0, rank=0, world_size=2)
    assert watchdog.guard("combine", 1.0, rank=0, world_size=2) is guard  # one slot per distinct guard
    assert watchdog.alive
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        with guard:
            pass
    per_call_us = (time.perf_counter() - start) / n * 1e6
    assert per_call_us < 10, per_call_us  # about 1 µs on a laptop core; generous for loaded CI machines
