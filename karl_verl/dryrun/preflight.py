"""Pre-flight check of a real run's configuration, on CPU, before it costs GPU hours.

``karl-verl dryrun --recipe karl_kvg data.train_files=... actor_rollout_ref.model.path=...``
composes the recipe as ``main_ppo`` would and reports every problem at once:

* override keys that do not exist in the composed config (Hydra would stop at the first);
* required keys left unset (model, data and output paths);
* data rows whose ``<image>`` placeholder count differs from their image count;
* prompts longer than ``data.max_prompt_length`` once the processor expands the images
  (needs the model's processor on disk; skipped with a note when it cannot be loaded);
* ground truths without a readable box or without an entity marker;
* training entities absent from the mastery table;
* probe-set categories with fewer than 4 entities (no 4-choice question possible), or neither a
  mastery table nor a probe set for a run whose trainer needs one.

Runs in the driver only; nothing here starts Ray or touches a GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MISSING = object()


@dataclass
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class PreflightReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows_checked: int = 0
    entities: int = 0

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def format(self) -> str:
        lines = ["", f"karl-verl pre-flight: {self.rows_checked} data rows, {self.entities} entities checked"]
        lines += [f"  note: {note}" for note in self.notes]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {problem}" for problem in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _override_key(override: str) -> str | None:
    """The dotted key an override sets, or None for additions/deletions and Hydra's own keys."""
    if "=" not in override or override[0] in "+~" or override.startswith("hydra."):
        return None
    return override.split("=", 1)[0].strip()


def unknown_override_keys(base: Any, overrides: Iterable[str]) -> list[str]:
    from omegaconf import OmegaConf

    unknown = []
    for override in overrides:
        key = _override_key(override)
        if key is not None and OmegaConf.select(base, key, default=_MISSING, throw_on_missing=False) is _MISSING:
            unknown.append(key)
    return unknown


def _files(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _prompt_messages(prompt: Any) -> list[dict]:
    return [dict(message) for message in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]


def check_rows(report: PreflightReport, path: str, prompt_key: str, image_key: str, max_rows: int | None
               ) -> tuple[list[tuple[str, int, list[dict], list[Any]]], list[str]]:
    """Image-count, ground-truth and entity checks of one parquet; returns rows for the length check."""
    import pandas as pd

    from karl_verl.boxes import entity_of, find_box_reference

    rows_for_length, entities = [], []
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one reported problem
        report.add(path, f"cannot read as parquet: {err}")
        return [], []
    for column in (prompt_key, "reward_model"):
        if column not in frame.columns:
            report.add(path, f"missing column {column!r} (columns: {list(frame.columns)})")
            return [], []
    for number, row in enumerate(frame.head(max_rows).itertuples(index=False), start=1):
        record = row._asdict()
        where = f"{path} row {number}"
        report.rows_checked += 1
        messages = _prompt_messages(record[prompt_key])
        placeholders = sum(str(m.get("content", "")).count("<image>") for m in messages)
        images = record.get(image_key)
        num_images = 0 if images is None else len(images)
        if placeholders != num_images:
            report.add(where, f"{placeholders} <image> placeholder(s) in field {prompt_key!r} but {num_images} "
                              f"image(s) in field {image_key!r}")
        ground_truth = (record.get("reward_model") or {}).get("ground_truth")
        if not isinstance(ground_truth, str):
            report.add(where, "field 'reward_model.ground_truth' is missing or not a string")
            continue
        entity = entity_of(ground_truth)
        extra = record.get("extra_info") or {}
        entity = extra.get("entity") or entity
        if entity is None:
            report.add(where, "ground truth has no <|object_ref_start|>entity<|object_ref_end|>: "
                              f"{ground_truth[:80]!r}")
        else:
            entities.append(entity)
        if find_box_reference(ground_truth) is None:
            report.add(where, f"ground truth has no readable (x1,y1),(x2,y2) box: {ground_truth[:80]!r}")
        rows_for_length.append((where, number, messages, list(images) if images is not None else []))
    return rows_for_length, entities


def check_prompt_lengths(report: PreflightReport, model_path: str, rows: Sequence[tuple[str, int, list, list]],
                         max_prompt_length: int) -> None:
    from karl_verl.backends.base import GenerationRequest, load_image, structured_messages
    from karl_verl.backends.hf import load_processor

    try:
        processor = load_processor(model_path)
    except Exception as err:  # noqa: BLE001 - report, do not crash: the other checks still count
        report.notes.append(f"prompt lengths not checked: cannot load the processor of {model_path} ({err})")
        return
    if not hasattr(processor, "image_processor"):
        report.notes.append(f"prompt lengths not checked: {model_path} has no image processor here "
                            "(without torchvision transformers may load only the tokenizer)")
        return
    from tqdm import tqdm

    for where, _, messages, images in tqdm(rows, desc="prompt lengths", unit="row", leave=False):
        try:
            decoded = [load_image(image, where=f"{where}, field 'images'") for image in images]
            structured = structured_messages(GenerationRequest(messages=messages, images=decoded), where=where)
            text = processor.apply_chat_template(structured, add_generation_prompt=True, tokenize=False)
            length = processor(text=[text], images=decoded or None, return_tensors="pt")["input_ids"].shape[1]
        except Exception as err:  # noqa: BLE001 - a row the processor cannot read is itself a problem
            report.add(where, f"the processor cannot encode this prompt: {err}")
            continue
        if length > max_prompt_length:
            report.add(where, f"prompt is {length} tokens after image expansion, above data.max_prompt_length="
                              f"{max_prompt_length}")


def check_mastery(report: PreflightReport, config: Any, entities: Iterable[str]) -> None:
    from karl_verl.config import KarlConfig
    from karl_verl.mastery import MasteryError, MasteryTable
    from karl_verl.probe.questions import load_probe_set

    karl = KarlConfig.from_mapping(config.get("karl"))
    table_path = karl.reward.mastery_path or karl.mastery.table_path
    needs_mastery = (str(config.trainer.v1.get("trainer_mode")) == "karl"
                     or config.algorithm.adv_estimator == "karl_grpo")
    if table_path:
        try:
            table = MasteryTable.load(table_path)
        except MasteryError as err:
            report.add("karl.mastery.table_path", str(err))
        else:
            missing = sorted(set(entities) - set(table.entries))
            if missing:
                shown = ", ".join(repr(e) for e in missing[:10]) + (" ..." if len(missing) > 10 else "")
                report.add(table_path, f"{len(missing)} training entit{'y' if len(missing) == 1 else 'ies'} absent "
                                       f"from the mastery table (they would get the default level): {shown}")
    if karl.mastery.probe_data:
        try:
            items = load_probe_set(karl.mastery.probe_data)
        except Exception as err:  # noqa: BLE001 - the probe set's own error names file and row
            report.add("karl.mastery.probe_data", str(err))
        else:
            per_category: dict[str, set[str]] = {}
            for item in items:
                per_category.setdefault(item.category, set()).add(item.entity)
            for category, names in sorted(per_category.items()):
                if len(names) < 4:
                    report.add(karl.mastery.probe_data, f"category {category!r} has {len(names)} entities "
                                                        f"({sorted(names)}): 4-choice questions need at least 4")
    elif needs_mastery and not table_path:
        report.add("karl.mastery", "neither karl.mastery.table_path nor karl.mastery.probe_data is set: the karl "
                                   "trainer has no way to know any entity's mastery")


def run_preflight(recipe: str, overrides: Sequence[str], *, max_rows: int | None = 2000) -> PreflightReport:
    from karl_verl.dryrun.pipeline import compose_recipe
    from karl_verl.integration.preflight import unset_keys

    report = PreflightReport()
    base = compose_recipe(recipe, [])
    unknown = unknown_override_keys(base, overrides)
    for key in unknown:
        report.add(key, "no such key in the composed config (prefix with + to add a new key)")
    valid = [o for o in overrides if _override_key(o) not in unknown]
    config = compose_recipe(recipe, valid)
    required = ("data.train_files", "data.val_files", "actor_rollout_ref.model.path", "trainer.default_local_dir")
    for key in unset_keys(config, required):
        report.add(key, "required by the recipe but not set")

    prompt_key, image_key = str(config.data.prompt_key), str(config.data.image_key)
    all_rows, entities = [], []
    for key in ("data.train_files", "data.val_files"):
        for path in _files(_select(config, key)):
            if not Path(path).is_file():
                report.add(key, f"file not found: {path}")
                continue
            rows, names = check_rows(report, path, prompt_key, image_key, max_rows)
            all_rows.extend(rows)
            entities.extend(names)
    report.entities = len(set(entities))
    model_path = _select(config, "actor_rollout_ref.model.path")
    if model_path and not Path(str(model_path)).exists():
        report.add("actor_rollout_ref.model.path", f"not found: {model_path}")
    elif model_path and all_rows:
        check_prompt_lengths(report, str(model_path), all_rows, int(config.data.max_prompt_length))
    check_mastery(report, config, Counter(entities))
    return report


def _select(config: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(config, key, default=None)
