"""The ``deepep-switch`` command: ``demo``, ``doctor``, ``bench`` and ``ab``, one module per subcommand.

This package is the user interface: it prints. The library modules only log.

Exit codes: 0 success; 1 cannot run (the requested provider or backend cannot run here, a rank failed, the demo's
results do not match); 2 usage error (bad arguments). Every error is one line on stderr,
``deepep-switch: error: ...``, never a traceback; ``--debug`` shows the traceback instead. Arguments are checked
before any work: nothing is spawned for a run that cannot succeed.

A subcommand is a module with ``add_parser(sub)`` (its arguments, ``set_defaults(func=...)``) and the function
that runs it; :data:`SUBCOMMANDS` lists them in ``--help`` order.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from typing import Optional, Sequence

from ..decision import BackendUnavailableError
from ..launch import LaunchError
from .. import metrics_bench  # its own module: RTP_LLM_DEEPEP_METRICS on vs off
from . import ab, bench, demo, doctor
from .common import (EXIT_CANNOT_RUN, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, CannotRunError, CliError, Parser,
                     UsageError)

__all__ = ["EXIT_CANNOT_RUN", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "PROG", "CannotRunError", "CliError",
           "UsageError", "build_parser", "main"]

SUBCOMMANDS = (demo, doctor, bench, ab, metrics_bench)

_DESCRIPTION = ("Switch MoE expert-parallel communication between DeepEP generations: legacy Buffer, 2.1's "
                "ElasticBuffer, 2.5's EPBuffer.")
_EPILOG = """exit codes: 0 ok; 1 cannot run here (provider or backend unavailable, a rank failed, demo mismatch);
2 usage error (bad arguments). Errors are one line on stderr; --debug shows the traceback instead."""


def build_parser() -> argparse.ArgumentParser:
    """The ``deepep-switch`` argument parser (its errors raise :class:`UsageError`)."""
    parser = Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log deepep-switch decisions (INFO)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback instead of one line; log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


# ------------------------------------------------------------------------------------------------- errors
_RANK_FAILED = re.compile(r"^rank (\d+) failed:$", re.M)


def _launch_failure(text: str) -> str:
    """One line from a :class:`LaunchError`'s text: each failed rank with its exception's last line (ranks that
    failed the same way are named together); a timeout or a dead rank as launch words it."""
    parts = _RANK_FAILED.split(text)
    if len(parts) < 3:
        return text
    by_error: dict[str, list[str]] = {}
    for rank, body in zip(parts[1::2], parts[2::2]):
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        by_error.setdefault(lines[-1] if lines else "no traceback", []).append(rank)
    return "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(ranks)} failed: {error}"
                     for error, ranks in by_error.items()) + " (--debug shows the ranks' tracebacks)"


def _report(exc: BaseException, debug: bool) -> int:
    """The one error-reporting path: a traceback with ``--debug``, else one line. Returns the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        code, text = EXIT_INTERRUPTED, "interrupted"
    elif isinstance(exc, CliError):
        code, text = exc.exit_code, str(exc)
    elif isinstance(exc, LaunchError):
        code, text = EXIT_CANNOT_RUN, _launch_failure(str(exc))
    elif isinstance(exc, BackendUnavailableError):
        code, text = EXIT_CANNOT_RUN, str(exc)
    else:
        code, text = EXIT_CANNOT_RUN, f"{type(exc).__name__}: {exc} (unexpected; --debug shows the traceback)"
    sys.stdout.flush()
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    else:
        print(f"{PROG}: error: {' '.join(text.split())}", file=sys.stderr)
    return code


class _LibraryRecordsHidden(logging.Filter):
    """Drops the library's log records in the CLI process: what matters reaches the user through the CLI itself
    (doctor's report, the one error line, which carries the settings problems); the ranks log for themselves.
    ``-v`` / ``--debug`` show them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("deepep_switch", "routers"))


def _configure_logging(verbose: bool, debug: bool) -> None:
    """WARNING to stderr (INFO with -v, DEBUG with --debug); the library's own records only with -v/--debug."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not (verbose or debug):
        for handler in logging.getLogger().handlers:
            handler.addFilter(_LibraryRecordsHidden())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``deepep-switch``; returns the exit code (0 ok, 1 cannot run, 2 usage error, 130 interrupted)."""
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        _configure_logging(args.verbose, debug)
        return int(args.func(args))
    except (Exception, KeyboardInterrupt) as exc:
        return _report(exc, debug)
