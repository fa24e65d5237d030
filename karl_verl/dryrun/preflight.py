"""Pre-flight check of a real run's configuration, on CPU, before it costs GPU hours.

``karl-verl dryrun --recipe karl_kvg data.train_files=... actor_rollout_ref.model.path=...``
composes the recipe as ``main_ppo`` would and reports every problem at once:

* override keys that do not exist in the composed config (Hydra would stop at the first);
* required keys left unset (model, data and output paths);
* data rows whose ``<image>`` placeholder count differs from their image count;
* prompts longer than ``data.max_prompt_length`` once the processor expands the images
  (needs the model's processor on disk; without torchvision a Qwen3-VL processor is built part
  by part; skipped with a loud note only when no processor can be loaded);
* ground truths without a readable box or without an entity marker;
* ``karl.*`` and ``algorithm.karl`` values the trainer or the reward workers would refuse;
* training entities absent from the mastery table (or, with no table, from the probe set);
* probe-set categories with fewer than 4 entities (no 4-choice question possible), or neither a
  mastery table nor a probe set for a run whose trainer needs one;
* the longest probe question (its image within ``karl.mastery.probe_max_pixels``) against the
  rollout's ``max_model_len``: a question that leaves no room for its answer is refused, with the
  ``probe_max_pixels`` under which every question fits;
* what ``main_ppo``'s stop-before-Ray callback refuses from the config alone: dynamic sampling on
  a key the reward lacks, a trainer mode that skips the karl trainer, vLLM's
  ``max_model_len`` above ``max_num_batched_tokens`` without chunked prefill;
* with ``karl.inject.source=teacher``: a teacher whose model list does not answer from this machine
  or, when the run joins a Ray cluster (``ray_kwargs.ray_init.address`` or ``RAY_ADDRESS``), from any
  of its nodes, each named.

Runs in the driver; nothing here starts Ray or touches a GPU (the teacher's node check connects to
the run's existing cluster from a child process).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MISSING = object()


@dataclass
class Problem:
    where: str
    message: str
    #: Row problems: the file, the row number, what kind of problem (rows of one kind in one file are
    #: reported together) and the row's own detail.
    file: str | None = None
    row: int | None = None
    kind: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


#: Rows listed by name in a grouped problem line; the rest are counted.
ROWS_SHOWN = 5


@dataclass
class PreflightReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows_checked: int = 0
    entities: int = 0

    def add(self, where: str, message: str) -> None:
        problem = Problem(where, message)
        if all((p.where, p.message) != (where, message) for p in self.problems):
            self.problems.append(problem)

    def add_row(self, file: str, row: int, kind: str, detail: str = "") -> None:
        """A problem of one data row; each (file, row, kind) is kept once (a file read twice repeats none)."""
        if any((p.file, p.row, p.kind) == (file, row, kind) for p in self.problems if p.kind is not None):
            return
        message = f"{kind}: {detail}" if detail else kind
        self.problems.append(Problem(f"{file} row {row}", message, file=file, row=row, kind=kind, detail=detail))

    def problem_lines(self) -> list[str]:
        """One line per problem, except that the row problems of one kind in one file share a line:
        their count and the first :data:`ROWS_SHOWN` rows."""
        groups: dict[tuple[str, str], list[Problem]] = {}
        lines: list[str | tuple[str, str]] = []
        for problem in self.problems:
            if problem.kind is None:
                lines.append(str(problem))
                continue
            key = (str(problem.file), problem.kind)
            if key not in groups:
                groups[key] = []
                lines.append(key)
            groups[key].append(problem)
        out = []
        for line in lines:
            if isinstance(line, str):
                out.append(line)
                continue
            members = groups[line]
            if len(members) == 1:
                out.append(str(members[0]))
                continue
            shown = ", ".join(f"row {p.row}" + (f" ({p.detail})" if p.detail else "") for p in members[:ROWS_SHOWN])
            more = f", and {len(members) - ROWS_SHOWN} more" if len(members) > ROWS_SHOWN else ""
            out.append(f"{line[0]}: {line[1]}: {len(members)} rows: {shown}{more}")
        return out

    def format(self) -> str:
        lines = ["", f"karl-verl pre-flight: {self.rows_checked} data rows, {self.entities} entities checked"]
        lines += [f"  note: {note}" for note in self.notes]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {line}" for line in self.problem_lines()]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _override_key(override: str) -> str | None:
    """The dotted key an override sets, or None for additions/deletions and Hydra's own keys."""
    if "=" not in override or override[0] in "+~" or override.startswith("hydra."):
        return None
    return override.split("=", 1)[0].strip()


def _has_key(config: Any, key: str) -> bool:
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.select(config, key, default=_MISSING, throw_on_missing=True) is not _MISSING
    except MissingMandatoryValue:  # a "???" value: the key exists, it only waits for a value
        return True


def unknown_override_keys(base: Any, overrides: Iterable[str]) -> list[str]:
    return [key for key in map(_override_key, overrides) if key is not None and not _has_key(base, key)]


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
    """Image-count, ground-truth and entity checks of one parquet; returns (file, row number, messages,
    images) of each row for the length check, and the entities.

    Streams the file in batches and stops after ``max_rows`` rows: a large training set with its
    images is never loaded whole.
    """
    import itertools

    from karl_verl.boxes import entity_of, find_box_reference
    from karl_verl.data.schema import DataError, open_parquet

    rows_for_length, entities = [], []
    try:
        parquet = open_parquet(Path(path), path)
    except DataError as err:
        report.add(path, err.message)
        return [], []
    columns = parquet.schema_arrow.names
    for column in (prompt_key, "reward_model"):
        if column not in columns:
            report.add(path, f"missing column {column!r} (columns: {columns})")
            return [], []
    records = (record for batch in parquet.iter_batches(batch_size=64) for record in batch.to_pylist())
    for number, record in enumerate(itertools.islice(records, max_rows), start=1):
        report.rows_checked += 1
        messages = _prompt_messages(record[prompt_key])
        placeholders = sum(str(m.get("content", "")).count("<image>") for m in messages)
        images = record.get(image_key)
        num_images = 0 if images is None else len(images)
        if placeholders != num_images:
            report.add_row(path, number, f"<image> placeholders in field {prompt_key!r} differ from the images in "
                                         f"field {image_key!r}", f"{placeholders} vs {num_images}")
        ground_truth = (record.get("reward_model") or {}).get("ground_truth")
        if not isinstance(ground_truth, str):
            report.add_row(path, number, "field 'reward_model.ground_truth' is missing or not a string")
            continue
        marked = entity_of(ground_truth)
        extra = record.get("extra_info") or {}
        entity = extra.get("entity") or marked
        # The reward reads the marker itself: without it KA-IoU is 0 for every sample of the row,
        # whatever extra_info says.
        if marked is None:
            report.add_row(path, number, "ground truth has no <|object_ref_start|>entity<|object_ref_end|> (KA-IoU "
                                         "would be 0 for every response)", repr(ground_truth[:80]))
        if entity is not None:
            entities.append(entity)
        if find_box_reference(ground_truth) is None:
            report.add_row(path, number, "ground truth has no readable (x1,y1),(x2,y2) box", repr(ground_truth[:80]))
        rows_for_length.append((path, number, messages, list(images) if images is not None else []))
    return rows_for_length, entities


def counting_processor(report: PreflightReport, model_path: str) -> Any:
    """The model's processor for counting prompt tokens, or None (with a note saying why nothing was counted)."""
    from karl_verl.backends.hf import load_processor

    try:
        processor = load_processor(model_path)
    except Exception as err:  # noqa: BLE001 - a processor that needs torchvision; tried below
        processor, first_error = None, err
    else:
        first_error = None
    if not hasattr(processor, "image_processor"):
        # Without torchvision (CPU laptops) AutoProcessor gives the bare tokenizer or fails; a Qwen3-VL
        # processor can still be built part by part, with the same image-token counts.
        from karl_verl.testing.tiny_qwen3vl import load_qwen3vl_processor_without_torchvision

        try:
            processor = load_qwen3vl_processor_without_torchvision(model_path)
        except Exception as err:  # noqa: BLE001 - report, do not crash: the other checks still count
            reason = first_error or "AutoProcessor gave no image processor (no torchvision here?)"
            report.notes.append(f"prompt lengths NOT checked: cannot load the processor of {model_path} ({reason}; "
                                f"part by part: {err}); run the pre-flight where torchvision is installed")
            return None
        report.notes.append(f"processor of {model_path} built part by part (no torchvision here)")
    return processor


def check_prompt_lengths(report: PreflightReport, processor: Any, rows: Sequence[tuple[str, int, list, list]],
                         max_prompt_length: int) -> None:
    from tqdm import tqdm

    from karl_verl.backends.base import GenerationRequest, load_image
    from karl_verl.backends.vllm_backend import prompt_token_counts

    for path, number, messages, images in tqdm(rows, desc="prompt lengths", unit="row", leave=False):
        where = f"{path} row {number}"
        try:
            # Decoded here so that an unreadable image is reported as this row's problem; the count itself
            # needs only each image's size.
            decoded = [load_image(image, where=f"{where}, field 'images'") for image in images]
            (length,) = prompt_token_counts(processor, [GenerationRequest(messages=messages, images=decoded)])
        except Exception as err:  # noqa: BLE001 - a row the processor cannot read is itself a problem
            report.add_row(path, number, "the processor cannot encode this prompt", str(err))
            continue
        if length > max_prompt_length:
            report.add_row(path, number, f"prompt above data.max_prompt_length={max_prompt_length} after image "
                                         "expansion", f"{length} tokens")


def rollout_max_model_len(config: Any, model_path: str | None) -> tuple[int | None, str]:
    """(the max_model_len verl's rollout server will have, where it comes from); None when unknown.

    verl takes ``actor_rollout_ref.rollout.max_model_len`` or, unset, the model's
    ``max_position_embeddings`` (vllm_async_server.py, ``_validate_configs``).
    """
    import json

    key = "actor_rollout_ref.rollout.max_model_len"
    value = _select(config, key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value, key
    try:
        model = json.loads((Path(str(model_path)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None, f"{key} unset and the model's config.json unreadable"
    positions = (model.get("text_config") or {}).get("max_position_embeddings") or model.get("max_position_embeddings")
    return (int(positions), "the model's max_position_embeddings") if positions else (None, "unknown")


def check_probe_prompt_lengths(report: PreflightReport, processor: Any, items: Sequence[Any], mastery: Any,
                               max_model_len: int, source: str) -> None:
    """Every probe question's prompt, its image resized to ``karl.mastery.probe_max_pixels``, against the rollout's
    ``max_model_len``: the longest is reported; one that leaves no room for the answer is a problem that names
    its image and the largest ``probe_max_pixels`` under which every question fits.

    Counted from image headers (nothing decoded), so a probe set of 100,000 images takes about a minute.
    """
    from tqdm import tqdm

    from karl_verl.backends.base import BackendError
    from karl_verl.backends.vllm_backend import prompt_token_counts
    from karl_verl.probe.questions import build_questions, load_probe_set
    from karl_verl.probe.runner import question_request

    try:
        if str(mastery.probe_data).lower().endswith(".parquet"):
            # As the trainer reads it: each image read when asked, and named by its file and row.
            items = load_probe_set(mastery.probe_data, lazy=True)
        questions = build_questions(items, per_entity=mastery.probe_images_per_entity, seed=mastery.seed,
                                    on_small_category="global")
    except ValueError as err:
        report.add(mastery.probe_data, str(err))
        return
    # verl's server needs one token of room after the prompt; the logprob probe appends an option first.
    room = 2 if mastery.probe_mode == "logprob" else 1
    longest, longest_where, too_long = 0, "", []
    for question in tqdm(questions, desc="probe prompt lengths", unit="question", leave=False):
        where = getattr(question.image, "where", None) or f"question {question.question_id!r}"
        where = f"{where} (entity {question.entity!r})"
        request = question_request(question, max_pixels=mastery.probe_max_pixels)
        try:
            (length,) = prompt_token_counts(processor, [request])
        except (BackendError, ValueError) as err:
            report.add(mastery.probe_data, f"{where}: the processor cannot encode this probe question ({err})")
            continue
        if length > longest:
            longest, longest_where = length, where
        if length + room > max_model_len:
            too_long.append((where, length))
    if not questions:
        return
    report.notes.append(f"longest probe question: {longest} tokens ({longest_where}) against max_model_len "
                        f"{max_model_len} ({source}); images within karl.mastery.probe_max_pixels="
                        f"{mastery.probe_max_pixels}")
    if too_long:
        from PIL import Image

        from karl_verl.backends.base import GenerationRequest

        # A question's text tokens, near enough: the first one's prompt with a 1-pixel image (the smallest grid).
        (shortest_text,) = prompt_token_counts(processor, [GenerationRequest(
            messages=question_request(questions[0]).messages, images=[Image.new("RGB", (1, 1))])])
        image_processor = processor.image_processor
        factor = int(image_processor.patch_size) * int(getattr(image_processor, "merge_size", 1))
        # The text of the longest question is near the shortest's; the rest of max_model_len is image tokens.
        fitting = max(1, (max_model_len - room - shortest_text - 8)) * factor * factor
        shown = "; ".join(f"{where}: {length} tokens" for where, length in too_long[:5])
        one = len(too_long) == 1
        report.add(mastery.probe_data, f"{len(too_long)} probe question{'' if one else 's'} leave{'s' if one else ''} "
                                       f"no room under max_model_len {max_model_len} ({source}), so "
                                       f"{'it' if one else 'they'} would be skipped at every refresh: {shown}"
                                       f"{' ...' if len(too_long) > 5 else ''}; set karl.mastery.probe_max_pixels "
                                       f"to at most {fitting} (or raise {source})")


def _absent(report: PreflightReport, where: str, missing: Sequence[str], what: str) -> None:
    if missing:
        shown = ", ".join(repr(e) for e in missing[:10]) + (" ..." if len(missing) > 10 else "")
        report.add(where, f"{len(missing)} training entit{'y' if len(missing) == 1 else 'ies'} absent from {what} "
                          f"(they would get the default level): {shown}")


def check_mastery(report: PreflightReport, config: Any, reward: Any, mastery: Any, entities: Iterable[str],
                  processor: Any = None) -> None:
    from karl_verl.mastery import MasteryError, MasteryTable
    from karl_verl.probe.questions import load_probe_set

    entities = set(entities)
    table_path = (reward.mastery_path if reward is not None else None) or mastery.table_path
    uses_karl_trainer = str(_select(config, "trainer.v1.trainer_mode")) == "karl"
    if table_path:
        try:
            table = MasteryTable.load(table_path)
        except MasteryError as err:
            report.add("karl.mastery.table_path", str(err))
        else:
            _absent(report, table_path, sorted(entities - set(table.entries)), "the mastery table")
    if mastery.probe_data:
        try:
            items = load_probe_set(mastery.probe_data)
        except Exception as err:  # noqa: BLE001 - the probe set's own error names file and row
            report.add("karl.mastery.probe_data", str(err))
        else:
            per_category: dict[str, set[str]] = {}
            for item in items:
                per_category.setdefault(item.category, set()).add(item.entity)
            for category, names in sorted(per_category.items()):
                if len(names) < 4:
                    report.add(mastery.probe_data, f"category {category!r} has {len(names)} entities "
                                                   f"({sorted(names)}): 4-choice questions need at least 4")
            # Without a table the first table is this probe's, and every refresh is a probe.
            if uses_karl_trainer and not table_path:
                probed = set().union(*per_category.values()) if per_category else set()
                _absent(report, mastery.probe_data, sorted(entities - probed), "the probe set")
            if processor is not None and uses_karl_trainer:
                max_model_len, source = rollout_max_model_len(config, _select(config, "actor_rollout_ref.model.path"))
                if max_model_len is None:
                    report.notes.append(f"probe prompt lengths NOT checked: max_model_len {source}")
                else:
                    check_probe_prompt_lengths(report, processor, items, mastery, max_model_len, source)
    if uses_karl_trainer and (problem := mastery.missing_inputs()):
        report.add("karl.mastery", problem)


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
    max_prompt_length = _select(config, "data.max_prompt_length")
    if not isinstance(max_prompt_length, int) or isinstance(max_prompt_length, bool) or max_prompt_length < 1:
        report.add("data.max_prompt_length", f"expected a positive integer, got {max_prompt_length!r}")
        max_prompt_length = None
    processor = None
    if model_path and not Path(str(model_path)).exists():
        report.add("actor_rollout_ref.model.path", f"not found: {model_path}")
    elif model_path:
        processor = counting_processor(report, str(model_path))
        if processor is not None and all_rows and max_prompt_length is not None:
            check_prompt_lengths(report, processor, all_rows, max_prompt_length)
    from karl_verl.config import KarlConfig

    reward, mastery, problems = KarlConfig.check_sections(_select(config, "karl"), _select(config, "algorithm.karl"))
    for problem in problems:
        report.add(*problem.split(": ", 1))
    if mastery is not None:
        check_mastery(report, config, reward, mastery, entities, processor)
    from karl_verl.integration.preflight import (
        filter_groups_problem,
        trainer_mode_problem,
        vllm_batched_tokens_problem,
    )

    # The launch-time checks of main_ppo's stop-before-Ray callback that read the config alone.
    for check in (filter_groups_problem, trainer_mode_problem, vllm_batched_tokens_problem):
        if problem := check(config):
            report.add(*problem.split(": ", 1))
    # The teacher, asked from here and from every node of the cluster the run joins (as at launch).
    from karl_verl.config import ConfigError, InjectConfig
    from karl_verl.integration.preflight import teacher_problems

    try:
        inject = InjectConfig.from_mapping(_select(config, "karl.inject"))
    except ConfigError:
        inject = None  # reported with the karl.* problems above
    for problem in teacher_problems(config, inject) if inject is not None else []:
        report.add(*problem.split(": ", 1))
    return report


def _select(config: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(config, key, default=None)
