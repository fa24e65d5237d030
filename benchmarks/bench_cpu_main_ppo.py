"""verl's real main_ppo on CPU: the karl trainer's step time against verl's stock sync trainer, side by side.

Both run ``karl_kvg_cpu`` on the same built-in data and warmed-up tiny Qwen3-VL, with the same reward
manager; they differ only in ``trainer.v1.trainer_mode`` (``karl`` vs ``sync``) and the estimator
(``karl_grpo`` vs ``grpo``). The karl runs do not refresh mastery (``refresh_every_epochs=0``), so
the ratio is the per-step overhead of level tagging, the level fetch, karl_grpo and the per-level
metrics (goal: at most 5%). The ``features`` runs are the karl runs with karl-verl's additions
beyond the paper switched on the way a user would leave them while not injecting: the mastery-aware
prompt sampler (``karl/curriculum=focus``: per-level weights and the band-pass) and the
knowledge-infusion agent loop (``karl_inject_agent``) with ``karl.inject.enable=false`` (goal: at
most 5% over the karl runs). A last run with the dry run's schedule (probe at train begin, refresh
every epoch) gives the probe's share of the training time. Runs alternate (karl, sync, features,
karl, ...) so that machine noise hits all; the first step of each run (warm-up of every worker) is
left out.

    python benchmarks/bench_cpu_main_ppo.py --repeats 2 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _main_ppo_runs import RunFailed, exit_code, step_metric

from karl_verl.dryrun.pipeline import DryRunOptions, DryRunReport, prepare_inputs, train, training_overrides


def measure(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print its table, return its figures (``karl_over_sync``, ``features_over_karl``, ...)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (default 4; the first is left out)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="karl-bench-cpu-"))
    options = DryRunOptions(workdir=workdir, progress=False, steps_per_epoch=2, epochs=max(1, args.steps // 2))
    report = DryRunReport()
    paths = prepare_inputs(options, report, say=lambda _: None)
    variants = {
        "karl": ["karl.mastery.refresh_every_epochs=0"],
        "sync": ["trainer.v1.trainer_mode=sync", "algorithm.adv_estimator=grpo", "karl.mastery.refresh_every_epochs=0"],
        "features": ["karl.mastery.refresh_every_epochs=0", "karl/curriculum=focus", "karl.inject.enable=false",
                     "actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent"],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    peaks: list[int] = []
    for repeat in range(args.repeats):
        for name, extra in variants.items():
            run_options = DryRunOptions(**{**vars(options), "extra_overrides": tuple(extra)})
            run_dir = workdir / f"{name}{repeat}"
            run = train(run_options, paths, f"{name}{repeat}", training_overrides(
                run_options, paths, checkpoints=run_dir / "checkpoints", hydra_dir=run_dir / "hydra",
                total_epochs=options.epochs, total_steps=args.steps) + ["trainer.save_freq=-1", "trainer.test_freq=-1"],
                args.steps)
            if not run.ok:
                raise RunFailed(f"{name} run {repeat} failed (rc {run.returncode}):\n{run.log_tail()}")
            step_times = step_metric(run, "timing_s/step")
            times[name] += step_times
            walls[name].append(run.seconds)
            peaks.append(run.peak_memory_bytes)
            print(f"  {name} run {repeat}: {run.seconds:.0f} s, steps {[round(t, 2) for t in step_times]}")

    start = time.monotonic()
    share_dir = workdir / "probe_share"
    probe = train(options, paths, "probe_share", training_overrides(
        options, paths, checkpoints=share_dir / "checkpoints", hydra_dir=share_dir / "hydra",
        total_epochs=options.epochs, total_steps=args.steps) + ["trainer.save_freq=-1", "trainer.test_freq=-1"],
        args.steps)
    probe_wall = time.monotonic() - start
    step_total = sum(float(r["data"].get("timing_s/step", 0.0)) for r in probe.steps)
    probe_total = sum(float(r["data"].get("karl/refresh/probe_time_s", 0.0)) for r in probe.steps)
    refreshes = sum(1 for r in probe.steps if "karl/refresh/probe_time_s" in r["data"])

    karl, sync, features = (statistics.median(times[name]) for name in ("karl", "sync", "features"))
    print()
    print(f"{'benchmark (2-core CPU, tiny Qwen3-VL, 4 prompts x n=4)':<64}{'figure':>12}{'target':>10}")
    print(f"{'median step time, karl trainer (no refresh)':<64}{karl:>11.2f}s")
    print(f"{'median step time, verl sync trainer + grpo':<64}{sync:>11.2f}s")
    print(f"{'karl / sync step time':<64}{karl / sync:>11.3f}x{'<= 1.05x':>10}")
    print(f"{'median step time, karl + curriculum + inject agent loop (inject off)':<64}{features:>11.2f}s")
    print(f"{'features / karl step time':<64}{features / karl:>11.3f}x{'<= 1.05x':>10}")
    print(f"{'probe share of training time (' + str(refreshes) + ' probes, ' + str(len(probe.steps)) + ' steps)':<64}"
          f"{probe_total / max(probe_total + step_total, 1e-9):>11.1%}")
    print(f"{'main_ppo wall time per run (karl / sync / features, mean)':<64}"
          f"{statistics.mean(walls['karl']):>4.0f}s/{statistics.mean(walls['sync']):.0f}s/"
          f"{statistics.mean(walls['features']):.0f}s")
    print(f"{'probe-share run wall time':<64}{probe_wall:>11.0f}s")
    print(f"{'peak memory of a run (sum of its processes)':<64}{max(peaks + [probe.peak_memory_bytes]) / 2**30:>10.1f}G"
          f"{'< 8G':>10}")
    print(f"(outputs in {workdir})")
    return {"step_s_karl": karl, "step_s_sync": sync, "karl_over_sync": karl / sync, "step_s_features": features,
            "features_over_karl": features / karl,
            "probe_share": probe_total / max(probe_total + step_total, 1e-9),
            "run_wall_s": statistics.mean(walls["karl"]),
            "peak_memory_gib": max(peaks + [probe.peak_memory_bytes]) / 2**30}


def main(argv: list[str] | None = None) -> int:
    return exit_code(measure, argv)


if __name__ == "__main__":
    sys.exit(main())
