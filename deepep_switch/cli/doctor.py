"""``deepep-switch doctor``: the settings, the preflight checks and the single-process decision."""

from __future__ import annotations

import argparse
from typing import Any

from ..backends import registered
from ..settings import env_name, get_settings
from .common import EXIT_OK, CannotRunError, cannot_run, decide


def add_parser(sub: Any) -> None:
    """Register ``doctor`` on the subcommand parsers ``sub``."""
    doctor = sub.add_parser("doctor", help="show settings, preflight checks and the single-process decision; "
                                           "exit 1 when the requested backend cannot run here")
    doctor.add_argument("--internode", action="store_true")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the settings, preflight checks and decision; 1 when the requested backend cannot run here."""
    loaded = get_settings()
    decision = decide(loaded, internode=args.internode)
    if args.json:
        # warnings=False: decision.py stores the agreed knobs as ints in SwitchSettings' bool fields (they serialise
        # as 1/0 either way); pydantic would print one serializer warning per knob on stderr.
        print(decision.model_dump_json(indent=2, warnings=False))
    else:
        print("settings:", loaded.settings.model_dump_json())
        for problem in loaded.problems:
            print("  problem:", problem)
        report = decision.preflight
        print(f"preflight (provider={report.provider.value}): deep_ep={report.deep_ep_version} "
              f"nccl runtime={report.nccl_runtime_version} build={report.nccl_build_version} gpus={report.gpu_count}")
        for check in report.checks:
            gates = ",".join(b.value for b in check.gates) or "advisory"
            print(f"  [{'pass' if check.passed else 'FAIL'}] {check.name:18} ({gates}) {check.detail}")
        print("generations this process can run:")
        for spec in registered():
            print("  " + report.summary(spec.backend))
        print("decision:", decision.describe())
    problem = cannot_run(decision, f"{env_name('provider')}=reference", need_requested=True)
    if problem:
        raise CannotRunError(problem)
    return EXIT_OK

