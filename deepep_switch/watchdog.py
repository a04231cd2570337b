"""The watchdog: ends a process whose host-blocking DeepEP call is still blocked past its deadline plus a grace.

Some waits for peers happen inside DeepEP's C++ and cannot be bounded from Python: NVSHMEM initialisation in
the legacy ``Buffer`` constructor, NCCL window registration in the ``ElasticBuffer`` constructor, the
collective ``destroy()`` of both, a normal-mode ``dispatch`` that waits on the host for the receive counts.
Worse, DeepEP 2.1.0's pybind11 bindings keep the GIL during all of these (only the legacy internode dispatch
releases it), so no Python thread of the stuck process can run, let alone end it.

So the watchdog is a tiny process of its own, one per watched process, started on first use (``python -I -S``
running only the standard library, about 10 MB). The two share a table in shared memory with one slot per
:class:`Guard`. Entering a guard stores the start time in its slot (one 8-byte store), leaving it stores 0;
nothing else happens per call (well under a microsecond of Python; CUDA-graph replays run no Python at all, and
the graph-captured low-latency paths are never guarded). The watchdog scans the table every ``tick_s``; a call
blocked for longer than its deadline plus :data:`GRACE_S` gets ONE fatal line on stderr naming the operation,
the rank, the deadline and what to do, and the process ends with exit status :data:`EXIT_CODE`.

How the process ends while its main thread holds the GIL: when the watchdog starts, it binds
:data:`EXIT_SIGNAL` directly to libc's ``_exit`` (through ctypes: no Python runs in the handler), so the signal
the watchdog process sends ends it at once with status ``EXIT_SIGNAL`` = :data:`EXIT_CODE` (62 on Linux). If
that binding is unavailable, or something rebinds the signal, ``SIGKILL`` follows 3 s later (status -9, shown as
137 by shells and orchestrators).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from .deadline import CommunicationTimeout

logger = logging.getLogger("deepep_switch.watchdog")

GRACE_S = 10.0
"""Seconds a guarded call may block past its deadline before the watchdog ends the process."""
EXIT_SIGNAL = int(signal.SIGRTMAX) - 2
"""The real-time signal bound to ``_exit``: the watchdog ends a stuck process with it."""
EXIT_CODE = EXIT_SIGNAL
"""The exit status of a process the watchdog ended (62 on Linux)."""
TICK_S = 0.1
MAX_SLOTS = 64

_MAGIC = b"DEEPEPWD"
_HEADER = struct.Struct("<8sqqq")     # magic, slots, slots in use, closed
_HEADER_BYTES = 64
_META = struct.Struct("<qqqq64s")     # limit (deadline + grace) ns, deadline µs, rank, world size, operation
_now_ns = time.monotonic_ns           # CLOCK_MONOTONIC: the same clock in both processes

# The watchdog process: standard library only, no deepep_switch import (that would import torch).
_WATCHDOG_SOURCE = r'''
import mmap, os, signal, struct, sys, time
fd, ppid, slots, tick, sig, code = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                    int(sys.argv[5]), sys.argv[6])
header, meta = struct.Struct("<8sqqq"), struct.Struct("<qqqq64s")
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the watched process; this one follows it out
table = mmap.mmap(fd, 0)
armed = memoryview(table)[64:64 + 8 * slots].cast("q")
meta_at = 64 + 8 * slots


def parent_alive():
    return os.getppid() == ppid


def fatal(slot, started):
    limit, deadline_us, rank, world, name = meta.unpack_from(table, meta_at + meta.size * slot)
    op, deadline = name.rstrip(b"\0").decode("utf-8", "replace"), deadline_us / 1e6
    grace, blocked = limit / 1e9 - deadline, (time.monotonic_ns() - started) / 1e9
    os.write(2, (
        f"deepep-switch FATAL (watchdog) rank {rank}/{world} pid {ppid}: {op} has blocked for {blocked:.1f}s, "
        f"past its {deadline:g}s deadline (RTP_LLM_DEEPEP_TIMEOUT_S) and {grace:g}s grace, inside a call "
        f"Python cannot interrupt (DeepEP C++ waiting for a peer); ending the process with exit status {code} "
        f"so the job restarts. Find the first error in the logs of the other ranks; if {op} is legitimately "
        f"this slow, raise RTP_LLM_DEEPEP_TIMEOUT_S.\n").encode())
    for kill, wait in ((sig, 3.0), (signal.SIGKILL, 3.0)):
        try:
            os.kill(ppid, kill)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while parent_alive() and time.monotonic() < end:
            time.sleep(0.01)
        if not parent_alive():
            return


while parent_alive() and header.unpack_from(table, 0)[3] == 0:
    now, used = time.monotonic_ns(), header.unpack_from(table, 0)[2]
    for slot in range(used):
        started = armed[slot]
        if started and now - started > meta.unpack_from(table, meta_at + meta.size * slot)[0]:
            time.sleep(0.01)
            if armed[slot] == started:  # the same call is still blocked (not a torn or just-finished write)
                fatal(slot, started)
                sys.exit(0)
    time.sleep(tick)
'''


class Guard:
    """Watches one host-blocking call at a time: ``with guard: buffer.dispatch(...)``.

    Build it once (:meth:`Watchdog.guard`, or :meth:`deepep_switch.deadline.Deadline.guard`) and enter it per
    call; it is reusable but not reentrant. On the way out, a ``RuntimeError`` raised after the deadline (DeepEP's
    own CPU timeouts, e.g. ``"DeepEP error: CPU recv timeout"``) becomes a :class:`CommunicationTimeout` naming
    the operation.
    """

    __slots__ = ("operation", "timeout_s", "rank", "world_size", "_armed", "_slot", "_timeout_ns", "_started")

    def __init__(self, armed: Any, slot: int, operation: str, timeout_s: float, rank: int, world_size: int) -> None:
        self.operation, self.timeout_s, self.rank, self.world_size = operation, timeout_s, rank, world_size
        self._armed, self._slot = armed, slot
        self._timeout_ns = int(timeout_s * 1e9)
        self._started = 0

    def __enter__(self) -> "Guard":
        self._started = self._armed[self._slot] = _now_ns()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Any) -> bool:
        self._armed[self._slot] = 0
        if (exc_type is not None and issubclass(exc_type, RuntimeError)
                and not issubclass(exc_type, CommunicationTimeout)):
            elapsed = _now_ns() - self._started
            if elapsed >= self._timeout_ns:
                raise CommunicationTimeout(
                    self.operation, self.rank, self.world_size, self.timeout_s,
                    detail=f"it gave up after {elapsed / 1e9:.1f}s ({type(exc).__name__}: {exc})") from exc
        return False


class Watchdog:
    """One watchdog process and the shared table of this process's guarded calls.

    Args:
        grace_s: seconds past a call's deadline before the process is ended.
        tick_s: how often the watchdog process looks.
        slots: how many distinct guards (operation, deadline, rank) this process may have.
    """

    def __init__(self, grace_s: float = GRACE_S, tick_s: float = TICK_S, slots: int = MAX_SLOTS) -> None:
        self.grace_s, self.tick_s, self.slots = grace_s, tick_s, slots
        self._pid = os.getpid()
        size = _HEADER_BYTES + slots * (8 + _META.size)
        fd = _shared_memory(size)
        try:
            self._table = mmap.mmap(fd, size)
            _HEADER.pack_into(self._table, 0, _MAGIC, slots, 0, 0)
            self._armed = memoryview(self._table)[_HEADER_BYTES:_HEADER_BYTES + 8 * slots].cast("q")
            self._guards: dict[tuple[str, float, int, int], Guard] = {}
            self._lock = threading.Lock()
            self.exit_signal = _bind_exit_signal()
            self._process = self._start(fd)
        finally:
            os.close(fd)  # the mapping (and the watchdog process's copy of the descriptor) keep it alive
        atexit.register(self.close)

    def _start(self, fd: int) -> Optional[subprocess.Popen]:
        args = [sys.executable, "-I", "-S", "-c", _WATCHDOG_SOURCE, str(fd), str(os.getpid()), str(self.slots),
                str(self.tick_s), str(self.exit_signal), str(EXIT_CODE if self.exit_signal == EXIT_SIGNAL else -9)]
        try:
            return subprocess.Popen(args, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except (OSError, ValueError) as exc:
            logger.error("deepep-switch: cannot start the watchdog process (%s): a DeepEP call that blocks past "
                         "its deadline will hang this process instead of ending it", exc)
            return None

    @property
    def alive(self) -> bool:
        """Whether the watchdog process is running."""
        return self._process is not None and self._process.poll() is None

    def guard(self, operation: str, timeout_s: float, rank: int, world_size: int) -> Guard:
        """The guard for ``operation`` on this rank with this deadline (one per distinct combination)."""
        key = (operation, float(timeout_s), int(rank), int(world_size))
        with self._lock:
            guard = self._guards.get(key)
            if guard is None:
                slot = len(self._guards)
                if slot >= self.slots:
                    raise RuntimeError(f"deepep-switch watchdog: more than {self.slots} distinct guards")
                limit_ns = int((timeout_s + self.grace_s) * 1e9)
                _META.pack_into(self._table, _HEADER_BYTES + 8 * self.slots + _META.size * slot, limit_ns,
                                int(timeout_s * 1e6), rank, world_size, operation.encode()[:64])
                guard = self._guards[key] = Guard(self._armed, slot, operation, timeout_s, rank, world_size)
                _HEADER.pack_into(self._table, 0, _MAGIC, self.slots, slot + 1, 0)
            return guard

    def close(self) -> None:
        """Stop the watchdog process (at interpreter exit; guards stop being watched)."""
        if self._process is None or os.getpid() != self._pid:  # a forked child must not stop its parent's
            return
        _HEADER.pack_into(self._table, 0, _MAGIC, self.slots, len(self._guards), 1)
        process, self._process = self._process, None
        try:
            process.wait(timeout=max(1.0, 3 * self.tick_s))
        except subprocess.TimeoutExpired:
            process.kill()


def _shared_memory(size: int) -> int:
    """A file descriptor of ``size`` zeroed bytes that a child process can map."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("deepep-switch-watchdog", 0)  # not inherited unless passed explicitly
    else:  # pragma: no cover - DeepEP runs on Linux only
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


def _bind_exit_signal() -> int:
    """Bind :data:`EXIT_SIGNAL` to libc ``_exit`` (runs without the GIL); returns the signal the watchdog sends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        bind = libc.signal
        bind.restype, bind.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p)
        previous = bind(EXIT_SIGNAL, ctypes.cast(libc._exit, ctypes.c_void_p).value)
    except (OSError, AttributeError, TypeError) as exc:
        logger.warning("deepep-switch watchdog: cannot bind signal %d to _exit (%s); a stuck process will be "
                       "ended with SIGKILL instead", EXIT_SIGNAL, exc)
        return int(signal.SIGKILL)
    if previous == ctypes.c_void_p(-1).value:  # SIG_ERR
        logger.warning("deepep-switch watchdog: signal(%d) failed; a stuck process will be ended with SIGKILL",
                       EXIT_SIGNAL)
        return int(signal.SIGKILL)
    return EXIT_SIGNAL


_WATCHDOG: Optional[Watchdog] = None
_WATCHDOG_LOCK = threading.Lock()


def get_watchdog() -> Watchdog:
    """This process's watchdog, started on first use."""
    global _WATCHDOG
    if _WATCHDOG is None:
        with _WATCHDOG_LOCK:
            if _WATCHDOG is None:
                _WATCHDOG = Watchdog()
    return _WATCHDOG


def _forget_after_fork() -> None:
    global _WATCHDOG, _WATCHDOG_LOCK
    _WATCHDOG, _WATCHDOG_LOCK = None, threading.Lock()  # the parent's watchdog watches the parent, not us


os.register_at_fork(after_in_child=_forget_after_fork)
