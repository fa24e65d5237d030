"""``karl-verl data cot``: knowledge-guided CoT rationales for grounding instances, from a teacher model.

For every instance of a verl RL parquet (``karl-verl data convert`` / ``compose``), the teacher is
shown the image and a prompt (:data:`TEACHER_TEMPLATE`, or a template file) asking it to recall
the entity's distinguishing visual features, compare the candidates in the image, and answer in
the KARL format. A reply is kept when it passes the stage-2 format check (``<think>...</think>``
then ``<answer>...</answer>`` holding ``(x1,y1),(x2,y2)``) and its box, read as the reward reads
it, has IoU >= ``threshold`` with a ground-truth box. Up to ``tries`` replies (each with its own
seed) are asked per instance; the first good one is kept.

Output: LLaMA-Factory sharegpt records (what ``karl-verl data sft-convert`` reads), whose user turn is
the instance's own KVG prompt (the stage-2 prompt, not the teacher's) and whose assistant turn is
the kept reply cut after its first ``</answer>``; images are written beside the output
(``<out stem>_images/``) and referenced relative to the output's folder. Each record also carries
``karl`` (index, entity, category, IoU, tries, teacher).

Crash safety: every finished instance (kept or rejected) is appended, fsynced, to a journal
``<out>.progress.jsonl`` as one line. A killed run restarts from the journal: finished instances
are not asked again, an instance in flight at the kill is asked again, a torn last line is
dropped. The output itself is rewritten atomically from the journal every minute and when the run
ends (normally or by an exception), so it never holds a partial record. An instance whose teacher
calls failed (after retries) is not journaled: the next run retries it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import string
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karl_verl.accuracy import ACC_THRESHOLD, best_iou
from karl_verl.atomic import atomic_write_bytes, atomic_write_text
from karl_verl.boxes import Box, answer_span, read_box_reference
from karl_verl.data.schema import DataError, iter_jsonl_objects
from karl_verl.data.sft import FORMAT_PROBLEMS, answer_format_problem

if TYPE_CHECKING:
    from karl_verl.backends.base import SamplingSettings, TextGenerator

#: Replies asked per instance before it is rejected.
DEFAULT_TRIES = 4
#: Sampling of the teacher: enough temperature for the K tries to differ.
COT_TEMPERATURE = 0.7
COT_MAX_NEW_TOKENS = 1024
#: Teacher requests in flight at once (endpoint teachers; a local model runs one at a time).
DEFAULT_CONCURRENCY = 8
#: Consecutive instances whose teacher calls all failed before the run stops (the endpoint is down).
MAX_CONSECUTIVE_FAILURES = 16
#: Seconds between rewrites of the output from the journal while a run goes on.
FLUSH_EVERY_S = 60.0

JOURNAL_FORMAT = "karl-verl cot journal"
JOURNAL_VERSION = 1

#: Rejection reasons of one reply.
#: ``format`` and ``no_box``: :data:`karl_verl.data.sft.FORMAT_PROBLEMS`; ``low_iou``: a box, but IoU
#: below the threshold.
REJECT_LOW_IOU = "low_iou"
REJECT_REASONS: tuple[str, ...] = (*FORMAT_PROBLEMS, REJECT_LOW_IOU)

#: The teacher's prompt (user turn, after the image). Fields: {entity}, {category}, {candidates}.
TEACHER_TEMPLATE = """\
The image shows several {category} objects that look alike. Which one is the {entity}?

First recall what distinguishes the {entity} from other kinds of {category}: the visual features an \
expert would check, such as overall shape, proportions, distinctive parts, markings and colours. Then \
compare the candidates in the image one by one against those features ({candidates}), and decide \
which one is the {entity}.

Write this reasoning inside <think> </think>. Then give the bounding box of the {entity} inside \
<answer> </answer> as (x1,y1),(x2,y2): top-left and bottom-right corners on a 0-1000 grid relative to \
the image width and height, for example <answer>(120,340),(560,780)</answer>. Start your reply with <think>."""

TEMPLATE_FIELDS: tuple[str, ...] = ("entity", "category", "candidates")


def check_template(template: str, source: str = "template") -> str:
    """``template`` if its ``{fields}`` are all known (:data:`TEMPLATE_FIELDS`); else a ValueError naming them."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"{source}: not a format string ({err}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(name for name in fields if name not in TEMPLATE_FIELDS)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown}; a template may use {list(TEMPLATE_FIELDS)}")
    if "entity" not in fields:
        raise ValueError(f"{source}: the template must name the entity ({{entity}})")
    return template


@dataclass(frozen=True)
class CotInstance:
    """One grounding instance of the RL parquet."""

    row: int  # 1-based
    index: int  # extra_info.index
    entity: str
    category: str
    candidates: tuple[str, ...]
    prompt: tuple[dict[str, str], ...]  # the row's chat turns, <image> placeholders included
    images: tuple[bytes, ...]
    boxes: tuple[Box, ...]  # ground truth, 0-1000 grid

    def teacher_prompt(self, template: str) -> str:
        others = ", ".join(self.candidates) if self.candidates else "every object shown"
        text = template.format(entity=self.entity, category=self.category, candidates=others)
        return "<image>" * len(self.images) + text


def count_instances(path: str | Path) -> int:
    from karl_verl.data.schema import open_parquet

    return open_parquet(Path(path), Path(path).name).metadata.num_rows


def iter_instances(path: str | Path, chunk_size: int = 64) -> Iterator[CotInstance]:
    """The RL parquet's rows as :class:`CotInstance` (read in chunks: images never all in memory)."""
    from karl_verl.data.filter import read_instances
    from karl_verl.data.schema import open_parquet

    path = Path(path)
    name = path.name
    boxes = {instance.row: instance for instance in read_instances(path)}  # checks index and ground truth
    parquet = open_parquet(path, name)
    missing = [c for c in ("prompt", "images", "extra_info") if c not in parquet.schema_arrow.names]
    if missing:
        raise DataError(name, None, None, f"missing columns {missing}: expected verl RL parquet")
    row = 0
    for batch in parquet.iter_batches(batch_size=chunk_size, columns=["prompt", "images", "extra_info"]):
        for record in batch.to_pylist():
            row += 1
            extra = record["extra_info"] or {}
            entity, category = extra.get("entity"), extra.get("category")
            if not isinstance(entity, str) or not entity.strip():
                raise DataError(name, row, "extra_info.entity", f"expected the entity name, got {entity!r}")
            images = [image.get("bytes") if isinstance(image, dict) else None for image in record["images"] or []]
            if not images or any(not isinstance(data, bytes) or not data for data in images):
                raise DataError(name, row, "images", "expected at least one image with its bytes")
            prompt = record["prompt"] or []
            if not prompt or any(not isinstance(t, dict) or not isinstance(t.get("content"), str) for t in prompt):
                raise DataError(name, row, "prompt", "expected chat turns with string content")
            candidates = extra.get("entities") or ()
            yield CotInstance(
                row=row, index=boxes[row].index, entity=entity, category=category or "object",
                candidates=tuple(str(c) for c in candidates), prompt=tuple(dict(t) for t in prompt),
                images=tuple(images), boxes=boxes[row].boxes,
            )


@dataclass(frozen=True)
class Verdict:
    """One reply judged: kept, or the reason it was not; ``text`` is the reply as it would be stored."""

    kept: bool
    reason: str | None
    iou: float
    text: str


def judge_reply(reply: str, targets: Sequence[Box], threshold: float = ACC_THRESHOLD) -> Verdict:
    """Keep ``reply`` when it has the KARL format and a box with IoU >= ``threshold`` with some target.

    Leading and trailing whitespace is stripped and anything after the first ``</answer>`` is cut:
    that is the text the SFT data stores. The box is read as the stage-2 reward reads it.

    >>> judge_reply(" <think>the tail</think><answer>(0,0),(100,100)</answer> done", [(0, 0, 100, 90)])
    Verdict(kept=True, reason=None, iou=0.9, text='<think>the tail</think><answer>(0,0),(100,100)</answer>')
    >>> judge_reply("<answer>(0,0),(100,100)</answer>", [(0, 0, 100, 90)]).reason
    'format'
    """
    text = reply.strip()
    end = text.find("</answer>")
    if end >= 0:
        text = text[: end + len("</answer>")]
    problem = answer_format_problem(text)
    if problem is not None:
        return Verdict(False, problem, 0.0, text)
    iou = best_iou(read_box_reference(answer_span(text) or ""), targets)
    if iou < threshold:
        return Verdict(False, REJECT_LOW_IOU, iou, text)
    return Verdict(True, None, iou, text)


def image_suffix(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or "png").lower()
    return ".jpg" if fmt == "jpeg" else f".{fmt}"


def write_sharegpt_images(instance: CotInstance, images_dir: Path, relative_to: Path) -> list[str]:
    """Write the instance's images (atomically) as ``<index>_<k>.<ext>``; their paths relative to ``relative_to``."""
    paths = []
    for k, data in enumerate(instance.images):
        path = images_dir / f"{instance.index:08d}_{k}{image_suffix(data)}"
        if not path.is_file() or path.read_bytes() != data:
            atomic_write_bytes(path, data)
        paths.append(os.path.relpath(path, relative_to))
    return paths


def sharegpt_record(instance: CotInstance, response: str, images: Sequence[str], **karl: Any) -> dict[str, Any]:
    """A LLaMA-Factory sharegpt record: the instance's prompt, ``response`` as the assistant turn, ``images``."""
    messages = [{"role": turn["role"], "content": turn["content"]} for turn in instance.prompt]
    messages.append({"role": "assistant", "content": response})
    return {"messages": messages, "images": list(images),
            "karl": {"index": instance.index, "entity": instance.entity, "category": instance.category, **karl}}


# ---------------------------------------------------------------------------------------------
# Journal


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


class Journal:
    """Append-only JSONL of finished instances; a header line records what the run was asked."""

    def __init__(self, path: Path, header: Mapping[str, Any]) -> None:
        self.path = path
        self.header = dict(header)
        self.entries: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if path.is_file():
            self._load()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append(self.header)

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):  # a torn last line: the kill came mid-write; that instance is redone
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        lines = iter_jsonl_objects(self.path, self.path.name)
        first = next(lines, None)
        if first is None:
            self._append(self.header)
            return
        _, header = first
        if header.get("format") != JOURNAL_FORMAT:
            raise DataError(self.path.name, 1, "format", f"not a {JOURNAL_FORMAT}; remove it to start over")
        changed = sorted(key for key in self.header if key != "teacher" and header.get(key) != self.header[key])
        if changed:
            raise DataError(self.path.name, 1, changed[0],
                            f"the journal was written with other settings ({', '.join(changed)}); resume with the "
                            f"same data, template, tries and threshold, or remove {self.path} to start over")
        for line_number, entry in lines:
            index = entry.get("index")
            if not isinstance(index, int):
                raise DataError(self.path.name, line_number, "index", f"expected an integer, got {index!r}")
            self.entries[index] = entry

    def _append(self, entry: Mapping[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            if entry["index"] in self.entries:  # never two lines for one instance
                return
            self._append(entry)
            self.entries[entry["index"]] = entry


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class CotSummary:
    """Kept / rejected per category, try-level rejection reasons, and instances left for a rerun."""

    out: Path
    total: int = 0
    resumed: int = 0
    kept: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    reasons: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    tries: int = 0
    failed: list[str] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def pending(self) -> int:
        return self.total - sum(self.kept.values()) - sum(self.rejected.values())

    def add(self, entry: Mapping[str, Any]) -> None:
        category = entry.get("category", "?")
        (self.kept if entry["kept"] else self.rejected)[category] += 1
        self.tries += int(entry.get("tries", 0))
        for reason in entry.get("reasons", []):
            self.reasons[category][reason] += 1

    def format(self) -> str:
        kept, rejected = sum(self.kept.values()), sum(self.rejected.values())
        lines = [f"kept {kept} of {kept + rejected} instances -> {self.out} ({self.tries} teacher replies"
                 + (f"; {self.resumed} finished by an earlier run" if self.resumed else "") + ")"]
        for category in sorted(set(self.kept) | set(self.rejected)):
            why = ", ".join(f"{reason} {self.reasons[category][reason]}" for reason in REJECT_REASONS
                            if self.reasons[category][reason])
            lines.append(f"  {category}: kept {self.kept[category]}, rejected {self.rejected[category]}"
                         + (f" (rejected replies: {why})" if why else ""))
        if self.pending:
            lines.append(f"  {self.pending} instances not finished" + (" (the teacher kept failing; stopped)"
                                                                      if self.stopped_early else "")
                         + "; run the same command again to do them")
            lines.extend(f"    {problem}" for problem in self.failed[:3])
        return "\n".join(lines)


@dataclass(frozen=True)
class CotSettings:
    """What decides the result of an instance; a journal resumes only under the same settings."""

    template: str = TEACHER_TEMPLATE
    tries: int = DEFAULT_TRIES
    threshold: float = ACC_THRESHOLD

    def __post_init__(self) -> None:
        check_template(self.template)
        if self.tries < 1:
            raise ValueError(f"tries: expected at least 1, got {self.tries}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold: expected an IoU in (0, 1], got {self.threshold}")


def _seed(base: int, index: int, attempt: int) -> int:
    # A stable seed per (instance, try): a resumed run asks an unfinished instance exactly what it would have.
    return (base * 1_000_003 + index * 97 + attempt) % (2**31 - 1)


def _ask(instance: CotInstance, teacher: TextGenerator, settings: CotSettings,
         sampling: SamplingSettings) -> tuple[Verdict | None, list[Verdict]]:
    from karl_verl.backends.base import GenerationRequest

    request = GenerationRequest(messages=[{"role": "user", "content": instance.teacher_prompt(settings.template)}],
                                images=list(instance.images))
    verdicts = []
    for attempt in range(settings.tries):
        attempt_sampling = dataclasses.replace(sampling, n=1, seed=_seed(sampling.seed, instance.index, attempt))
        (texts,) = teacher.generate([request], attempt_sampling)
        verdict = judge_reply(texts[0], instance.boxes, settings.threshold)
        verdicts.append(verdict)
        if verdict.kept:
            return verdict, verdicts
    return None, verdicts


def generate_cot(
    data: str | Path,
    out: str | Path,
    teacher: TextGenerator,
    *,
    settings: CotSettings = CotSettings(),
    sampling: SamplingSettings | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    teacher_name: str = "teacher",
    flush_every_s: float = FLUSH_EVERY_S,
    progress: bool = True,
) -> CotSummary:
    """Ask ``teacher`` for rationales of every instance of ``data``; write the kept ones to ``out``.

    ``out`` ends in ``.json`` (a JSON array, LLaMA-Factory's layout) or ``.jsonl``. Resumes from
    ``<out>.progress.jsonl`` when it exists (see the module docstring). ``concurrency``: instances
    asked at once (threads); 1 for a local model, which is not thread-safe. ``out`` is rewritten
    from the journal every ``flush_every_s`` seconds and when the run ends, also by an exception.
    """
    from tqdm import tqdm

    from karl_verl.backends.base import BackendError, SamplingSettings

    data, out = Path(data), Path(out)
    if out.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{out}: the output must end in .json or .jsonl (sharegpt)")
    if concurrency < 1:
        raise ValueError(f"concurrency: expected at least 1, got {concurrency}")
    sampling = sampling or SamplingSettings(temperature=COT_TEMPERATURE, max_new_tokens=COT_MAX_NEW_TOKENS)
    total = count_instances(data)
    header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "data": data.name, "rows": total,
              "template_sha256": hashlib.sha256(settings.template.encode("utf-8")).hexdigest(),
              "tries": settings.tries, "threshold": settings.threshold, "teacher": teacher_name}
    journal = Journal(journal_path(out), header)
    images_dir = out.parent / f"{out.stem}_images"
    summary = CotSummary(out=out, total=total, resumed=len(journal.entries))
    for entry in journal.entries.values():
        summary.add(entry)

    def finish(instance: CotInstance, kept: Verdict | None, verdicts: list[Verdict]) -> None:
        entry: dict[str, Any] = {
            "index": instance.index, "row": instance.row, "entity": instance.entity, "category": instance.category,
            "kept": kept is not None, "tries": len(verdicts), "reasons": [v.reason for v in verdicts if v.reason],
            "ious": [round(v.iou, 4) for v in verdicts],
        }
        if kept is not None:
            images = write_sharegpt_images(instance, images_dir, out.parent)
            entry["record"] = sharegpt_record(instance, kept.text, images, iou=round(kept.iou, 4),
                                              tries=len(verdicts), teacher=teacher_name)
        journal.record(entry)
        summary.add(entry)

    consecutive_failures = 0
    last_flush = time.monotonic()
    bar = tqdm(total=total, initial=len(journal.entries), desc="cot", unit="instance", disable=not progress)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="karl-cot") as pool:
        in_flight: dict[Future, CotInstance] = {}

        def collect() -> None:
            nonlocal consecutive_failures, last_flush
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in done:
                instance = in_flight.pop(future)
                try:
                    kept, verdicts = future.result()
                except BackendError as err:
                    consecutive_failures += 1
                    summary.failed.append(f"{data.name} row {instance.row} (index {instance.index}): {err}")
                    continue
                consecutive_failures = 0
                finish(instance, kept, verdicts)
                bar.update(1)
            if done and time.monotonic() - last_flush >= flush_every_s:
                write_output(journal, out)
                last_flush = time.monotonic()

        try:
            for instance in iter_instances(data):
                if instance.index in journal.entries:
                    continue
                if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                    summary.stopped_early = True
                    break
                in_flight[pool.submit(_ask, instance, teacher, settings, sampling)] = instance
                while len(in_flight) >= 2 * concurrency:
                    collect()
            while in_flight:
                collect()
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
        finally:
            bar.close()
            write_output(journal, out)
    return summary


def write_output(journal: Journal, out: Path) -> int:
    """The kept records of ``journal``, in the data's row order, written atomically to ``out``; their count."""
    records = [entry["record"] for entry in sorted(journal.entries.values(), key=lambda e: e.get("row", 0))
               if entry.get("kept") and entry.get("record")]
    write_sharegpt(out, records)
    return len(records)


def write_sharegpt(out: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """sharegpt records to ``out`` atomically: a JSON array (one record a line) for .json, JSONL for .jsonl."""
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    if out.suffix == ".jsonl":
        text = "".join(line + "\n" for line in lines)
    else:
        text = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    return atomic_write_text(out, text)


def read_template(path: str | Path | None) -> str:
    """The teacher template: :data:`TEACHER_TEMPLATE`, or the text of ``path``."""
    if path is None:
        return TEACHER_TEMPLATE
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"template file not found: {path}")
    return check_template(path.read_text(encoding="utf-8").strip("\n"), str(path))


# ---------------------------------------------------------------------------------------------
# Built-in set


BUILTIN_FILE = "cot.json"


def builtin_rationale(instance: CotInstance) -> str:
    """A short rationale in the KARL format for a synthetic composite: where the entity is, then its box.

    Short on purpose: the dry run's stage 2 caps responses at 48 tokens of the tiny tokenizer, and a
    rationale that does not end inside the cap leaves no answer to reward (a comparison of every
    candidate took about 150 tokens, and every stage-2 reward was 0).

    >>> builtin_rationale(CotInstance(row=1, index=0, entity="Fiat 500", category="car", candidates=("Fiat 500",),
    ...                               prompt=(), images=(), boxes=((10, 20, 300, 310),)))
    '<think>The Fiat 500 is at the top left.</think><answer>(10,20),(300,310)</answer>'
    """
    from karl_verl.data.prompts import format_box

    box = instance.boxes[0]
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    column = "left" if x < 1000 / 3 else "right" if x > 2000 / 3 else "centre"
    row = "top" if y < 1000 / 3 else "bottom" if y > 2000 / 3 else "middle"
    return (f"<think>The {instance.entity} is at the {row} {column}.</think>"
            f"<answer>{format_box([int(round(v)) for v in box])}</answer>")


def write_builtin_cot_set(out_dir: str | Path, *, num_images: int = 12, tile_size: int = 64, seed: int = 0,
                          progress: bool = False) -> Path:
    """A small CoT-SFT set for tests and the dry run: ``out_dir/cot.json`` (sharegpt) + ``out_dir/cot_images/``.

    The built-in synthetic single-entity images (Pillow, CPU) are composed into multi-entity
    images as ``karl-verl data compose`` does, and every instance gets :func:`builtin_rationale`
    with its ground-truth box; ``karl-verl data sft-convert out_dir/cot.json`` reads it as is.
    """
    from karl_verl.data.annotations import ReadOptions
    from karl_verl.data.compose import GROUNDING_FILE, ComposeConfig, compose_dataset
    from karl_verl.synthetic_images import write_single_entity_images

    out_dir = Path(out_dir)
    singles = write_single_entity_images(out_dir / "singles", images_per_entity=2, seed=seed)
    config = ComposeConfig(num_images=num_images, tile_size=tile_size, seed=seed, probe_images_per_entity=1,
                           image_format="png")
    compose_dataset([singles], out_dir / "composed", config, ReadOptions(), progress=progress)
    records = []
    for instance in iter_instances(out_dir / "composed" / GROUNDING_FILE):
        images = write_sharegpt_images(instance, out_dir / "cot_images", out_dir)
        records.append(sharegpt_record(instance, builtin_rationale(instance), images, iou=1.0, tries=0,
                                       teacher="builtin"))
    return write_sharegpt(out_dir / BUILTIN_FILE, records)
