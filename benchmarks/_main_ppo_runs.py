"""What the main_ppo benchmarks share: the error of a failed run, and the command-line ending that reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any


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
