"""The README's first command, once per test session: ``karl-verl dryrun`` (verl's real main_ppo on CPU
for two epochs, then a resumed run; about 2 minutes on 2 cores). Tests read what it wrote."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from karl_verl.dryrun.launch import read_step_metrics
from karl_verl.dryrun.report import TrainingSummary, summarize


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
        """One reference response per grounding prompt: the correct box in the answer format, with a
        rationale the model was not warmed up on (it fits the CPU recipe's 48 response tokens)."""
        import pyarrow.parquet as pq

        with path.open("w", encoding="utf-8") as handle:
            for row in pq.read_table(self.paths["grounding"]).to_pylist():
                box = row["reward_model"]["ground_truth"].split("<|box_start|>")[-1].split("<|box_end|>")[0]
                response = f"<think>It is the {row['extra_info']['entity']}.</think><answer>{box}</answer>"
                handle.write(json.dumps({"key": row["extra_info"]["index"], "response": response}) + "\n")
        return path


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory) -> DryRun:
    workdir = tmp_path_factory.mktemp("dryrun")
    result = subprocess.run([sys.executable, "-m", "karl_verl", "dryrun", "--workdir", str(workdir), "--no-progress"],
                            capture_output=True, text=True, timeout=1200, cwd=workdir)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((workdir / "dryrun_report.json").read_text())
    steps = {run: read_step_metrics(workdir / "metrics" / f"{run}.jsonl") for run in ("run1", "run2")}
    return DryRun(workdir=workdir, stdout=result.stdout, report=report, steps=steps,
                  summary=summarize(list(steps.items())))
