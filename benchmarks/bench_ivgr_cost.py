"""What iVGR costs a step of verl's real main_ppo on CPU: off vs the code before iVGR, and the judge's share when on.

The setup is the iVGR main_ppo test's: a 1-category world (3 of 4 entities known), a tiny Qwen3-VL
warmed up on the plain prompts and both stream templates, the initial mastery table, and the local
rule judge (:class:`karl_verl.judge.RuleJudgeServer`). Three arms of ``main_ppo +recipe=karl_kvg_cpu``
with the same data, model, seed and overrides, alternated each repeat so machine noise hits all:

* ``before``: karl-verl as it was before iVGR reached the trainer (:data:`PRE_IVGR_REVISION`, exported
  with ``git archive`` and put first on the run's ``PYTHONPATH``, so every process of the run, Ray's
  workers included, imports it), iVGR not there at all;
* ``off``: this checkout with ``karl.ivgr.enable=false`` (the default): the feature is never built;
  what remains of iVGR in a step is a few calls in the trainer (:func:`added_calls_seconds`);
* ``on``: this checkout with iVGR on (both streams, the teacher cache, the judge; the PPO mini-batch
  doubled with the rows, as docs/ivgr.md advises: every arm has karl_kvg's two mini-batches a step).

Figures (the first step of each run, every worker's warm-up, left out):

* iVGR off, what it costs a step: with iVGR off the feature is never built, and all that iVGR added
  to a step is a few calls in the trainer (:func:`added_calls_seconds`, timed directly); the figure
  is (median step time + their time) / median step time (target: at most 1.02x, "a step with iVGR
  off is unchanged").
* iVGR off against before iVGR, end to end: the ratio of median step times. It is printed, not held
  to the target: on this machine it is run-to-run noise. The rollout phase (``timing_s/gen``) is
  measured in whole 0.2 s polls of verl's replay buffer (the CPU layer's interval), so a run whose
  rollouts end just past a poll loses 0.2 s a step (10-15%); sampled answers differ from step 2 on
  even between runs of one arm. Three runs (3, 2 and 2 repeats) measured 0.97x, 1.17x and 1.04x.
* iVGR on over off (twice the rollouts, longer prompts) and the judge's share of an iVGR step
  (``ivgr/judge_time_share``).

The rule judge answers in milliseconds; ``--judge-delay`` adds a delay per request to see the share
of a slower judge (an LLM behind the same HTTP interface answers in 0.1-1 s). Needs the git history
(``git archive``).

    python benchmarks/bench_ivgr_cost.py                  # about 12 minutes on 2 cores
    python benchmarks/bench_ivgr_cost.py --judge-delay 0.3
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from _main_ppo_runs import RunFailed, exit_code, step_metric

from karl_verl.dryrun.launch import replace_overrides, run_main_ppo
from karl_verl.dryrun.pipeline import CPU_RECIPE, training_environment
from karl_verl.experiment.runner import ExperimentOptions, arm_overrides, prepare_stream_world
from karl_verl.judge import RuleJudgeServer
from karl_verl.world import WorldConfig

REPO = Path(__file__).resolve().parents[1]
#: The last commit before iVGR reached the trainer (the next one, 0ed5179, wired the Ivgr feature in);
#: between it and iVGR's commits nothing else in a karl step's path changed.
PRE_IVGR_REVISION = "32333ad186939e59751c97cf8171dabc3ba7b726"
#: As the iVGR main_ppo test: 8 training instances, 4 a step.
WORLD = WorldConfig(categories=1, known_per_category=3, train_images=8, val_images=4, warmup_images=16,
                    warmup_probe_per_entity=4, probe_images_per_entity=4)
TEMPLATES = {"grounded": "{question}  Reason with boxes [x1,y1,x2,y2] in <think> </think>.",
             "textual": "{question}  Reason in words only in <think> </think>."}
ARMS = ("before", "off", "on")


def export_revision(revision: str, dest: Path) -> Path:
    """karl-verl's packages at ``revision`` laid out under ``dest`` as an install lays them out (for
    ``PYTHONPATH``): ``karl_verl``, ``hydra_plugins`` and the top-level ``recipes/`` as ``karl_verl/recipes``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, "karl_verl",
                              "hydra_plugins", "recipes"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {revision} in {REPO} failed (this benchmark needs the repository's history): "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "recipes").rename(dest / "karl_verl" / "recipes")
    if (dest / "karl_verl" / "integration" / "features" / "ivgr.py").exists():
        raise SystemExit(f"{revision} already has the iVGR trainer feature: not a before-iVGR revision")
    return dest


def _imported_from(env: dict[str, str], cwd: Path) -> Path:
    """Where a process with ``env`` started in ``cwd`` imports karl_verl from (as a run's processes do)."""
    found = subprocess.run([sys.executable, "-c", "import karl_verl; print(karl_verl.__file__)"],
                           env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, check=True)
    return Path(found.stdout.strip()).parent


def added_calls_seconds(repeats: int = 20_000) -> float:
    """Seconds a step with iVGR off spends in the calls iVGR added to the trainer, timed directly.

    Per step: :meth:`KarlTrainer.karl_rows_per_prompt` (in ``_step_once``), every feature's
    ``expand_prompts`` (in ``_fetch_one_gen_batch``) and the ``before_advantage`` dispatch (in
    ``_compute_advantage``): the trainer's own methods over as many no-op features as karl-verl has
    (every one of them, an upper bound on what a run builds). A refill calls ``karl_rows_per_prompt``
    once more, with dynamic sampling only.
    """
    import importlib
    import timeit
    from types import SimpleNamespace

    # The trainer first: it loads verl's trainer, which the features' modules need loaded before them.
    from karl_verl.integration.trainer import KarlTrainer

    features = importlib.import_module("karl_verl.integration.features")
    trainer = SimpleNamespace(karl_features=[features.TrainerFeature(trainer=None) for _ in features.FEATURES])
    batch, metrics = object(), {}

    def one_step() -> None:
        KarlTrainer.karl_rows_per_prompt(trainer)
        expanded = batch
        for feature in trainer.karl_features:
            expanded = feature.expand_prompts(expanded)
        KarlTrainer.karl_dispatch(trainer, "before_advantage", batch, metrics)

    return min(timeit.repeat(one_step, number=repeats, repeat=5)) / repeats


def measure(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print its table, return its figures (``ivgr_off_over_before``, ...)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run (default 5; the first is left out)")
    parser.add_argument("--judge-delay", type=float, default=0.0,
                        help="seconds the rule judge waits before each answer (default 0)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be at least 2 (the first is left out) and --repeats at least 1")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="karl-bench-ivgr-"))
    options = ExperimentOptions(workdir=workdir, arms=("karl",), steps=args.steps, test_freq=args.steps,
                                refresh_every_steps=0, batch_size=4, rollout_n=4, temperature=0.7,
                                max_response_length=96, warmup_steps=100, warmup_batch_size=4, warmup_lr=3e-3,
                                progress=False, timeout_s=900.0, world=WORLD)
    print(f"setup: world, warm-up on plain and stream prompts, initial mastery table (in {workdir})")
    files, report = prepare_stream_world(options, TEMPLATES, include_plain=True)
    print(f"  warm-up loss {report.warmup_loss[0]:.2f} -> {report.warmup_loss[1]:.2f}")
    before_code = export_revision(PRE_IVGR_REVISION, workdir / "before_ivgr")
    before_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(before_code), os.environ.get("PYTHONPATH")]))}
    if _imported_from(before_env, workdir) != before_code / "karl_verl":
        raise SystemExit(f"with PYTHONPATH={before_env['PYTHONPATH']} karl_verl is not imported from {before_code}")

    step_times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    shares: list[float] = []
    judge_seconds: list[float] = []
    judged: list[float] = []
    peaks: dict[str, int] = {arm: 0 for arm in ARMS}
    with RuleJudgeServer(delay_s=args.judge_delay) as judge:
        for repeat in range(args.repeats):
            for arm in ARMS:
                run_dir = workdir / f"{arm}{repeat}"
                # karl_kvg's ratio: mini-batches of half the step's prompts (two optimizer steps a step).
                overrides = replace_overrides(
                    arm_overrides(options, "karl", files, run_dir), "trainer.test_freq=-1",
                    "trainer.val_before_train=false", "trainer.save_freq=-1",
                    f"actor_rollout_ref.actor.ppo_mini_batch_size={options.batch_size // 2}",
                    f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={options.batch_size // 2}")
                if arm == "on":
                    overrides = replace_overrides(
                        overrides, "karl.ivgr.enable=true", f"karl.ivgr.judge_url={judge.url}",
                        f"karl.ivgr.templates_path={files['templates']}",
                        f"actor_rollout_ref.actor.ppo_mini_batch_size={options.batch_size}")
                env = {**training_environment(), **(before_env if arm == "before" else {})}
                run = run_main_ppo(CPU_RECIPE, overrides, metrics_path=run_dir / "metrics.jsonl",
                                   log_path=run_dir / "main_ppo.log", env=env, timeout_s=options.timeout_s,
                                   cwd=workdir)
                if not run.ok or len(run.steps) != args.steps:
                    raise RunFailed(f"{arm} run {repeat} failed (rc {run.returncode}, {len(run.steps)} of "
                                    f"{args.steps} steps):\n{run.log_tail()}")
                times = step_metric(run, "timing_s/step")
                step_times[arm] += times
                peaks[arm] = max(peaks[arm], run.peak_memory_bytes)
                if arm == "on":
                    shares += step_metric(run, "ivgr/judge_time_share")
                    judge_seconds += step_metric(run, "ivgr/judge_time_s")
                    judged += step_metric(run, "ivgr/judged_rollouts")
                print(f"  {arm} run {repeat}: {run.seconds:.0f} s, steps {[round(t, 2) for t in times]}")

    before, off, on = (statistics.median(step_times[arm]) for arm in ARMS)
    added_s = added_calls_seconds()
    share = statistics.median(shares) if shares else 0.0
    judge_s = statistics.median(judge_seconds) if judge_seconds else 0.0
    print()
    label = f"benchmark (2-core CPU, tiny Qwen3-VL, 4 prompts x n=4, rule judge +{args.judge_delay:g} s)"
    print(f"{label:<72}{'figure':>10}{'target':>10}")
    print(f"{'median step time, before iVGR (' + PRE_IVGR_REVISION[:7] + ')':<72}{before:>9.2f}s")
    print(f"{'median step time, iVGR off':<72}{off:>9.2f}s")
    print(f"{'calls iVGR added to a step, with iVGR off (timed directly)':<72}{added_s * 1e6:>8.1f}us")
    print(f"{'iVGR off: (step + those calls) / step':<72}{(off + added_s) / off:>9.5f}x{'<= 1.02x':>10}")
    print(f"{'iVGR off / before iVGR median step time (run-to-run noise: see above)':<72}{off / before:>9.3f}x")
    print(f"{'median step time, iVGR on (both streams: 2x rollouts)':<72}{on:>9.2f}s")
    print(f"{'iVGR on / off step time':<72}{on / off:>9.3f}x")
    print(f"{'judge share of an iVGR step (median ivgr/judge_time_share)':<72}{share:>10.1%}")
    print(f"{'judge time a step (median), textual rollouts judged a step (mean)':<72}{judge_s:>9.3f}s"
          f"  {statistics.mean(judged) if judged else 0:.1f}")
    print(f"{'peak memory of a run, before / off / on':<72}"
          f"{' / '.join(f'{peaks[arm] / 2**30:.1f}' for arm in ARMS)} GiB")
    print(f"(measured steps per arm: {len(step_times['off'])}; outputs in {workdir})")
    return {"ivgr_step_s_before": before, "ivgr_step_s_off": off, "ivgr_step_s_on": on,
            "ivgr_off_added_s": added_s, "ivgr_off_overhead": (off + added_s) / off,
            "ivgr_off_over_before": off / before,
            "ivgr_on_over_off": on / off, "ivgr_judge_share": share, "ivgr_judge_s_per_step": judge_s}


def main(argv: list[str] | None = None) -> int:
    return exit_code(measure, argv)


if __name__ == "__main__":
    sys.exit(main())
