"""Runs shared by the dry-run tests, once per test session (each ``main_ppo`` costs about 50 s to start).

* ``dry_run``: the README's first command, ``karl-verl dryrun`` (verl's real main_ppo on CPU for two
  epochs, then a resumed run; about 2 minutes on 2 cores). Tests read what it wrote.
* ``curriculum_runs``: the prompt curriculum uninterrupted, and the same run SIGKILLed in its second
  epoch and resumed (test_curriculum.py, test_faults.py; about 3 minutes).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runs import run_command
from references import write_references

from karl_verl.dryrun.launch import RunResult, read_step_metrics
from karl_verl.dryrun.pipeline import DryRunOptions, train, training_overrides
from karl_verl.dryrun.report import TrainingSummary, summarize
from karl_verl.mastery import LEVEL_NAMES


@dataclass
class DryRun:
    workdir: Path
    stdout: str
    report: dict
    steps: dict[str, list[dict]]
    summary: TrainingSummary

    def data(self, run: str) -> list[dict]:
        return [record["data"] for record in self.steps[run]]

    @property
    def paths(self) -> dict[str, Path]:
        """The inputs it built, as ``training_overrides`` takes them: data, probe set, warmed-up model."""
        return {"grounding": self.workdir / "data" / "grounding.parquet",
                "probe": self.workdir / "data" / "probe.parquet", "model": self.workdir / "tiny-qwen3-vl"}

    def write_references(self, path: Path) -> Path:
        """One reference response per grounding prompt (see ``tests/_support/references.py``)."""
        return write_references(self.paths["grounding"], path)


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory) -> DryRun:
    workdir = tmp_path_factory.mktemp("dryrun")
    # --device cpu: on a GPU node the default (auto) would run the GPU smoke test (tests/gpu) instead.
    result = run_command([sys.executable, "-m", "karl_verl", "dryrun", "--device", "cpu", "--workdir", str(workdir),
                             "--no-progress"], timeout=1200, cwd=workdir)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((workdir / "dryrun_report.json").read_text())
    steps = {run: read_step_metrics(workdir / "metrics" / f"{run}.jsonl") for run in ("run1", "run2")}
    return DryRun(workdir=workdir, stdout=result.stdout, report=report, steps=steps,
                  summary=summarize(list(steps.items())))


@dataclass
class CurriculumRuns:
    """``karl.curriculum`` with :attr:`weights` from the table :attr:`levels` (refresh_every_epochs=1
    re-probes before step 3): ``full`` trains 2 epochs of 2 steps (checkpoints at steps 2 and 4);
    ``crashed`` is the same run in its own folder, SIGKILLed (driver, Ray, workers) once step 3 is
    logged, after the step-2 checkpoint; ``resumed`` is a new main_ppo on that folder (steps 3 and 4)."""

    workdir: Path
    levels: dict[str, int]
    weights: tuple[float, ...]
    full: RunResult | None = None
    crashed: RunResult | None = None
    resumed: RunResult | None = None
    #: ``latest_checkpointed_iteration.txt`` of the crashed run's folder before the resume.
    latest_after_crash: str = ""

    def checkpoints(self, run: str) -> Path:
        """Checkpoint folder of ``full``, or of ``crashed`` and ``resumed`` (one folder)."""
        return self.workdir / ("checkpoints" if run == "full" else "crash_checkpoints")

    def rollouts(self, run: str) -> Path:
        """verl's rollout dumps (``trainer.rollout_data_dir``), one file per step."""
        return self.workdir / ("rollouts" if run == "full" else "crash_rollouts")


@pytest.fixture(scope="session")
def curriculum_runs(dry_run, tmp_path_factory) -> CurriculumRuns:
    workdir = tmp_path_factory.mktemp("curriculum")
    levels = {"Fiat 500": 1, "Mini Cooper": 2, "Mallard": 3, "Barn Owl": 3, "Airbus A380": 4, "Blue Jay": 5,
              "F-16 Fighting Falcon": 5}
    weights = (1.0, 0.0, 1.0, 0.0, 1.0)
    table = workdir / "table.json"
    table.write_text(json.dumps({e: {"knowledge_category": LEVEL_NAMES[k - 1]} for e, k in levels.items()}))
    options = DryRunOptions(workdir=workdir, progress=False)
    paths = dry_run.paths
    curriculum = ["karl.curriculum.enable=true", f"karl.curriculum.level_weights={list(weights)}",
                  "karl.curriculum.max_success_rate=0.99", "karl.curriculum.min_observations=4",
                  f"karl.mastery.table_path={table}"]
    runs = CurriculumRuns(workdir=workdir, levels=levels, weights=weights)

    def overrides(run: str) -> list[str]:
        return [*training_overrides(options, paths, checkpoints=runs.checkpoints(run),
                                    hydra_dir=workdir / "hydra" / run, total_epochs=2),
                *curriculum, f"trainer.rollout_data_dir={runs.rollouts(run)}"]

    runs.full = train(options, paths, "full", overrides("full"), 4)
    assert runs.full.ok, runs.full.log_tail()
    runs.crashed = train(options, paths, "crashed", overrides("crashed"), 4, kill_after_step=3)
    assert runs.crashed.killed_after_step == 3, runs.crashed.log_tail()
    runs.latest_after_crash = (runs.checkpoints("crashed") / "latest_checkpointed_iteration.txt").read_text().strip()
    runs.resumed = train(options, paths, "resumed", overrides("resumed"), 2)
    assert runs.resumed.ok, runs.resumed.log_tail()
    return runs
