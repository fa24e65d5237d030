"""The knowledge probe (docs/METHOD.md section 2): 4-choice recognition questions -> mastery table.

* :mod:`karl_verl.probe.questions`: probe set loading and question building (pure);
* :mod:`karl_verl.probe.scoring`: reading a chosen letter, accuracies, the table (pure);
* :mod:`karl_verl.probe.runner`: :func:`run_probe` with any backend of :mod:`karl_verl.backends`.

Importing this package imports neither torch nor verl.
"""

from karl_verl.probe.questions import (
    LETTERS,
    ProbeError,
    ProbeItem,
    ProbeQuestion,
    build_questions,
    load_probe_set,
)
from karl_verl.probe.runner import ProbeResult, QuestionFailure, TooFewAnswers, run_probe
from karl_verl.probe.scoring import parse_choice

__all__ = [
    "LETTERS",
    "ProbeError",
    "ProbeItem",
    "ProbeQuestion",
    "ProbeResult",
    "QuestionFailure",
    "TooFewAnswers",
    "build_questions",
    "load_probe_set",
    "parse_choice",
    "run_probe",
]
