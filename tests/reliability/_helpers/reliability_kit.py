"""Shared pieces of the reliability tests: the hypothesis profiles and the figures of a run.

Lives beside the tests (``tests/reliability/conftest.py`` puts this folder on ``sys.path``) so that
test modules import it by name, as the rest of the suite imports ``tests/_support``.

Profiles (``docs/RELIABILITY.md``):

* ``ci`` (default): derandomized (the same cases on every run, so CI is reproducible), a bounded
  number of examples, no deadline (a loaded 2-core CI machine must not turn slowness into failures);
* ``long``: many more examples, random seed, failures kept in ``.hypothesis/`` for replay.

Select with ``KARL_HYPOTHESIS_PROFILE=long`` (or pytest's ``--hypothesis-profile=long``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings

PROFILE_ENV = "KARL_HYPOTHESIS_PROFILE"
FIGURES_ENV = "KARL_RELIABILITY_FIGURES"

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=150,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    derandomize=False,
    max_examples=5000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_chosen: str | None = None


def choose_profile(name: str | None) -> str:
    """Fix the profile for this session: ``name`` (a CLI flag), else the env var, else ``ci``."""
    global _chosen
    _chosen = name or os.environ.get(PROFILE_ENV) or "ci"
    settings.get_profile(_chosen)  # fail early on a typo, naming the registered profiles
    return _chosen


def profile_name() -> str:
    return _chosen or choose_profile(None)


def profile() -> settings:
    """The hypothesis settings of the reliability tests (apply as a decorator)."""
    return settings.get_profile(profile_name())


def scaled(fraction: float) -> settings:
    """The profile with ``fraction`` of its examples, for properties that cost more per example."""
    base = profile()
    return settings(base, max_examples=max(10, int(base.max_examples * fraction)))


# ---------------------------------------------------------------------------------------------
# Figures of the run (the numbers docs/RELIABILITY.md quotes), printed at the end of the session.

FIGURES: Counter[str] = Counter()

#: Figure key -> what it counts, in report order.
FIGURE_NAMES = {
    "cases": "property-based cases tried",
    "kills": "SIGKILLs survived by the mastery file",
    "kills_mid_write": "of them landing inside a write (temp file left behind)",
    "reader_loads": "concurrent reader loads (none partial)",
    "faults": "probe faults injected (refresh abandoned, training went on)",
    "resumes": "resume-vs-uninterrupted comparisons",
    "bad_inputs": "bad inputs refused with file/row/field",
    "crafted_files": "crafted files read as data only",
}


def record(key: str, n: int = 1) -> None:
    FIGURES[key] += n


def summary_lines() -> list[str]:
    return [f"{FIGURES[key]:>8}  {text}" for key, text in FIGURE_NAMES.items() if FIGURES.get(key)]


def write_figures(path: str | os.PathLike[str]) -> None:
    data = {"profile": _chosen, **{key: FIGURES.get(key, 0) for key in FIGURE_NAMES}}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
