"""Run (or resume) a training run of ``tests/_support/trainer_harness.py`` in a fresh interpreter; write its
outcome as JSON.

    python resume_run.py WORKDIR OUT.json '{"mastery": {...}, "epochs": 3, ...}'

The resume test runs the second half of an interrupted run here, under another PYTHONHASHSEED, so
that anything depending on the interpreter (set or hash order, module state) would show as a
difference from the uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "_support"))  # tests/_support, as tests/conftest.py does

from trainer_harness import run_training  # noqa: E402

import karl_verl  # noqa: E402,F401  (registers the karl trainer, reward manager and estimator into verl)


def main() -> None:
    workdir, out, kwargs = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    if "faults" in kwargs:
        kwargs["faults"] = {int(step): kind for step, kind in kwargs["faults"].items()}
    outcome = run_training(workdir, **kwargs)
    out.write_text(json.dumps(outcome.to_json()), encoding="utf-8")


if __name__ == "__main__":
    main()
