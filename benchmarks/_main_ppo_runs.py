"""What the main_ppo benchmarks share: a metric over a run's steps, the error of a failed run, and the
command-line ending that reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any


def step_metric(run: Any, key: str, *, skip_first: bool = True) -> list[float]:
    """``key`` of each step a run logged (a :class:`karl_verl.dryrun.launch.RunResult`) that has it; the
    first step, every worker's warm-up, left out unless ``skip_first`` is false."""
    records = run.steps[1:] if skip_first else run.steps
    return [float(r["data"][key]) for r in records if key in r["data"]]


class RunFailed(RuntimeError):
    """A benchmark's main_ppo run failed; the message holds the end of its log."""


def exit_code(measure: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``measure(argv)``; 0, or 1 after printing a :class:`RunFailed` to stderr."""
    try:
        measure(argv)
    except RunFailed as err:
        print(err, file=sys.stderr)
        return 1
    return 0
