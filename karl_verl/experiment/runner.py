"""``karl-verl experiment``: KARL vs GRPO on the synthetic world, through verl's real ``main_ppo`` (CPU).

Stages (what runs where):

1. world     :func:`karl_verl.world.build_world` (this process, Pillow)
2. warm-up   a tiny Qwen3-VL built from a config, then supervised steps on the world's known entities
             (:mod:`karl_verl.experiment.warmup`, this process, PyTorch on CPU)
3. probe     the warmed-up model answers the probe set (:func:`karl_verl.probe.runner.run_probe`,
             transformers in this process): the initial mastery table every arm starts from, and the
             levels the report groups validation cases by
             (``warm_start``: stages 2 and 3 are copied from an earlier experiment's workdir instead)
4. arms      one ``python -m verl.trainer.main_ppo +recipe=karl_kvg_cpu`` per arm from the same model,
             data and seed (a child process and its Ray cluster each); verl validates every
             ``test_freq`` steps and dumps every case (``trainer.validation_data_dir``)
5. report    per arm the rise of validation acc@0.5 and IoU from step 0 to the last step with paired
             bootstrap intervals; KARL vs GRPO and refreshed vs static mastery per level with McNemar p;
             refresh movements; ``experiment.json`` and PNG plots

On a GPU node the same arms run with ``+recipe=karl_kvg`` on real data; this module exists to show, on
a laptop, that the training loop learns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from karl_verl.experiment.stats import Case, Difference, by_level, mean_by_level, paired_difference, read_validation
from karl_verl.world import WorldConfig

#: Arm -> the ``main_ppo`` overrides that make it (on top of ``karl_kvg_cpu`` and the shared ones).
#: ``grpo`` is the ``karl_kvg_grpo`` recipe's change, key for key (docs/TRAINING.md, "Ablations").
ARMS: dict[str, tuple[str, ...]] = {
    "karl": (),
    "grpo": ("karl/reward=uniform", "algorithm.adv_estimator=grpo", "trainer.v1.trainer_mode=sync",
             "karl.mastery.refresh_every_epochs=0", "karl.mastery.refresh_every_steps=0"),
    "karl_static": ("karl.mastery.refresh_every_epochs=0", "karl.mastery.refresh_every_steps=0"),
}
#: ``ExperimentOptions.check_group`` values.
CHECK_GROUPS = ("all", "known")

ARM_DESCRIPTIONS: dict[str, str] = {
    "karl": "KA-IoU reward, karl_grpo, mastery refreshed by the probe",
    "grpo": "vanilla GRPO (uniform scales, verl's grpo, no probe)",
    "karl_static": "KARL with the initial mastery table, never refreshed",
}


@dataclass
class ExperimentOptions:
    workdir: Path
    arms: tuple[str, ...] = ("karl", "grpo", "karl_static")
    steps: int = 40
    test_freq: int = 20
    refresh_every_steps: int = 20
    #: 2 categories of 4 (8 entities): with 8 prompts a step each entity comes up about once a step,
    #: which 16 entities did not give the updates in 20-40 steps. Per category 1 known, 2 partly known
    #: (a few warm-up examples: greedy acc@0.5 about half), 1 never shown: RL moved never-shown
    #: entities from 0.000 to 0.035 in 40 steps, too few successes to learn from (measured, docs/EXPERIMENT.md).
    world: WorldConfig = field(default_factory=lambda: WorldConfig(
        categories=2, known_per_category=1, partial_per_category=2, partial_exposure=0.05))
    #: 300: after 500 steps (loss 0.056) the policy's entropy was 0.07 and a group's 8 samples were
    #: all right or all wrong, so GRPO had no signal and 20 steps left every greedy answer as it was.
    warmup_steps: int = 300
    warmup_lr: float = 2e-3
    warmup_batch_size: int = 8
    actor_lr: float = 5e-4
    batch_size: int = 8
    rollout_n: int = 8
    #: 1.2: at 1.0 a confident policy gave groups without a spread; at 1.5 the samples were noise
    #: (rollout acc@0.5 of known entities about 0.1); measured, docs/EXPERIMENT.md.
    temperature: float = 1.2
    max_response_length: int = 40
    #: Validation answers per case. 1: greedy (temperature 0), KVG-Bench's decoding. More: sampled at
    #: ``val_temperature``, a case scoring the mean of its answers (a rate, not right-or-wrong). Greedy answers
    #: of the tiny model change per entity, all of its cases at once, so 20 steps flip whole entities or
    #: nothing (runs of the same settings gave +0.109 and +0.000); the sampled rate moves with every
    #: update (docs/EXPERIMENT.md, "The quick check").
    val_samples: int = 1
    #: Temperature of sampled validation (val_samples > 1); None: the rollout temperature.
    val_temperature: float | None = None
    #: The validation cases whose rise decides LEARNED: ``all``, or ``known``, the entities the warm-up
    #: taught. In 40 steps RL sharpens what the tiny model knows (known entities, sampled acc@0.5 0.46 ->
    #: 0.61-0.69 in eight runs) while entities it barely knows go either way (in three runs one partly known
    #: entity rose 0.46-0.49 and another fell 0.36-0.46), so ``all`` rose +0.023 to +0.072 and learned in six
    #: of eight (docs/EXPERIMENT.md, "The quick check"). Every group is reported either way.
    check_group: str = "all"
    seed: int = 0
    progress: bool = True
    timeout_s: float = 1800.0
    #: Variables added to every ``main_ppo`` child (tests use it for fault injection).
    env: dict[str, str] = field(default_factory=dict)
    #: An earlier experiment's workdir: start from its warmed-up model and initial mastery table
    #: instead of warming up and probing again (same world, warm-up settings and seed; checked).
    warm_start: Path | None = None

    def check(self) -> None:
        """Raise ValueError naming every option that cannot work."""
        problems = [f"unknown arm {arm!r} (expected one of {', '.join(ARMS)})" for arm in self.arms if arm not in ARMS]
        for name in ("steps", "test_freq", "warmup_steps", "batch_size", "rollout_n", "max_response_length",
                     "val_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.check_group not in CHECK_GROUPS:
            problems.append(f"check_group: expected one of {', '.join(CHECK_GROUPS)}, got {self.check_group!r}")
        if self.steps % self.test_freq:
            problems.append(f"steps ({self.steps}) must be a multiple of test_freq ({self.test_freq}) so that the "
                            "last step is validated")
        if self.val_temperature is not None and self.val_temperature <= 0:
            problems.append(f"val_temperature: expected > 0 (val_samples 1 is greedy), got {self.val_temperature}")
        if self.refresh_every_steps < 0 or self.actor_lr <= 0 or self.temperature <= 0:
            problems.append("refresh_every_steps must be >= 0, and the learning rate and temperature > 0")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class ArmResult:
    name: str
    returncode: int
    seconds: float
    #: Validation step -> its cases.
    validations: dict[int, dict[str, Case]] = field(default_factory=dict)
    refreshes: list[dict[str, float]] = field(default_factory=list)
    rise: list[Difference] = field(default_factory=list)
    rise_iou: list[Difference] = field(default_factory=list)
    log: str = ""
    #: The group of ``rise`` and ``rise_iou`` that decides :attr:`learned` (``ExperimentOptions.check_group``).
    check_group: str = "all"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and len(self.validations) >= 2

    def checked(self, metric: str = "acc") -> Difference | None:
        """The rise of the check group in ``metric`` (``acc`` or ``iou``); None without validations."""
        rises = self.rise if metric == "acc" else self.rise_iou
        return next((d for d in rises if d.group == self.check_group), None)

    @property
    def learned(self) -> bool:
        """The check group's acc@0.5 and mean IoU both rose from step 0 to the last validation, CIs above 0."""
        acc, iou = self.checked("acc"), self.checked("iou")
        return self.ok and acc is not None and iou is not None and acc.low > 0 and iou.low > 0


@dataclass
class ExperimentReport:
    options: ExperimentOptions
    world: str = ""
    warmup_loss: tuple[float, float] | None = None
    initial_levels: dict[str, int] = field(default_factory=dict)
    known: list[str] = field(default_factory=list)
    arms: dict[str, ArmResult] = field(default_factory=dict)
    comparisons: dict[str, list[Difference]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.arms) and all(arm.learned for arm in self.arms.values())

    def summary_line(self) -> str:
        parts = [f"{name}: {arm.checked().format()}" if arm.checked() else f"{name}: no validation"
                 for name, arm in self.arms.items()]
        return ("LEARNED" if self.ok else "DID NOT LEARN") + " | " + " | ".join(parts)

    def format(self) -> str:
        lines = ["", "karl-verl experiment: KARL vs GRPO on the synthetic world (verl's main_ppo on CPU)", self.world]
        if self.warmup_loss:
            lines.append(f"warm-up: loss {self.warmup_loss[0]:.3f} -> {self.warmup_loss[1]:.3f}")
        counts: dict[int, int] = {}
        for level in self.initial_levels.values():
            counts[level] = counts.get(level, 0) + 1
        lines.append("initial mastery (probe of the warmed-up model): "
                     + ", ".join(f"level {k}: {counts[k]}" for k in sorted(counts)))
        for name, arm in self.arms.items():
            lines.append(f"\n{name} ({ARM_DESCRIPTIONS.get(name, '')}): rc {arm.returncode}, {arm.seconds:.0f} s")
            iou = [d for d in arm.rise_iou if d.group in ("all", arm.check_group)]
            lines += [f"  {d.format()}" for d in arm.rise + iou]
            for refresh in arm.refreshes:
                lines.append(f"  refresh at step {refresh['step']:.0f}: {refresh['up']:.0f} entities up, "
                             f"{refresh['down']:.0f} down; levels "
                             + " ".join(f"{refresh.get(f'level_{k}', 0):.0f}" for k in range(1, 6)))
        for title, differences in self.comparisons.items():
            lines.append(f"\n{title} at the last step (paired on the same validation cases):")
            lines += [f"  {d.format()}" for d in differences]
        lines.append("\ntime: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_seconds.items()))
        lines.append("(a tiny model on a synthetic world: it shows that the training loop learns, "
                     "not how Qwen3-VL-8B does on KVG-Bench)")
        lines.append(self.summary_line())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def curve(arm: ArmResult, metric: str) -> dict[str, dict[str, float]]:
            return {str(step): mean_by_level(cases, self.initial_levels, metric)
                    for step, cases in sorted(arm.validations.items())}

        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()}
        return {
            "ok": self.ok, "summary": self.summary_line(), "options": options, "world": self.world,
            "warmup_loss": self.warmup_loss, "initial_levels": self.initial_levels, "known": self.known,
            "arms": {name: {"returncode": arm.returncode, "seconds": arm.seconds, "learned": arm.learned,
                            "acc": curve(arm, "acc"), "iou": curve(arm, "iou"), "refreshes": arm.refreshes,
                            "rise": [d.to_json() for d in arm.rise], "rise_iou": [d.to_json() for d in arm.rise_iou],
                            "log": arm.log}
                     for name, arm in self.arms.items()},
            "comparisons": {title: [d.to_json() for d in ds] for title, ds in self.comparisons.items()},
            "stage_seconds": self.stage_seconds, "outputs": self.outputs,
        }


#: The options a warmed-up model depends on: a warm start must agree on every one.
WARM_START_KEYS = ("world", "warmup_steps", "warmup_lr", "warmup_batch_size", "seed")


@dataclass
class WarmStart:
    """What an earlier experiment left that a new one can start from (see :func:`read_warm_start`)."""

    model: Path
    table: Path
    initial_levels: dict[str, int]
    warmup_loss: tuple[float, float] | None


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def read_warm_start(options: ExperimentOptions) -> WarmStart:
    """The warmed-up model, initial table and levels of ``options.warm_start``; ValueError naming the file
    and the options that differ when that experiment was warmed up differently (or left no model)."""
    folder = Path(options.warm_start).resolve()
    report_path = folder / "experiment.json"
    try:
        earlier = json.loads(report_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"warm start: {report_path} not found (expected the workdir of an earlier "
                         "karl-verl experiment)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"warm start: {report_path} is not JSON ({err})") from None
    ours = asdict(options)
    theirs = earlier.get("options", {})
    differ = [f"{key} ({theirs.get(key)!r} there, {_as_json(ours[key])!r} here)" for key in WARM_START_KEYS
              if _as_json(ours[key]) != theirs.get(key)]
    if differ:
        raise ValueError(f"warm start: {report_path} was warmed up with other settings: " + "; ".join(differ))
    model, table = folder / "model", folder / "initial_mastery.json"
    missing = [str(path) for path in (model / "config.json", table) if not path.is_file()]
    if missing or not earlier.get("initial_levels"):
        raise ValueError(f"warm start: {folder} lacks " + (", ".join(missing) or "initial_levels in experiment.json"))
    loss = earlier.get("warmup_loss")
    return WarmStart(model=model, table=table, initial_levels={k: int(v) for k, v in earlier["initial_levels"].items()},
                     warmup_loss=tuple(loss) if loss else None)


def warm_up_model(options: ExperimentOptions, world_files: Mapping[str, Path], report: ExperimentReport,
                  model_dir: Path) -> Path:
    """Stage 2: build the tiny model and warm it up on the world's known entities; its folder."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from karl_verl.experiment.warmup import load_warmup_examples, supervised_steps
    from karl_verl.testing.tiny_qwen3vl import load_tiny_processor, save_tiny_checkpoint

    save_tiny_checkpoint(model_dir, seed=options.seed)
    processor = load_tiny_processor(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir)
    torch.manual_seed(options.seed)
    examples = load_warmup_examples(world_files["warmup"], processor)
    losses = supervised_steps(model, examples, steps=options.warmup_steps, lr=options.warmup_lr,
                              batch_size=options.warmup_batch_size, seed=options.seed, progress=options.progress)
    tail = losses[-min(20, len(losses)):]
    report.warmup_loss = (losses[0], sum(tail) / len(tail))
    model.save_pretrained(model_dir)
    return model_dir


def initial_table(options: ExperimentOptions, model_dir: Path, probe_file: Path, out: Path) -> dict[str, int]:
    """Stage 3: probe the warmed-up model (logprob mode, transformers); save and return the levels."""
    from karl_verl.backends.hf import HFBackend
    from karl_verl.config import MasteryConfig
    from karl_verl.probe.questions import build_questions, load_probe_set
    from karl_verl.probe.runner import run_probe

    backend = HFBackend.from_pretrained(model_dir, device="cpu", batch_size=16, progress=False)
    questions = build_questions(load_probe_set(probe_file), per_entity=options.world.probe_images_per_entity,
                                seed=options.seed)
    result = run_probe(questions, backend, mode="logprob", thresholds=MasteryConfig().thresholds,
                       progress=options.progress)
    result.table.save(out)
    return {entity: result.table.level_of(entity) for entity in result.per_entity_accuracy}


def prepare_stream_world(options: ExperimentOptions, templates: Mapping[str, str], *,
                         include_plain: bool = False) -> tuple[dict[str, Path], ExperimentReport]:
    """World, warm-up on both iVGR streams, initial mastery table, for a ``karl.ivgr.enable`` run.

    The world of ``options.world`` is built under ``options.workdir``; the tiny model is warmed up on
    :func:`karl_verl.world.write_stream_warmup`'s examples rendered with ``templates`` (also written as
    ``templates.json``, for ``karl.ivgr.templates_path``; ``include_plain`` adds the plain examples).
    Returns the files (:func:`arm_overrides` takes them; ``templates`` is the templates file) and the
    report holding the warm-up loss. Runs in this process (Pillow, PyTorch on CPU).
    """
    from karl_verl.world import build_world, write_stream_warmup

    workdir = Path(options.workdir)
    world = build_world(options.world, workdir / "world")
    files = dict(world.files)
    files["warmup"] = write_stream_warmup(world, templates, include_plain=include_plain)
    files["table"] = workdir / "initial_mastery.json"
    files["templates"] = workdir / "templates.json"
    files["templates"].write_text(json.dumps(dict(templates)))
    report = ExperimentReport(options=options)
    files["model"] = warm_up_model(options, files, report, workdir / "model")
    initial_table(options, files["model"], files["probe"], files["table"])
    return files, report


def _copy_warm_start(warm: WarmStart, report: ExperimentReport, workdir: Path, table: Path) -> Path:
    """Copy the earlier experiment's model and table here (this workdir stands alone); the model's folder."""
    import shutil

    model = workdir / "model"
    if model.resolve() != warm.model.resolve():
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(warm.model, model)
    if table.resolve() != warm.table.resolve():
        shutil.copyfile(warm.table, table)
    report.initial_levels, report.warmup_loss = dict(warm.initial_levels), warm.warmup_loss
    return model


def arm_overrides(options: ExperimentOptions, name: str, files: Mapping[str, Path], run_dir: Path) -> list[str]:
    """The ``main_ppo`` command line of one arm (after ``+recipe=karl_kvg_cpu``)."""
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; expected one of {sorted(ARMS)}")
    batch = options.batch_size
    return [
        f"data.train_files={files['train']}", f"data.val_files={files['val']}",
        f"actor_rollout_ref.model.path={files['model']}", f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"karl.mastery.table_path={files['table']}", f"karl.mastery.probe_data={files['probe']}",
        f"karl.mastery.probe_images_per_entity={options.world.probe_images_per_entity}",
        f"karl.mastery.refresh_every_steps={options.refresh_every_steps}", "karl.mastery.refresh_every_epochs=0",
        f"karl.mastery.seed={options.seed}",
        f"data.train_batch_size={batch}", f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch}",
        f"data.max_response_length={options.max_response_length}",
        f"actor_rollout_ref.actor.optim.lr={options.actor_lr}",
        f"actor_rollout_ref.rollout.n={options.rollout_n}",
        f"actor_rollout_ref.rollout.temperature={options.temperature}",
        f"actor_rollout_ref.rollout.seed={options.seed}", f"data.seed={options.seed}",
        f"trainer.total_training_steps={options.steps}", "trainer.total_epochs=1000", "trainer.save_freq=-1",
        f"trainer.test_freq={options.test_freq}", "trainer.val_before_train=true",
        f"trainer.validation_data_dir={run_dir / 'validation'}",
        *_validation_overrides(options),
        f"hydra.run.dir={run_dir / 'hydra'}", "hydra.output_subdir=null",
        *ARMS[name],
    ]


def _validation_overrides(options: ExperimentOptions) -> list[str]:
    """verl's validation decoding: greedy for one answer per case, else sampled like the rollouts."""
    if options.val_samples == 1:
        return []
    kwargs = "actor_rollout_ref.rollout.val_kwargs"
    return [f"{kwargs}.n={options.val_samples}", f"{kwargs}.do_sample=true",
            f"{kwargs}.temperature={options.val_temperature or options.temperature}", f"{kwargs}.top_p=1.0",
            f"{kwargs}.top_k=-1"]


def _refreshes(steps: list[dict[str, Any]]) -> list[dict[str, float]]:
    out = []
    for record in steps:
        data = record["data"]
        if "karl/refresh/entities_up" in data and data.get("karl/refresh/entities_added", 0) == 0:
            out.append({"step": float(record["step"]), "up": data["karl/refresh/entities_up"],
                        "down": data["karl/refresh/entities_down"],
                        **{f"level_{k}": data.get(f"karl/mastery/level_{k}/entities", 0.0) for k in range(1, 6)}})
    return out


def rises(last: Mapping[str, Case], first: Mapping[str, Case], levels: Mapping[str, int], known: Collection[str] = (),
          *, metric: str = "acc", seed: int = 0) -> list[Difference]:
    """Paired rises ``last - first`` of ``metric``: overall, over the ``known`` entities (if any), per level."""
    out = by_level(last, first, levels, metric=metric, seed=seed)
    if known:
        out.insert(1, paired_difference(last, first, metric=metric, group="known", keep=dict.fromkeys(known, True),
                                        seed=seed))
    return out


def run_arm(options: ExperimentOptions, name: str, files: Mapping[str, Path], levels: Mapping[str, int],
            known: Collection[str] = ()) -> ArmResult:
    """Stage 4 for one arm: its ``main_ppo`` child, then its validations and rises (overall, over the
    ``known`` entities when given, and per level of ``levels``)."""
    from tqdm import tqdm

    from karl_verl.dryrun.launch import run_main_ppo
    from karl_verl.dryrun.pipeline import CPU_RECIPE, training_environment

    run_dir = Path(options.workdir) / "arms" / name
    with tqdm(total=options.steps, desc=f"main_ppo {name}", unit="step", disable=not options.progress) as bar:
        run = run_main_ppo(CPU_RECIPE, arm_overrides(options, name, files, run_dir),
                           metrics_path=run_dir / "metrics.jsonl", log_path=run_dir / "main_ppo.log",
                           env={**training_environment(), **options.env}, timeout_s=options.timeout_s,
                           on_step=lambda _step: bar.update(1), cwd=Path(options.workdir))
    result = ArmResult(name=name, returncode=run.returncode if not run.timed_out else -9, seconds=run.seconds,
                       refreshes=_refreshes(run.steps), log=str(run.log_path), check_group=options.check_group)
    dumps = run_dir / "validation"
    for path in sorted(dumps.glob("*.jsonl")) if dumps.is_dir() else []:
        result.validations[int(path.stem)] = read_validation(path, samples=options.val_samples)
    if result.ok:
        first, last = min(result.validations), max(result.validations)
        result.rise, result.rise_iou = (
            rises(result.validations[last], result.validations[first], levels, known, metric=metric, seed=options.seed)
            for metric in ("acc", "iou"))
    return result


def run_experiment(options: ExperimentOptions, say: Callable[[str], None] = print) -> ExperimentReport:
    """Every stage; ``report.ok`` is True when every arm's acc@0.5 and IoU rose with CIs above 0."""
    from karl_verl.world import build_world

    options.check()
    workdir = Path(options.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    options.workdir = workdir
    report = ExperimentReport(options=options)

    def stage(name: str) -> Callable[[], None]:
        say(f"[experiment] {name} ...")
        start = time.perf_counter()
        return lambda: report.stage_seconds.__setitem__(name, time.perf_counter() - start)

    done = stage("world")
    world = build_world(options.world, workdir / "world")
    report.world, report.known = world.format(), world.known
    done()
    files = dict(world.files)
    files["table"] = workdir / "initial_mastery.json"
    if options.warm_start is None:
        done = stage("warm-up")
        files["model"] = warm_up_model(options, files, report, workdir / "model")
        done()
        done = stage("probe")
        report.initial_levels = initial_table(options, files["model"], files["probe"], files["table"])
        done()
    else:
        done = stage("warm start")
        files["model"] = _copy_warm_start(read_warm_start(options), report, workdir, files["table"])
        done()
    for name in options.arms:
        done = stage(f"arm {name}")
        report.arms[name] = run_arm(options, name, files, report.initial_levels, report.known)
        done()
    last = {name: arm.validations[max(arm.validations)] for name, arm in report.arms.items() if arm.ok}
    for a, b, title in (("karl", "grpo", "KARL - GRPO"), ("karl", "karl_static", "refreshed - static mastery")):
        if a in last and b in last:
            report.comparisons[title] = by_level(last[a], last[b], report.initial_levels, seed=options.seed)
    done = stage("report")
    from karl_verl.experiment.plots import plot_curves, plot_refreshes

    report.outputs["curves_png"] = str(plot_curves(report, workdir / "validation_acc.png"))
    if any(arm.refreshes for arm in report.arms.values()):
        report.outputs["refreshes_png"] = str(plot_refreshes(report, workdir / "mastery_refreshes.png"))
    done()
    report.outputs["workdir"] = str(workdir)
    return report


def write_report(report: ExperimentReport, path: Path) -> Path:
    from karl_verl.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(report.to_json(), indent=2) + "\n")
