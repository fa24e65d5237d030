"""A synthetic knowledge-intensive visual-grounding world with a knowledge gap built in (Pillow only).

Pure module (no torch, no verl, no Ray; Pillow to draw, pyarrow to write): runs anywhere, CPU, a
few seconds for the default sizes. ``karl-verl experiment`` trains on it; tests build small ones.

What the world is:

* **entities** in **categories of look-alikes**: every entity of a category has the category's
  shape (ellipse, square, triangle, ...) and its own colour, and a made-up name (``Kavo``,
  ``Mirel``) that says nothing about its look: the name-to-look mapping is pure knowledge;
* **multi-entity images**: a ``grid x grid`` canvas of ``cell_size`` cells; 2-4 entities of one
  category (look-alikes side by side) in randomly chosen cells, each drawn with a small random
  margin, so its box is exact and differs a little from image to image; the query names one of
  them (every ground-truth box string of the validation set is unique, which lets per-case results
  of two validations be paired by ground truth);
* **a knowledge gap**: per category, ``known_per_category`` entities are *known*: the warm-up set
  (stage 1) teaches their grounding and their 4-choice recognition; the others are *unknown*: the
  warm-up never shows their images and never names them as the answer, so the first probe finds
  entities at several mastery levels;
* **a probe set** (single-entity images, the same 4-choice recognition questions the trainer asks),
  a **training set** and a **held-out validation set** (fresh images) over all entities.

Outputs of :func:`build_world` in one folder (every file written atomically):

========================= ===================================================================
``train.parquet``         verl RL rows (``karl-verl data`` layout), all entities
``val.parquet``           verl RL rows on fresh images, unique ground truths
``probe.parquet``         the probe set (``karl-verl data compose`` layout)
``warmup.jsonl``          stage-1 examples of known entities: ``{"kind": "grounding"|"probe",
                          "prompt", "image" (file name), "target"}``, images under ``images/``
``world.json``            the entities (name, category, colour, known) and the config
========================= ===================================================================

:func:`write_stream_warmup` adds, on request, ``warmup_ivgr.jsonl``: the warm-up examples again,
plus each grounding example rendered as both iVGR streams (:mod:`karl_verl.ivgr`), for a run with
``karl.ivgr.enable``. It is a file of its own so that the files above stay the same, byte for byte.
"""

from __future__ import annotations

import colorsys
import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from karl_verl.atomic import atomic_path, atomic_write_text
from karl_verl.data import prompts
from karl_verl.data.compose import PROBE_FILE, probe_schema
from karl_verl.data.schema import RowWriter, rl_row, rl_schema
from karl_verl.probe.questions import ProbeItem, build_questions
from karl_verl.synthetic_images import SHAPES, draw_shape

TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"
WARMUP_FILE = "warmup.jsonl"
WORLD_FILE = "world.json"
STREAM_WARMUP_FILE = "warmup_ivgr.jsonl"

_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of a synthetic world; the same config and seed give the same files, byte for byte."""

    categories: int = 4
    entities_per_category: int = 4
    #: Entities per category that the warm-up teaches (the rest are never shown before RL).
    known_per_category: int = 2
    #: Entities per category the warm-up shows only a little (partly known): they stand in its
    #: composites and are its query or recognition question ``partial_exposure`` times as often as
    #: a known entity. What RL can improve; never-shown entities give RL almost no successes to learn from.
    partial_per_category: int = 0
    partial_exposure: float = 0.1
    train_images: int = 256
    val_images: int = 128
    #: Grounding examples of the warm-up set (one query each); probe examples come on top.
    warmup_images: int = 192
    #: Warm-up recognition questions per known entity. With 12 the tiny model learned the names in one
    #: environment and stayed near chance in another (probe NLL 0.50, levels 2-4 for all 8 entities,
    #: no gap); with 24 the probe found the gap in both world seeds tried (measured, docs/EXPERIMENT.md).
    warmup_probe_per_entity: int = 24
    probe_images_per_entity: int = 8
    #: Side of one cell in pixels; the canvas is ``grid * cell_size`` square.
    cell_size: int = 32
    grid: int = 2
    objects_per_image: tuple[int, int] = (2, 4)
    #: Margin of an object inside its cell, in pixels, drawn per side from this range.
    margin_range: tuple[int, int] = (3, 5)
    #: Chance that an entity stands in its home cell (when free); else a random free cell. Each
    #: entity of a category has its own home, so where an entity tends to be is knowledge about it.
    home_bias: float = 0.8
    #: The box a warm-up answer gives: "cell", the object's cell at the middle margin (IoU >= 0.84
    #: with any object drawn in that cell at the default sizes), or "exact", the drawn box. With
    #: "cell" the warm-up teaches where an entity is and not the margin noise of each drawing, which
    #: a model that cannot see margins would otherwise sample and RL would chase.
    warmup_boxes: str = "cell"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.categories <= len(SHAPES):
            problems.append(f"categories: expected 1..{len(SHAPES)}, got {self.categories}")
        if self.entities_per_category < 4:
            problems.append(f"entities_per_category: expected >= 4 (a probe question has 4 options), "
                            f"got {self.entities_per_category}")
        if not 1 <= self.known_per_category < self.entities_per_category:
            problems.append(f"known_per_category: expected 1..{self.entities_per_category - 1}, "
                            f"got {self.known_per_category}")
        if self.partial_per_category < 0 or self.known_per_category + self.partial_per_category > \
                self.entities_per_category:
            problems.append(f"partial_per_category: expected 0..{self.entities_per_category - self.known_per_category}"
                            f" (entities_per_category - known_per_category), got {self.partial_per_category}")
        if not 0.0 < self.partial_exposure <= 1.0:
            problems.append(f"partial_exposure: expected a share in (0, 1], got {self.partial_exposure}")
        low, high = self.objects_per_image
        if not 2 <= low <= high <= self.grid * self.grid or high > self.entities_per_category:
            problems.append(f"objects_per_image: expected 2 <= low <= high <= min(grid^2, entities_per_category), "
                            f"got {self.objects_per_image}")
        for name in ("train_images", "val_images", "warmup_images", "probe_images_per_entity", "cell_size", "grid"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.warmup_probe_per_entity < 0:
            problems.append(f"warmup_probe_per_entity: expected >= 0, got {self.warmup_probe_per_entity}")
        if not 0.0 <= self.home_bias <= 1.0:
            problems.append(f"home_bias: expected a probability in [0, 1], got {self.home_bias}")
        if self.entities_per_category > self.grid * self.grid and self.home_bias > 0:
            problems.append(f"home_bias > 0 needs entities_per_category <= grid^2 (one home cell each), "
                            f"got {self.entities_per_category} entities for {self.grid * self.grid} cells")
        m_low, m_high = self.margin_range
        if not 0 <= m_low <= m_high or 2 * m_high >= self.cell_size - 2:
            problems.append(f"margin_range: expected 0 <= low <= high and 2 * high < cell_size - 2, "
                            f"got {self.margin_range}")
        if self.warmup_boxes not in ("cell", "exact"):
            problems.append(f"warmup_boxes: expected 'cell' or 'exact', got {self.warmup_boxes!r}")
        if problems:
            raise ValueError("WorldConfig: " + "; ".join(problems))

    @property
    def canvas_size(self) -> int:
        return self.grid * self.cell_size


@dataclass(frozen=True)
class Entity:
    name: str
    category: str
    shape: str
    colour: tuple[int, int, int]
    known: bool
    #: The cell (row-major) this entity stands in with probability ``home_bias``.
    home_cell: int = 0
    #: Shown a little by the warm-up (``WorldConfig.partial_per_category``); never with ``known``.
    partial: bool = False


@dataclass
class World:
    """What :func:`build_world` wrote: the entities and the paths of every file."""

    config: WorldConfig
    entities: list[Entity]
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def known(self) -> list[str]:
        return [e.name for e in self.entities if e.known]

    @property
    def partial(self) -> list[str]:
        return [e.name for e in self.entities if e.partial]

    @property
    def unknown(self) -> list[str]:
        return [e.name for e in self.entities if not e.known and not e.partial]

    def format(self) -> str:
        return (f"world: {len(self.entities)} entities in {self.config.categories} categories "
                f"({len(self.known)} known to the warm-up, "
                + (f"{len(self.partial)} partly known, " if self.partial else "")
                + f"{len(self.unknown)} unknown); "
                + ", ".join(f"{key} {value}" for key, value in self.counts.items()))


def make_entities(config: WorldConfig, rng: random.Random) -> list[Entity]:
    """Entities with unique two-syllable made-up names; colours spread over the hue circle per category."""
    names: set[str] = set()
    entities = []
    for c in range(config.categories):
        shape = SHAPES[c]  # one shape per category, in order: at most len(SHAPES) categories
        shown = rng.sample(range(config.entities_per_category), config.known_per_category + config.partial_per_category)
        known, partial = set(shown[: config.known_per_category]), set(shown[config.known_per_category:])
        homes = rng.sample(range(config.grid * config.grid), config.entities_per_category) if config.home_bias > 0 \
            else [0] * config.entities_per_category
        offset = rng.random()
        for j in range(config.entities_per_category):
            while True:
                name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)).capitalize()
                if name not in names:
                    names.add(name)
                    break
            hue = (offset + j / config.entities_per_category) % 1.0
            r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.9)
            entities.append(Entity(name=name, category=f"{shape}s", shape=shape,
                                   colour=(round(r * 255), round(g * 255), round(b * 255)), known=j in known,
                                   home_cell=homes[j], partial=j in partial))
    return entities


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _cell_box(config: WorldConfig, cell: int, rng: random.Random) -> tuple[int, int, int, int]:
    size, low, high = config.cell_size, *config.margin_range
    x0, y0 = (cell % config.grid) * size, (cell // config.grid) * size
    return (x0 + rng.randint(low, high), y0 + rng.randint(low, high),
            x0 + size - rng.randint(low, high), y0 + size - rng.randint(low, high))


def _cell_of(config: WorldConfig, box: Sequence[float]) -> tuple[int, int]:
    """(row, column) of the grid cell holding the centre of ``box`` (0-1000)."""
    scale = 1000 / config.canvas_size
    column = min(int((box[0] + box[2]) / 2 / scale) // config.cell_size, config.grid - 1)
    row = min(int((box[1] + box[3]) / 2 / scale) // config.cell_size, config.grid - 1)
    return row, column


def cell_answer_box(config: WorldConfig, box: Sequence[int]) -> tuple[int, int, int, int]:
    """The 0-1000 box of the cell holding ``box`` (0-1000), at the middle margin: a warm-up answer."""
    size, (low, high) = config.cell_size, config.margin_range
    scale = 1000 / config.canvas_size
    row, column = _cell_of(config, box)
    margin = (low + high) / 2
    x0, y0 = column * size, row * size
    return tuple(round(v * scale) for v in (x0 + margin, y0 + margin, x0 + size - margin, y0 + size - margin))


def _background(rng: random.Random) -> tuple[int, int, int]:
    grey = rng.randint(228, 250)
    return (grey, grey, grey)


def draw_composite(config: WorldConfig, members: Sequence[Entity], rng: random.Random
                   ) -> tuple[bytes, dict[str, tuple[int, int, int, int]]]:
    """A canvas with ``members`` in distinct cells; PNG bytes and each member's box on the 0-1000 grid.

    Members are placed in order: each takes its home cell with probability ``home_bias`` when that
    cell is still free, else a random free cell (so the first member, the query, is home most often).
    """
    from PIL import Image, ImageDraw

    size = config.canvas_size
    image = Image.new("RGB", (size, size), _background(rng))
    draw = ImageDraw.Draw(image)
    free = list(range(config.grid * config.grid))
    boxes = {}
    for entity in members:
        home = entity.home_cell in free and rng.random() < config.home_bias
        cell = entity.home_cell if home else free[rng.randrange(len(free))]
        free.remove(cell)
        box = _cell_box(config, cell, rng)
        draw_shape(draw, entity.shape, entity.colour, box)
        boxes[entity.name] = tuple(round(v * 1000 / size) for v in box)
    return _png(image), boxes


def draw_single(config: WorldConfig, entity: Entity, rng: random.Random) -> tuple[bytes, tuple[int, int, int, int]]:
    """One entity alone on a one-cell image (the probe's picture); PNG bytes and its 0-1000 box."""
    from PIL import Image, ImageDraw

    size = config.cell_size
    image = Image.new("RGB", (size, size), _background(rng))
    box = _cell_box(config, 0, rng)  # cell 0 sits at the origin whatever the grid
    draw_shape(ImageDraw.Draw(image), entity.shape, entity.colour, box)
    return _png(image), tuple(round(v * 1000 / size) for v in box)


def _grounding_rows(config: WorldConfig, entities: Sequence[Entity], count: int, rng: random.Random, *,
                    split: str, targets: Sequence[Entity], unique: bool, weights: Sequence[float] | None = None
                    ) -> list[tuple[dict[str, Any], bytes]]:
    """``count`` composites of one category each, the query naming one of ``targets`` (drawn with
    ``weights``, uniformly without); (RL row, PNG)."""
    by_category: dict[str, list[Entity]] = {}
    for entity in entities:
        by_category.setdefault(entity.category, []).append(entity)
    rows: list[tuple[dict[str, Any], bytes]] = []
    seen: set[str] = set()
    tries = 0
    while len(rows) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"{split}: could not draw {count} images with unique ground truths; "
                             f"raise cell_size or margin_range, or ask for fewer images")
        target = targets[rng.randrange(len(targets))] if weights is None else rng.choices(targets, weights)[0]
        pool = [e for e in by_category[target.category] if e.name != target.name]
        low, high = config.objects_per_image
        k = rng.randint(low, min(high, len(pool) + 1))
        members = [target, *rng.sample(pool, k - 1)]
        png, boxes = draw_composite(config, members, rng)
        box = boxes[target.name]
        truth = prompts.ground_truth(target.name, box)
        if unique and truth in seen:
            continue
        seen.add(truth)
        row = rl_row(image_bytes=png, width=config.canvas_size, height=config.canvas_size, entity=target.name,
                     category=target.category, boxes=[box], split=split, index=len(rows),
                     extra_info={"known": target.known, "partial": target.partial, "num_entities": k,
                                 "entities": sorted(m.name for m in members)})
        rows.append((row, png))
    return rows


def _write_parquet(path: Path, rows: Sequence[dict[str, Any]], schema: Any) -> None:
    with atomic_path(path) as tmp:
        writer = RowWriter(Path(tmp), schema)
        try:
            for row in rows:
                writer.add(row)
        finally:
            writer.close()


def build_world(config: WorldConfig, folder: str | Path) -> World:
    """Draw the world of ``config`` into ``folder`` (created); see the module docstring for the files."""
    import pyarrow as pa

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    entities = make_entities(config, rng)
    world = World(config=config, entities=entities, folder=folder)
    extra = [("known", pa.bool_()), ("partial", pa.bool_()), ("num_entities", pa.int64()),
             ("entities", pa.list_(pa.string()))]

    train = _grounding_rows(config, entities, config.train_images, rng, split="train", targets=entities,
                            unique=False)
    val = _grounding_rows(config, entities, config.val_images, rng, split="val", targets=entities, unique=True)
    _write_parquet(folder / TRAIN_FILE, [row for row, _ in train], rl_schema(extra))
    _write_parquet(folder / VAL_FILE, [row for row, _ in val], rl_schema(extra))

    probe_rows = []
    for entity in entities:
        for n in range(config.probe_images_per_entity):
            png, box = draw_single(config, entity, rng)
            probe_rows.append({
                "entity": entity.name, "category": entity.category, "image": {"bytes": png},
                "image_width": config.cell_size, "image_height": config.cell_size, "box": list(box),
                "source_id": f"{entity.name}-{n}",
                "co_entities": sorted(e.name for e in entities if e.category == entity.category and e is not entity),
                "split": "probe",
            })
    _write_parquet(folder / PROBE_FILE, probe_rows, probe_schema())

    # Warm-up: composites of shown (known and partly known) entities only, so that no unknown entity's
    # look is ever shown, and recognition questions about them on fresh single images; a partly
    # known entity is the query and the question partial_exposure times as often as a known one.
    warmup = []
    shown = [e for e in entities if e.known or e.partial]
    shown_per_category = config.known_per_category + config.partial_per_category
    weights = [1.0 if e.known else config.partial_exposure for e in shown] if config.partial_per_category else None
    if shown_per_category >= 2:
        low, high = config.objects_per_image
        warm_config = replace(config, objects_per_image=(min(low, shown_per_category), min(high, shown_per_category)))
        for i, (row, png) in enumerate(_grounding_rows(warm_config, shown, config.warmup_images, rng,
                                                       split="warmup", targets=shown, unique=False,
                                                       weights=weights)):
            name = f"warmup_grounding_{i}.png"
            (folder / "images" / name).write_bytes(png)
            box = row["extra_info"]["boxes"][0]
            if config.warmup_boxes == "cell":
                box = cell_answer_box(config, box)
            warmup.append({"kind": "grounding", "prompt": row["prompt"][0]["content"], "image": name,
                           "entity": row["extra_info"]["entity"], "entities": row["extra_info"]["entities"],
                           "target": warmup_answer(box)})
    items = []
    for entity in shown:
        questions = config.warmup_probe_per_entity if entity.known else \
            round(config.partial_exposure * config.warmup_probe_per_entity)
        for n in range(questions):
            png, _ = draw_single(config, entity, rng)
            name = f"warmup_probe_{entity.name}_{n}.png"
            (folder / "images" / name).write_bytes(png)
            items.append(ProbeItem(entity=entity.name, category=entity.category, image=name, image_id=name))
    if items:
        # Distractors come from the whole category (unknown names appear as wrong options only).
        all_items = items + [ProbeItem(entity=e.name, category=e.category, image="", image_id=f"none-{e.name}")
                             for e in entities if e not in shown]
        for question in build_questions(all_items, per_entity=config.warmup_probe_per_entity, seed=config.seed):
            if question.image:
                warmup.append({"kind": "probe", "prompt": question.prompt, "image": question.image,
                               "entity": question.entity, "target": question.answer_letter})
    rng.shuffle(warmup)
    atomic_write_text(folder / WARMUP_FILE, "".join(json.dumps(w) + "\n" for w in warmup))
    atomic_write_text(folder / WORLD_FILE, json.dumps({
        "config": asdict(config),
        "entities": [asdict(e) for e in entities],
    }, indent=2) + "\n")
    world.files = {"train": folder / TRAIN_FILE, "val": folder / VAL_FILE, "probe": folder / PROBE_FILE,
                   "warmup": folder / WARMUP_FILE, "world": folder / WORLD_FILE}
    world.counts = {"train rows": len(train), "val rows": len(val), "probe rows": len(probe_rows),
                    "warm-up examples": len(warmup)}
    return world


#: The rationale of every warm-up answer. It does not repeat the entity's name: a model that copies
#: names writes a *known* name for an unknown entity, its box then follows that name, and RL on
#: unknown entities would rewire the boxes of known ones (measured: known entities' validation acc@0.5
#: fell from 0.81 to 0.37 in 20 steps while unknown ones rose from 0.15 to 0.31).
WARMUP_RATIONALE = "I see it."


def warmup_answer(box: Sequence[int]) -> str:
    """The stage-1 answer of a grounding example: a fixed rationale, then the box.

    >>> warmup_answer((47, 47, 453, 453))
    '<think>I see it.</think><answer>(47,47),(453,453)</answer>'
    """
    return f"<think>{WARMUP_RATIONALE}</think><answer>{prompts.format_box(box)}</answer>"


def load_world(folder: str | Path) -> tuple[WorldConfig, list[Entity]]:
    """The config and entities of a world written by :func:`build_world` (``world.json``)."""
    path = Path(folder) / WORLD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()})
        entities = [Entity(**{**e, "colour": tuple(e["colour"])}) for e in data["entities"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a world file written by build_world ({exc})") from exc
    return config, entities


#: Hue (degrees) below which a colour takes each name; the last one wraps round to red.
_HUE_NAMES: tuple[tuple[float, str], ...] = (
    (15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (255, "blue"), (290, "purple"),
    (345, "pink"), (360, "red"),
)
_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLUMNS = {2: ("left", "right"), 3: ("left", "centre", "right")}


def colour_name(colour: Sequence[int]) -> str:
    """The everyday name of an entity's (saturated) colour, from its hue.

    >>> colour_name((230, 35, 35)), colour_name((35, 35, 230))
    ('red', 'blue')
    """
    hue = colorsys.rgb_to_hsv(*(v / 255 for v in colour[:3]))[0] * 360
    return next(name for below, name in _HUE_NAMES if hue < below)


def cell_words(config: WorldConfig, box: Sequence[float]) -> str:
    """Where ``box`` (0-1000) stands on the canvas, in words: "top left" on a 2x2 or 3x3 grid, else
    "row three column one" (words, not digits: the rule judge reads words only).

    >>> cell_words(WorldConfig(), (540, 47, 953, 453))
    'top right'
    """
    row, column = _cell_of(config, box)
    if config.grid in _ROWS:
        return f"{_ROWS[config.grid][row]} {_COLUMNS[config.grid][column]}"
    numbers = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    row_word, column_word = (numbers[n] if n < len(numbers) else f"number {n + 1}" for n in (row, column))
    return f"row {row_word} column {column_word}"


def stream_answers(config: WorldConfig, entity: Entity, box: Sequence[int]) -> dict[str, str]:
    """The warm-up answer of each iVGR stream for ``entity`` at ``box`` (0-1000): the grounded one's
    reasoning names the entity, its look and cell and writes the box ``[x1,y1,x2,y2]``; the textual
    one's says the same in words only, so a textual rollout like its target scores 1.0 with the rule
    judge against a grounded rollout like its target. One short sentence each (about 65 and 50 tokens
    of the tiny tokenizer with the answer), to fit ``data.max_response_length``.

    >>> entity = Entity("Kavo", "squares", "square", (230, 35, 35), True)
    >>> stream_answers(WorldConfig(), entity, (47, 47, 453, 453))["grounded"]
    '<think>Kavo is the red square at the top left [47,47,453,453].</think><answer>(47,47),(453,453)</answer>'
    """
    from karl_verl.ivgr import GROUNDED, TEXTUAL

    look = f"{entity.name} is the {colour_name(entity.colour)} {entity.shape} at the {cell_words(config, box)}"
    coordinates = ",".join(str(int(v)) for v in box)
    answer = f"<answer>{prompts.format_box(box)}</answer>"
    return {GROUNDED: f"<think>{look} [{coordinates}].</think>{answer}", TEXTUAL: f"<think>{look}.</think>{answer}"}


def write_stream_warmup(world: World, templates: Mapping[str, str] | None = None, *,
                        include_plain: bool = True) -> Path:
    """Write ``warmup_ivgr.jsonl`` next to ``warmup.jsonl``: every example of it (``include_plain``;
    validation asks the plain prompts), then each grounding example once per iVGR stream, its prompt
    rendered with the stream's template (:func:`karl_verl.ivgr.render_prompt`, ``templates`` as
    ``karl.ivgr.templates_path`` gives them) and its target :func:`stream_answers` (kind
    ``grounding``, field ``stream``). Deterministic (no new drawing); returns the path, also
    ``world.files["warmup_ivgr"]``.

    Without it the tiny model, warmed up on plain prompts only, answered the stream templates with
    about 2 tokens (a 4-step ``main_ppo`` run: every reward 0, no cache entry, no judge call).
    """
    from karl_verl.boxes import answer_span, read_box_reference
    from karl_verl.ivgr import STREAMS, render_prompt

    by_name = {e.name: e for e in world.entities}
    source = world.folder / WARMUP_FILE
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    streamed = []
    for record in records:
        if record["kind"] != "grounding":
            continue
        box = tuple(int(v) for v in read_box_reference(answer_span(record["target"]) or ""))
        answers = stream_answers(world.config, by_name[record["entity"]], box)
        streamed += [{**record, "prompt": render_prompt(stream, record["prompt"], templates), "stream": stream,
                      "target": answers[stream]} for stream in STREAMS]
    path = atomic_write_text(world.folder / STREAM_WARMUP_FILE,
                             "".join(json.dumps(r) + "\n" for r in (records if include_plain else []) + streamed))
    world.files["warmup_ivgr"] = Path(path)
    return Path(path)
