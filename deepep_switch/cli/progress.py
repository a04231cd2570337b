"""Progress on stderr for the subcommands that spawn ranks (bench, ab)."""

from __future__ import annotations

import sys
from typing import Any


class ProgressBar:
    """Progress on stderr, fed by rank 0 through a queue of ``(done, total, what)``: a bar redrawn in place on a
    terminal, one line per step otherwise. Plain text, no dependency."""

    WIDTH = 30

    def __init__(self, queue: Any, total: int, label: str) -> None:
        import threading

        self.queue, self.total, self.label = queue, total, label
        self.tty = sys.stderr.isatty()
        self.thread = threading.Thread(target=self._run, name="deepep-switch-progress", daemon=True)

    def __enter__(self) -> "ProgressBar":
        self._draw(0, "starting the ranks")
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            done, total, what = item
            self.total = total
            self._draw(done, what)

    def _draw(self, done: int, what: str) -> None:
        filled = self.WIDTH * done // max(self.total, 1)
        line = f"{self.label} [{'#' * filled}{'-' * (self.WIDTH - filled)}] {done:3d}/{self.total} {what}"
        sys.stderr.write(f"\r{line:<100}" if self.tty else line + "\n")
        sys.stderr.flush()

