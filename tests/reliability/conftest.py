"""Reliability tests (issue 6): hypothesis profile selection and the end-of-run figures.

``ci`` is the default profile; ``KARL_HYPOTHESIS_PROFILE=long`` (or ``--hypothesis-profile=long``)
runs many more examples. Set ``KARL_RELIABILITY_FIGURES=path.json`` to also write the figures
(cases tried, kills survived, faults injected) that docs/RELIABILITY.md quotes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_helpers"))

import reliability_kit  # noqa: E402  (needs the path above)


def pytest_configure(config) -> None:
    # Called when this conftest is registered, i.e. before the test modules here are imported, so
    # their @profile() decorators see the chosen profile.
    reliability_kit.choose_profile(config.getoption("hypothesis_profile", default=None))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    lines = reliability_kit.summary_lines()
    if not lines:
        return
    terminalreporter.section(f"karl-verl reliability figures (hypothesis profile {reliability_kit.profile_name()})")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get(reliability_kit.FIGURES_ENV)
    if path:
        reliability_kit.write_figures(path)
        terminalreporter.write_line(f"figures written to {path}")
