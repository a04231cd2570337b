"""Deadlines on every wait for peer ranks.

* :class:`CommunicationTimeout`: what a rank raises when its peers did not join a communication in time (one
  crashed, hung, raised before communicating, or skipped the call), instead of blocking until the process
  group's own timeout (30 minutes by default) or forever.
* :class:`Peers`: a process group plus a deadline. Every collective issued through :meth:`Peers.collective`
  completes within ``timeout_s`` or raises :class:`CommunicationTimeout` naming the operation, this rank and,
  where the group's store can tell, the ranks that never arrived. The decision collectives and the reference
  providers' exchanges all wait through it.
* :class:`Deadline`: ``(timeout_s, rank, world_size)`` as the wrapper hands it to the paths; it builds the
  watchdog guards (:mod:`deepep_switch.watchdog`) for the host-blocking DeepEP calls that Python cannot bound.

After a :class:`CommunicationTimeout` the group must not be used again: the abandoned collective is still
queued on it and would pair with the next one a late peer issues. End the process (the job restarts) or tear
the group down.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .settings import env_name

if TYPE_CHECKING:  # annotations only: the watchdog imports this module
    from .watchdog import Guard

logger = logging.getLogger("deepep_switch.deadline")


class CommunicationTimeout(RuntimeError):
    """Peer ranks did not join a communication within the deadline (or it failed because a peer went away).

    Attributes:
        operation: what was waited for ("backend decision", "dispatch", "combine", "destroy", ...).
        rank / world_size: this rank and the size of the group.
        missing_ranks: the group ranks that never arrived, ascending; empty when unknown.
        timeout_s: the deadline that expired, in seconds.
    """

    def __init__(self, operation: str, rank: int, world_size: int, timeout_s: float,
                 missing_ranks: Sequence[int] = (), detail: str = "") -> None:
        self.operation = operation
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.missing_ranks = sorted(int(r) for r in missing_ranks)
        self.detail = detail
        who = (f"ranks {self.missing_ranks} never arrived" if self.missing_ranks
               else "some rank never arrived (the group cannot tell which)")
        super().__init__(
            f"deepep-switch {operation} on rank {rank}/{world_size}: not complete within the {timeout_s:g}s "
            f"deadline ({env_name('timeout_s')}): {detail or who}. The first error is in the log of the rank "
            "that did not arrive; this process group cannot be used again: end the process so the job restarts")

    def __reduce__(self) -> tuple[Any, ...]:  # survive pickling (multiprocessing results, tracebacks)
        return (type(self), (self.operation, self.rank, self.world_size, self.timeout_s, self.missing_ranks,
                             self.detail))


def group_size_and_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (the default group when None); ``(1, 0)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where ``group`` moves tensors: the current CUDA device for NCCL, the CPU for every other backend (gloo)."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- arrivals
class _Courier:
    """One daemon thread that makes every store request of this process, so that no caller ever blocks on the
    store (whose host may be the very rank that is stuck)."""

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def post(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="deepep-switch-store", daemon=True)
                    self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception as exc:  # a store that went away only costs the missing-rank diagnosis
                logger.debug("deepep-switch: store request failed: %s", exc)


_COURIER = _Courier()
_SEQUENCE: dict[str, int] = {}  # bounded collectives this process has entered, per group


def _reset_after_fork() -> None:
    global _COURIER
    _COURIER = _Courier()
    _SEQUENCE.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _default_store() -> Any:
    try:  # torch keeps the default group's store private; without it the missing ranks stay unknown
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


class Arrivals:
    """Which ranks entered the n-th bounded collective of a group.

    Each rank keeps, in the default group's store, the count of bounded collectives it has entered on this
    group (``store.add`` on its own key, sent by a background thread so the caller never waits for the store).
    Every rank issues the same collectives in the same order, so a rank that gave up on its n-th collective
    knows that the peers whose count is below n never arrived. Without a store every answer is "unknown" (``[]``).
    """

    _ASK_TIMEOUT_S = 2.0

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.world, self.rank = group_size_and_rank(group)
        self._store = _default_store() if self.world > 1 else None
        self._tag = _group_tag(group) if self.world > 1 else ""
        self._keys = [f"deepep_switch/arrivals/{self._tag}/{r}" for r in range(self.world)]

    def arrive(self) -> int:
        """Record that this rank enters its next bounded collective on the group; returns its sequence number."""
        seq = _SEQUENCE[self._tag] = _SEQUENCE.get(self._tag, 0) + 1
        if self._store is not None:
            store, key = self._store, self._keys[self.rank]
            _COURIER.post(lambda: store.add(key, 1))
        return seq

    def missing(self, seq: int) -> list[int]:
        """The peers that never entered collective ``seq`` (asked within a couple of seconds; ``[]`` if unknown)."""
        if self._store is None:
            return []
        replies: "queue.SimpleQueue[list[int]]" = queue.SimpleQueue()
        store, keys, me = self._store, self._keys, self.rank

        def ask() -> None:
            try:
                replies.put([r for r in range(len(keys)) if r != me and int(store.add(keys[r], 0)) < seq])
            except Exception as exc:
                logger.debug("deepep-switch: cannot read arrivals from the store: %s", exc)
                replies.put([])

        _COURIER.post(ask)
        try:
            return replies.get(timeout=self._ASK_TIMEOUT_S)
        except queue.Empty:
            return []


def _group_tag(group: Optional[dist.ProcessGroup]) -> str:
    pg = group if group is not None else dist.group.WORLD
    name = getattr(pg, "group_name", None)
    return str(name) if name else "-".join(map(str, dist.get_process_group_ranks(pg)))


# ---------------------------------------------------------------------------------------------- bounded waits
class Peers:
    """A process group with a deadline on every collective issued through it.

    Args:
        group: the process group (None = the default group).
        timeout_s: seconds to wait for each collective.
        error: the exception type raised on expiry (a :class:`CommunicationTimeout` subclass).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], timeout_s: float,
                 error: type[CommunicationTimeout] = CommunicationTimeout) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.group = group
        self.timeout_s = float(timeout_s)
        self.error = error
        self.world_size, self.rank = group_size_and_rank(group)
        self._arrivals = Arrivals(group)

    def collective(self, operation: str, issue: Callable[[], Optional[dist.Work]]) -> None:
        """Run one collective: ``issue()`` starts it with ``async_op=True`` and returns its ``Work``.

        Returns once it has completed (its outputs are then ready on the caller's stream); raises ``error``
        naming ``operation`` if it does not complete within ``timeout_s``, or if it fails (a peer closed its
        connection: it died).
        """
        seq = self._arrivals.arrive()
        work = issue()
        if work is None:
            return
        if not _completes(work, time.monotonic() + self.timeout_s):
            raise self.error(operation, self.rank, self.world_size, self.timeout_s, self._arrivals.missing(seq))
        try:
            work.wait()  # completed: this only orders the caller's stream after it (NCCL) or re-raises its error
        except RuntimeError as exc:
            raise self.error(operation, self.rank, self.world_size, self.timeout_s,
                             detail=f"the collective failed ({str(exc).splitlines()[0] if str(exc) else exc!r}): "
                                    "a peer went away") from exc


def _completes(work: dist.Work, deadline: float) -> bool:
    """Poll ``work`` until it completes (True) or ``deadline`` (``time.monotonic``) passes (False)."""
    pause = 2e-5
    while not work.is_completed():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return True


@dataclass(frozen=True)
class Deadline:
    """How long this rank waits for its peers, and who it is: what the wrapper hands to the paths.

    Attributes:
        timeout_s: the deadline in seconds (``RTP_LLM_DEEPEP_TIMEOUT_S``).
        rank / world_size: this rank in the EP group.
    """

    timeout_s: float
    rank: int
    world_size: int

    def guard(self, operation: str) -> "Guard":
        """A reusable watchdog guard for a host-blocking call named ``operation`` (build it once, enter it per
        call): see :mod:`deepep_switch.watchdog`."""
        from .watchdog import get_watchdog  # the watchdog imports this module

        return get_watchdog().guard(operation, self.timeout_s, self.rank, self.world_size)
