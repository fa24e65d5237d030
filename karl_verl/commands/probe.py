"""``karl-verl probe``: measure a model's knowledge mastery offline and write the mastery table.

    karl-verl probe --model PATH --data PROBE_SET --out mastery.json [--mode logprob|generate]
                    [--per-entity 50] [--batch-size 8] [--device cpu|cuda] [--seed 0] [--epoch N]
                    [--max-pixels N] [--backend vllm [--max-model-len N]]

Builds the 4-choice questions of docs/METHOD.md section 2 from the probe set (parquet or JSONL;
its columns: docs/DATA_FORMATS.md, "Probe set"), asks them (``logprob``: one forward pass per question;
``generate``: the paper's protocol, a reply parsed for its letter), writes the table atomically
and a PNG histogram of per-entity accuracies beside it (``mastery.png`` for ``mastery.json``), and
prints the level distribution. Runs on CPU (slowly, or with the tiny test checkpoint written by
``karl_verl.testing.tiny_qwen3vl.save_tiny_checkpoint``) or GPU (``--backend vllm`` needs vLLM; its
``max_model_len`` is the longest question's, so that the KV cache fits beside the weights on a 40 GB card).

Bad input exits with status 2 and one line naming the file, row or field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from karl_verl.mastery import MasteryTable
    from karl_verl.probe.questions import ProbeQuestion
    from karl_verl.probe.runner import ProbeResult

HELP = "probe a model's knowledge of each entity (4-choice questions) and write the mastery table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from karl_verl.config import MasteryConfig
    from karl_verl.probe.questions import SMALL_CATEGORY_POLICIES
    from karl_verl.probe.runner import DEFAULT_PROBE_SAMPLING, PROBE_MODES

    defaults = MasteryConfig()
    parser.add_argument("--model", required=True,
                        help="checkpoint directory or hub name (also a tiny test checkpoint directory)")
    parser.epilog = ("Reads a probe set (entity, category, image per row), writes a mastery table (JSON) and a PNG "
                     "histogram beside it: docs/DATA_FORMATS.md ('Probe set', 'Mastery table').")
    parser.add_argument("--data", required=True, type=Path,
                        help="probe set: .parquet or .jsonl with entity, category, image (docs/DATA_FORMATS.md)")
    parser.add_argument("--out", required=True, type=Path, help="mastery table to write (JSON, karl-verl format)")
    parser.add_argument("--mode", choices=PROBE_MODES, default="logprob",
                        help="logprob: one forward pass per question, the decision and the expected accuracy "
                             "(default); choice: the decision only; generate: parse a free reply")
    parser.add_argument("--per-entity", type=int, default=defaults.probe_images_per_entity,
                        help=f"images (questions) per entity at most (default: {defaults.probe_images_per_entity})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="question sampling seed (default: 0)")
    parser.add_argument("--epoch", type=int, help="training epoch to record in the table")
    parser.add_argument("--on-small-category", choices=SMALL_CATEGORY_POLICIES, default="error",
                        help="a category with fewer than 4 entities: error (default) or take distractors from "
                             "other categories (global)")
    group = parser.add_argument_group("model")
    group.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="transformers or vLLM (default: hf)")
    group.add_argument("--device", help="hf backend device, cpu or cuda (default: cuda when available)")
    group.add_argument("--dtype", default="auto", help="hf backend dtype (default: bfloat16 on cuda, float32 on cpu)")
    group.add_argument("--batch-size", type=int, default=8, help="hf backend batch size (default: 8)")
    group.add_argument("--max-new-tokens", type=int, default=DEFAULT_PROBE_SAMPLING.max_new_tokens,
                       help=f"generate mode: reply length cap, greedy decoding (default: "
                            f"{DEFAULT_PROBE_SAMPLING.max_new_tokens})")
    group.add_argument("--max-model-len", type=int,
                       help="vllm backend: the engine's max_model_len, which its KV cache is sized for (default: "
                            "the longest question with its answer, rounded up; printed before vLLM starts)")
    parser.add_argument("--max-pixels", type=int, default=defaults.probe_max_pixels,
                        help="resize each probe image to at most this many pixels (aspect kept) before its "
                             "question is built, as karl.mastery.probe_max_pixels does in training (default: as "
                             "stored, within the processor's own cap)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from karl_verl.backends.base import BackendError
    from karl_verl.commands.usage import first_line
    from karl_verl.mastery import MasteryError

    try:
        result, out = _probe(args)
    except (BackendError, MasteryError, ValueError) as err:  # ProbeError and UsageError are ValueErrors
        print(f"karl-verl probe: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a Hub id that cannot be downloaded, an output folder that cannot be written
        print(f"karl-verl probe: error: {first_line(err)}", file=sys.stderr)
        return 2
    print(format_summary(result, out))
    return 0


def _probe(args: argparse.Namespace) -> tuple[ProbeResult, Path]:
    import dataclasses

    from karl_verl.commands.usage import check_model_options
    from karl_verl.config import MasteryConfig
    from karl_verl.probe.questions import (
        ProbeError,
        SmallCategoryError,
        build_questions,
        load_probe_set,
        thin_entities,
    )
    from karl_verl.probe.runner import DEFAULT_PROBE_SAMPLING, run_probe

    if args.batch_size < 1 or args.per_entity < 1:
        raise ProbeError("--batch-size and --per-entity must be >= 1")
    if args.max_new_tokens < 1:
        raise ProbeError("--max-new-tokens must be >= 1")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ProbeError("--max-model-len must be >= 1")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise ProbeError("--max-pixels must be >= 1")
    # Read and check the probe set before loading a model: bad data fails in a second.
    try:
        questions = build_questions(
            load_probe_set(args.data), per_entity=args.per_entity, seed=args.seed,
            on_small_category=args.on_small_category,
        )
    except SmallCategoryError as err:
        raise ProbeError(f"{args.data}: {err.explain('--on-small-category global')}") from None
    # Then the model options, before minutes of loading.
    check_model_options(args.model, args.backend, args.device, args.dtype)
    if thin := thin_entities(questions):
        print(f"karl-verl probe: warning: {format_thin_entities(thin, args.per_entity)}", file=sys.stderr)
    progress = not args.no_progress
    if args.backend == "vllm":
        from karl_verl.backends.vllm_backend import VLLMBackend

        max_model_len, line = vllm_max_model_len(args, questions)
        print(f"karl-verl probe: {line}", file=sys.stderr, flush=True)
        backend = VLLMBackend.create(args.model, max_model_len=max_model_len)
    else:
        from karl_verl.backends.hf import HFBackend

        # The runner shows one bar over all questions; the backend's own bar would nest inside it.
        backend = HFBackend.from_pretrained(
            args.model, dtype=args.dtype, device=args.device, batch_size=args.batch_size, progress=False
        )
    result = run_probe(
        questions,
        backend,
        mode=args.mode,
        thresholds=MasteryConfig().thresholds,
        epoch=args.epoch,
        progress=progress,
        sampling=dataclasses.replace(DEFAULT_PROBE_SAMPLING, max_new_tokens=args.max_new_tokens),
        chunk_size=args.batch_size * 4 if args.backend == "hf" else 4096,
        max_pixels=args.max_pixels,
    )
    result.table.meta.update({"model": str(args.model), "probe_set": str(args.data), "seed": args.seed,
                              "per_entity": args.per_entity})
    out = result.table.save(args.out)
    write_histogram(result.per_entity_accuracy, out.with_suffix(".png"), thresholds=MasteryConfig().thresholds,
                    title=f"{Path(str(args.model)).name}: probe accuracy per entity ({args.mode})")
    return result, out


def vllm_max_model_len(args: argparse.Namespace, questions: Sequence[ProbeQuestion]) -> tuple[int, str]:
    """(the ``max_model_len`` vLLM gets, one line saying why and what KV memory it means).

    Without it vLLM sizes the KV cache for the model's whole context (262,144 tokens for
    Qwen3-VL-8B, 36 GiB for one sequence) and cannot start on a 40-48 GB card. The probe's prompts
    are short and known in advance: the longest, counted with the model's processor, and the answer
    (one token, or ``--max-new-tokens`` in generate mode) is all a sequence needs.
    """
    from karl_verl.backends.vllm_backend import KVCacheShape, format_bytes, max_model_len_for
    from karl_verl.probe.questions import ProbeError

    answer_tokens = args.max_new_tokens if args.mode == "generate" else 1
    config = _model_config(args.model)
    if args.max_model_len is not None:
        length, why = args.max_model_len, "from --max-model-len"
    else:
        from karl_verl.backends.hf import load_processor
        from karl_verl.backends.vllm_backend import prompt_token_counts
        from karl_verl.probe.runner import question_request

        processor = load_processor(args.model)
        if not hasattr(processor, "image_processor"):  # AutoProcessor gives the bare tokenizer without torchvision
            raise ProbeError(f"--model {args.model}: its processor has no image processor here (torchvision "
                             "missing?), so the questions' image tokens cannot be counted; pass --max-model-len")
        counts = prompt_token_counts(processor, [question_request(q, max_pixels=args.max_pixels) for q in questions])
        longest = max(range(len(counts)), key=counts.__getitem__)
        text = (config or {}).get("text_config") or config or {}
        positions = text.get("max_position_embeddings")
        try:
            length = max_model_len_for(counts, answer_tokens, max_positions=int(positions) if positions else None)
        except ValueError as err:
            raise ProbeError(f"question {questions[longest].question_id!r}: {err}") from None
        why = (f"longest of {len(questions)} questions: {counts[longest]} tokens + {answer_tokens} answer "
               f"token{'s' if answer_tokens != 1 else ''}, rounded up")
    line = f"vLLM: max_model_len {length} ({why})"
    try:
        shape = KVCacheShape.from_config(config) if config is not None else None
    except ValueError as err:
        return length, f"{line}; KV cache size unknown ({err})"
    if shape is None:
        return length, f"{line}; KV cache size unknown (no config.json read)"
    return length, (f"{line}; KV cache for one sequence at that length: {format_bytes(shape.bytes_for(length))} "
                    f"({shape.dtype}, {format_bytes(shape.bytes_per_token)} per token; vLLM needs room for one "
                    "and batches as many as fit)")


def _model_config(model: str) -> dict | None:
    """The model's ``config.json`` (a local directory's, or a Hub model's from the cache), or None."""
    import json

    local = Path(model).expanduser() / "config.json"
    try:
        if local.is_file():
            return json.loads(local.read_text(encoding="utf-8"))
        from transformers.utils import cached_file

        path = cached_file(model, "config.json")
        return json.loads(Path(path).read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        return None


def format_thin_entities(thin: Mapping[str, int], per_entity: int) -> str:
    """One line: how many entities have too few questions for a meaningful level, the first five."""
    from karl_verl.probe.questions import MIN_QUESTIONS_PER_ENTITY

    shown = ", ".join(f"{entity} ({count})" for entity, count in list(thin.items())[:5])
    more = f" and {len(thin) - 5} more" if len(thin) > 5 else ""
    if per_entity < MIN_QUESTIONS_PER_ENTITY:
        way_out = f"raise --per-entity (now {per_entity})"
    else:
        way_out = "add images of them to the probe set"
    return (f"{len(thin)} entities have fewer than {MIN_QUESTIONS_PER_ENTITY} questions, so their level is mostly "
            f"noise: {shown}{more}; {way_out}")


def level_bands(thresholds: Sequence[float]) -> list[tuple[float, float, str]]:
    """(low, high, label) of the five accuracy bands, level 1 (highest accuracy) first."""
    from karl_verl.mastery import LEVEL_NAMES

    edges = [1.0, *thresholds, 0.0]
    return [(edges[i + 1], edges[i], f"{i + 1} {LEVEL_NAMES[i]}") for i in range(len(LEVEL_NAMES))]


def format_level_table(table: MasteryTable) -> str:
    """The level distribution as an aligned text table (count and share per level)."""
    counts = table.distribution()
    total = sum(counts.values()) or 1
    lines = [f"{'level':<6}{'name':<24}{'entities':>9}{'share':>9}"]
    for number, (name, count) in enumerate(counts.items(), start=1):
        lines.append(f"{number:<6}{name:<24}{count:>9}{100 * count / total:>8.1f}%")
    lines.append(f"{'':<6}{'total':<24}{sum(counts.values()):>9}")
    return "\n".join(lines)


def format_summary(result: ProbeResult, out: Path) -> str:
    lines = [
        format_level_table(result.table),
        "",
        f"{result.num_questions} questions, {len(result.per_entity_accuracy)} entities, mode {result.mode}: "
        f"accuracy {result.accuracy:.3f} (chance 0.25) in {result.wall_time_s:.1f} s",
    ]
    if result.mode == "generate":
        lines.append(f"unparseable replies: {result.num_unparseable} (counted wrong)")
    if result.per_entity_expected_accuracy:
        mean = sum(result.per_entity_expected_accuracy.values()) / len(result.per_entity_expected_accuracy)
        lines.append(f"mean probability of the right letter: {mean:.3f}")
    lines.append(f"wrote {out} and {out.with_suffix('.png')}")
    return "\n".join(lines)


def write_histogram(
    accuracy: Mapping[str, float], path: Path, *, thresholds: Sequence[float], title: str = ""
) -> Path:
    """PNG histogram of per-entity accuracies with the level thresholds marked (matplotlib, Agg; CPU)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    from karl_verl.atomic import atomic_path

    figure, axes = plt.subplots(figsize=(7, 4))
    try:
        axes.hist(list(accuracy.values()), bins=20, range=(0.0, 1.0), color="#4c72b0", edgecolor="white")
        for bound in thresholds:
            axes.axvline(bound, color="#c44e52", linestyle="--", linewidth=1)
        # Headroom above the bars for the band labels (level number over its name, one word a line).
        axes.set_ylim(0, axes.get_ylim()[1] * 1.4)
        for low, high, label in level_bands(thresholds):
            axes.text((low + high) / 2, 0.98, label.replace(" ", "\n"), transform=axes.get_xaxis_transform(),
                      ha="center", va="top", fontsize=7, color="#555555", linespacing=1.1)
        axes.axvline(0.25, color="grey", linestyle=":", linewidth=1, label="chance (0.25)")
        axes.set_xlabel("probe accuracy (ACC_avg); dashed: level thresholds, labels: the five levels")
        axes.set_ylabel("entities")
        axes.set_title(title, fontsize=10)
        axes.legend(loc="center left", bbox_to_anchor=(0.0, 0.62), fontsize=7)
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path
