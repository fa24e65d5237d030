"""The built-in dry run: one KARL step on synthetic data with a tiny model, on CPU, in about a minute.

Stages, each timed (what runs where: everything here runs on CPU in one process; on a GPU node
the same parts run inside verl's Ray workers):

1. data      synthetic single-entity images (Pillow) -> ``karl-verl data compose`` composites + probe set
2. model     a tiny randomly initialised Qwen3-VL, tokenizer and processor built locally (no download)
3. config    the ``karl_kvg`` recipe (or another, ``DryRunOptions.recipe``) composed by Hydra, with
             tiny-model overrides
4. dataset   the grounding parquet loaded by verl's ``RLHFDataset``
   warm-up   a few supervised steps on KARL-format answers, standing in for the stage-1 model
5. probe     the mastery probe (``run_probe``, transformers backend, logprob mode) -> mastery table
6. rollout   n samples per prompt with transformers ``generate``
7. reward    the registered ``karl`` reward manager on real ``DataProto`` rows
8. advantage the recipe's estimator (``karl_grpo``: with per-sample mastery levels)
9. update    one policy-gradient step: verl's ``ppo_loss`` (clipped PG + low_var_kl KL loss, the
             loss verl's actor engine calls) on the tiny model, then AdamW. verl's FSDP engine
             itself cannot run here: on a machine without an accelerator verl 0.9.1 falls back to
             the CUDA platform, so its engine asks for CUDA devices (README, "The dry run").

Differences from a GPU run, all in the rollout: generation uses transformers instead of vLLM, and
images are taken from the dataset's structured messages directly instead of through
``qwen_vl_utils`` (which imports torchvision, absent on CPU-only machines).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karl_verl.mastery import LEVEL_NAMES, NUM_LEVELS

#: Hydra overrides that shrink the karl_kvg recipe to the tiny model and built-in data.
TINY_OVERRIDES: tuple[str, ...] = (
    "data.max_prompt_length=1024",
    "data.max_response_length=48",
    "data.filter_overlong_prompts=false",
    "data.dataloader_num_workers=0",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.optim.lr=1e-4",
    "trainer.logger=[console]",
    "trainer.n_gpus_per_node=1",
    "karl.mastery.probe_images_per_entity=3",
)


@dataclass
class DryRunOptions:
    workdir: Path
    num_prompts: int = 8
    #: Supervised steps on the answer format before the RL step (0: a purely random model).
    warmup_steps: int = 150
    seed: int = 0
    progress: bool = True
    extra_overrides: tuple[str, ...] = ()
    #: Recipe composed for the step (an ablation such as ``karl_kvg_grpo`` works too).
    recipe: str = "karl_kvg"


@dataclass
class LevelStats:
    samples: int = 0
    reward: float = 0.0
    iou: float = 0.0
    acc: float = 0.0
    advantage: float = 0.0
    #: Mean |advantage|: GRPO's per-group means are 0, so the per-level weights show here.
    abs_advantage: float = 0.0


@dataclass
class DryRunReport:
    stage_seconds: dict[str, float] = field(default_factory=dict)
    per_level: dict[int, LevelStats] = field(default_factory=dict)
    samples: int = 0
    prompts: int = 0
    format_rate: float = 0.0
    parse_rate: float = 0.0
    answered_rate: float = 0.0
    mastery_entities: int = 0
    mastery_coverage: float = 0.0
    level_distribution: dict[str, int] = field(default_factory=dict)
    probe_questions: int = 0
    warmup_loss: float | None = None
    loss: float | None = None
    loss_metrics: dict[str, float] = field(default_factory=dict)
    weights_changed: bool = False
    outputs: dict[str, str] = field(default_factory=dict)

    def format(self) -> str:
        lines = ["", "karl-verl dry run: one KARL step on built-in data (tiny random Qwen3-VL, CPU)", ""]
        lines.append(f"{'level':<24}{'samples':>8}{'reward':>9}{'IoU':>8}{'acc@0.5':>9}{'advantage':>11}"
                     f"{'|adv|':>8}")
        for level in range(1, NUM_LEVELS + 1):
            stats = self.per_level.get(level, LevelStats())
            lines.append(f"{level} {LEVEL_NAMES[level - 1]:<22}{stats.samples:>8}{stats.reward:>9.3f}"
                         f"{stats.iou:>8.3f}{stats.acc:>9.3f}{stats.advantage:>11.3f}{stats.abs_advantage:>8.3f}")
        lines += [
            "",
            f"samples {self.samples} ({self.prompts} prompts x n); format reward > 0: {self.format_rate:.0%}; "
            f"answered: {self.answered_rate:.0%}; box parsed: {self.parse_rate:.0%}",
            f"mastery: {self.mastery_entities} entities probed ({self.probe_questions} questions); "
            f"coverage of training entities {self.mastery_coverage:.0%}; "
            + ", ".join(f"{name} {count}" for name, count in self.level_distribution.items()),
        ]
        if self.loss is not None:
            lines.append(f"policy step: verl ppo_loss {self.loss:.4f} "
                         + " ".join(f"{k}={v:.4f}" for k, v in sorted(self.loss_metrics.items()))
                         + f"; weights changed: {'yes' if self.weights_changed else 'NO'}")
        lines.append("time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
                     + f"; total {sum(self.stage_seconds.values()):.1f}s")
        lines.append("(a tiny model fitted for a few steps to the answer format: the figures show that every part "
                     "runs, not that it grounds anything)")
        return "\n".join(lines)


@contextmanager
def _stage(report: DryRunReport, name: str, say: Callable[[str], None]) -> Iterator[None]:
    say(f"[dryrun] {name} ...")
    start = time.perf_counter()
    yield
    report.stage_seconds[name] = time.perf_counter() - start


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


def _generate(model, processor, row: dict, n: int, max_new_tokens: int, seed: int) -> dict:
    """n sampled responses for one dataset row; returns prompt inputs and response token ids."""
    messages = row["raw_prompt"]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=_images_of(messages) or None, return_tensors="pt")
    # A random model would otherwise emit image placeholders, which the forward pass of the update
    # step then expects image features for.
    vision_tokens = processor.tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                max_new_tokens=max_new_tokens, num_return_sequences=n,
                                pad_token_id=processor.tokenizer.pad_token_id,
                                suppress_tokens=vision_tokens)
    prompt_len = inputs["input_ids"].shape[1]
    eos = processor.tokenizer.eos_token_id
    responses = []
    for sequence in output[:, prompt_len:].tolist():
        if eos in sequence:
            sequence = sequence[: sequence.index(eos) + 1]
        responses.append(sequence)
    return {"inputs": inputs, "responses": responses}


def _warmup_format(model, processor, rows: list[dict], steps: int, seed: int, progress: bool) -> float:
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
        loss = -_response_logprobs(model, inputs, ids).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def _response_logprobs(model, inputs: dict, response: list[int]) -> torch.Tensor:
    """Log-probabilities of ``response`` tokens after the prompt in ``inputs`` (grad enabled)."""
    prompt_ids = inputs["input_ids"][0]
    ids = torch.cat([prompt_ids, torch.tensor(response, dtype=prompt_ids.dtype)]).unsqueeze(0)
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in inputs:  # M-RoPE needs to know which positions are image tokens
        token_types = inputs["mm_token_type_ids"][0]
        extra["mm_token_type_ids"] = torch.cat([token_types, token_types.new_zeros(len(response))]).unsqueeze(0)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    start = prompt_ids.shape[0]
    logprobs = torch.log_softmax(logits[start - 1 : start - 1 + len(response)].float(), dim=-1)
    return logprobs.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows])


def run_dryrun(options: DryRunOptions, say: Callable[[str], None] = print) -> DryRunReport:
    """Run every stage of one KARL step on built-in data; see the module docstring."""
    from tqdm import tqdm

    import karl_verl  # noqa: F401  (registers the karl reward manager and karl_grpo into verl)
    from karl_verl.backends.hf import HFBackend
    from karl_verl.config import KarlConfig
    from karl_verl.data.annotations import ReadOptions
    from karl_verl.data.compose import GROUNDING_FILE, PROBE_FILE, ComposeConfig, compose_dataset
    from karl_verl.dryrun.synthetic import write_single_entity_images
    from karl_verl.mastery_state import sample_level
    from karl_verl.probe.questions import build_questions, load_probe_set
    from karl_verl.probe.runner import run_probe
    from karl_verl.testing.tiny_qwen3vl import build_tiny_model, load_tiny_processor, save_tiny_checkpoint

    report = DryRunReport()
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)

    with _stage(report, "data", say):
        annotations = write_single_entity_images(workdir / "sources", seed=options.seed)
        compose_dataset([annotations], workdir / "data",
                        # Enough composites that every built-in entity appears and so enters the probe set.
                        ComposeConfig(num_images=max(options.num_prompts, 16), tile_size=64, probe_images_per_entity=3,
                                      k_weights={2: 1.0, 3: 1.0}, seed=options.seed, image_format="png"),
                        ReadOptions(), progress=options.progress)
        grounding, probe_set = workdir / "data" / GROUNDING_FILE, workdir / "data" / PROBE_FILE
        report.outputs.update(grounding=str(grounding), probe=str(probe_set))

    with _stage(report, "model", say):
        model_dir = save_tiny_checkpoint(workdir / "tiny-qwen3-vl", seed=options.seed)
        processor = load_tiny_processor(model_dir)
        tokenizer = processor.tokenizer
        model = build_tiny_model(seed=options.seed, tokenizer=tokenizer)
        report.outputs["model"] = str(model_dir)

    with _stage(report, "config", say):
        config = compose_recipe(options.recipe, [
            f"data.train_files={grounding}", f"data.val_files={grounding}",
            f"actor_rollout_ref.model.path={model_dir}", f"trainer.default_local_dir={workdir / 'checkpoints'}",
            f"data.train_batch_size={options.num_prompts}", f"karl.mastery.probe_data={probe_set}",
            *TINY_OVERRIDES, *options.extra_overrides,
        ])
        karl = KarlConfig.from_mapping(config.get("karl"))
        n = int(config.actor_rollout_ref.rollout.n)

    with _stage(report, "dataset", say):
        from verl.utils.dataset.rl_dataset import RLHFDataset

        os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "hf-datasets-cache"))
        dataset = RLHFDataset(data_files=[str(grounding)], tokenizer=tokenizer, config=config.data,
                              processor=processor)
        rows = [dataset[i] for i in range(min(len(dataset), options.num_prompts))]
        report.prompts = len(rows)

    with _stage(report, "warm-up", say):
        report.warmup_loss = _warmup_format(model, processor, rows, options.warmup_steps, options.seed,
                                            options.progress)

    with _stage(report, "probe", say):
        questions = build_questions(load_probe_set(probe_set), per_entity=karl.mastery.probe_images_per_entity,
                                    seed=karl.mastery.seed)
        backend = HFBackend(model, processor, batch_size=8, progress=options.progress)
        probe = run_probe(questions, backend, mode=karl.mastery.probe_mode, thresholds=karl.mastery.thresholds,
                          epoch=0, progress=options.progress)
        table = probe.table
        table_path = table.save(workdir / "mastery.json")
        report.outputs["mastery"] = str(table_path)
        report.probe_questions = probe.num_questions
        report.mastery_entities = len(table)
        report.level_distribution = table.distribution()

    with _stage(report, "rollout", say):
        max_new = int(config.data.max_response_length)
        generations = [_generate(model, processor, row, n, max_new, options.seed + i)
                       for i, row in enumerate(tqdm(rows, desc="rollout", unit="prompt", disable=not options.progress))]

    with _stage(report, "reward", say):
        from verl import DataProto
        from verl.trainer.ppo.reward import load_reward_manager

        prompt_ids, response_ids, non_tensor, sample_inputs = [], [], {k: [] for k in (
            "data_source", "reward_model", "extra_info", "uid")}, []
        for row, generation in zip(rows, generations, strict=True):
            uid = str(uuid.uuid4())
            for response in generation["responses"]:
                prompt_ids.append(generation["inputs"]["input_ids"][0].tolist())
                response_ids.append(response)
                sample_inputs.append((generation["inputs"], response))
                non_tensor["data_source"].append(row["data_source"])
                non_tensor["reward_model"].append(row["reward_model"])
                non_tensor["extra_info"].append(dict(row.get("extra_info") or {}))
                non_tensor["uid"].append(uid)
        # Tagged as the karl trainer tags prompts before rollout (the level then travels with the sample).
        levels = [sample_level(info, rm, table, karl.reward.default_level_number)[0]
                  for info, rm in zip(non_tensor["extra_info"], non_tensor["reward_model"], strict=True)]
        pad = tokenizer.pad_token_id
        prompts, responses = _pad(prompt_ids, pad, left=True), _pad(response_ids, pad, left=False)
        prompt_mask = _pad([[1] * len(p) for p in prompt_ids], 0, left=True)
        response_mask = _pad([[1] * len(r) for r in response_ids], 0, left=False)
        batch = DataProto.from_dict(
            tensors={"prompts": prompts, "responses": responses, "response_mask": response_mask,
                     "attention_mask": torch.cat([prompt_mask, response_mask], dim=1)},
            non_tensors={**{k: np.array(v, dtype=object) for k, v in non_tensor.items()},
                         "knowledge_level": np.array(levels, dtype=object)},
        )
        manager = load_reward_manager(config, tokenizer)

        async def score_all():
            return await asyncio.gather(*(manager.run_single(batch[i : i + 1]) for i in range(len(batch))))

        results = manager.loop.run_until_complete(score_all())
        scores = [r["reward_score"] for r in results]
        token_level_rewards = manager.assemble_rm_scores(batch, scores)
        report.samples = len(results)
        infos = [r["reward_extra_info"] for r in results]
        report.format_rate = float(np.mean([i["format"] > 0 for i in infos]))
        report.parse_rate = float(np.mean([i["parsed"] for i in infos]))
        report.answered_rate = float(np.mean([i["answered"] for i in infos]))
        entities = {info.get("entity") for info in non_tensor["extra_info"]}
        report.mastery_coverage = sum(e in table for e in entities) / max(len(entities), 1)

    with _stage(report, "advantage", say):
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn

        from karl_verl.integration.estimator import NAME as KARL_ESTIMATOR

        estimator = get_adv_estimator_fn(config.algorithm.adv_estimator)
        # As the karl trainer does: only karl_grpo takes the levels (verl's estimators refuse the keyword).
        level_kwargs = ({"mastery_levels": np.array(levels, dtype=np.int64)}
                        if config.algorithm.adv_estimator == KARL_ESTIMATOR else {})
        advantages, _ = estimator(token_level_rewards=token_level_rewards, response_mask=response_mask.float(),
                                  index=np.array(non_tensor["uid"], dtype=object), config=config.algorithm,
                                  **level_kwargs)
        per_sample_adv = (advantages.sum(-1) / response_mask.sum(-1).clamp(min=1)).tolist()
        for level, info, adv in zip(levels, infos, per_sample_adv, strict=True):
            stats = report.per_level.setdefault(level, LevelStats())
            stats.samples += 1
            stats.reward += info["score"]
            stats.iou += info["iou"]
            stats.acc += info["acc"]
            stats.advantage += adv
            stats.abs_advantage += abs(adv)
        for stats in report.per_level.values():
            for name in ("reward", "iou", "acc", "advantage", "abs_advantage"):
                setattr(stats, name, getattr(stats, name) / stats.samples)

    with _stage(report, "update", say):
        report.loss, report.loss_metrics, report.weights_changed = _policy_step(
            model, config, sample_inputs, batch, advantages, options.progress)

    report.outputs["workdir"] = str(workdir)
    return report


def _policy_step(model, config, sample_inputs, batch, advantages, progress) -> tuple[float, dict[str, float], bool]:
    """One policy-gradient step through verl's ``ppo_loss`` with the recipe's actor config."""
    from tensordict import TensorDict
    from tqdm import tqdm
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    response_mask = batch.batch["response_mask"]
    width = response_mask.shape[1]

    def padded(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[0])) for v in values])

    model.eval()
    with torch.no_grad():
        old = [_response_logprobs(model, inputs, response) for inputs, response in sample_inputs]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(actor_config.optim.lr),
                                  betas=tuple(actor_config.optim.betas))
    before = [p.detach().clone() for p in model.parameters()]
    flat = []
    for inputs, response in tqdm(sample_inputs, desc="update", unit="sample", disable=not progress):
        logprobs = _response_logprobs(model, inputs, response)
        prompt_len = inputs["input_ids"].shape[1]
        # verl's unpadded layout: position t of a sequence holds log p(token t+1 | tokens <= t).
        flat.append(torch.cat([logprobs.new_zeros(prompt_len - 1), logprobs, logprobs.new_zeros(1)]))
    data = TensorDict({
        "prompts": batch.batch["prompts"], "responses": batch.batch["responses"],
        "attention_mask": batch.batch["attention_mask"], "response_mask": response_mask,
        "old_log_probs": padded(old), "ref_log_prob": padded(old), "advantages": advantages,
    }, batch_size=[len(sample_inputs)])
    for key, value in (("dp_size", 1), ("batch_num_tokens", None), ("global_batch_size", None)):
        tu.assign_non_tensor_data(data, key, value)
    loss, metrics = ppo_loss(actor_config, {"log_probs": torch.cat(flat)}, data)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(actor_config.optim.clip_grad))
    optimizer.step()
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    scalars = {}
    for name, metric in metrics.items():
        value = getattr(metric, "value", metric)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[name.split("/")[-1]] = float(value)
        elif isinstance(value, (int, float)):
            scalars[name.split("/")[-1]] = float(value)
    return float(loss.detach()), scalars, changed
