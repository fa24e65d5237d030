"""``karl-verl data compose``: multi-entity composite images from single-entity images.

docs/METHOD.md section 4: sample k images of k different entities of one category, k drawn from
a distribution over [2, 6], and paste them into one image with one of four layouts; every box is
remapped to its place in the composite.

Layouts (each tile keeps its aspect ratio; ``tile_size`` sets the scale):

* ``horizontal``: tiles scaled to height ``tile_size``, side by side;
* ``vertical``: tiles scaled to width ``tile_size``, stacked;
* ``grid``: ceil(sqrt(k)) columns of ``tile_size`` square cells, each tile fitted and centred;
* ``random``: tiles with their longest side in [0.6, 1.0] x ``tile_size`` at random positions on
  a square canvas, no two overlapping.

A box (x1, y1, x2, y2) of a source image of size (w, h) pasted at (x, y) with size (w', h') lands at
(x + x1 w'/w, y + y1 h'/h, x + x2 w'/w, y + y2 h'/h): the scale factors are those of the actual
resize, so the remapped box is exact up to the final rounding onto the 0-1000 grid.

Two outputs, in one folder:

* ``grounding.parquet``: verl RL rows (see :mod:`karl_verl.data.convert`), ``queries_per_image``
  target entities per composite; ``extra_info`` adds ``composite_id``, ``layout``,
  ``num_entities`` and ``entities`` (every entity in the composite, in placement order).
* ``probe.parquet``: the matching probe set (see :data:`PROBE_COLUMNS`, read as is by
  :func:`karl_verl.probe.questions.load_probe_set`): for every entity shown in a composite (target
  or not: the probe draws its distractors from the entities of the set), up to
  ``probe_images_per_entity`` of its single-entity source images, with the entities it shares
  composites with (``co_entities``, the paper's preferred distractors).

Everything random comes from one ``random.Random(seed)``: the same inputs and seed give the same
outputs.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karl_verl.atomic import atomic_path
from karl_verl.data.annotations import ReadOptions, count_records, iter_annotations
from karl_verl.data.schema import Annotation, GridBox, PixelBox, RowWriter, check_grid_box, rl_row, rl_schema, to_grid

LAYOUTS: tuple[str, ...] = ("horizontal", "vertical", "grid", "random")
K_RANGE: tuple[int, int] = (2, 6)
IMAGE_FORMATS: tuple[str, ...] = ("jpeg", "png")

GROUNDING_FILE = "grounding.parquet"
PROBE_FILE = "probe.parquet"

#: Columns of the probe set: one single-entity image per row.
PROBE_COLUMNS: tuple[str, ...] = (
    "entity", "category", "image", "image_width", "image_height", "box", "source_id", "co_entities", "split",
)

# A random placement that cannot be found in this many tries per tile restarts on a larger canvas.
_PLACEMENT_TRIES = 200
_CANVAS_GROWTH = 1.15
_RANDOM_SCALE_RANGE = (0.6, 1.0)
# Free area of the first random canvas, relative to the summed tile area.
_RANDOM_FILL = 2.0


@dataclass(frozen=True)
class ComposeConfig:
    """How composites are drawn. ``k_weights`` maps k in [2, 6] to a relative weight."""

    num_images: int = 1000
    k_weights: Mapping[int, float] = field(default_factory=lambda: {k: 1.0 for k in range(2, 7)})
    layouts: tuple[str, ...] = LAYOUTS
    tile_size: int = 336
    #: Target entities (output rows) per composite; 0: every entity in it.
    queries_per_image: int = 1
    probe_images_per_entity: int = 50
    seed: int = 0
    split: str = "train"
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images: expected a positive integer, got {self.num_images}")
        weights = {int(k): float(w) for k, w in self.k_weights.items()}
        bad = [k for k in weights if not K_RANGE[0] <= k <= K_RANGE[1]]
        if bad or not weights:
            raise ValueError(f"k distribution: every k must lie in [{K_RANGE[0]}, {K_RANGE[1]}], got {sorted(weights)}")
        if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"k distribution: weights must be finite, >= 0 and not all 0, got {weights}")
        object.__setattr__(self, "k_weights", dict(sorted(weights.items())))
        unknown = [name for name in self.layouts if name not in LAYOUTS]
        if unknown or not self.layouts:
            raise ValueError(f"layouts: expected some of {list(LAYOUTS)}, got {list(self.layouts)}")
        if self.tile_size < 16:
            raise ValueError(f"tile_size: expected at least 16 pixels, got {self.tile_size}")
        if self.queries_per_image < 0 or self.probe_images_per_entity < 1:
            raise ValueError("queries_per_image must be >= 0 and probe_images_per_entity >= 1")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format: expected one of {list(IMAGE_FORMATS)}, got {self.image_format!r}")


def parse_k_distribution(text: str) -> dict[int, float]:
    """``"2:0.3,3:0.3,4:0.2,5:0.1,6:0.1"`` -> ``{2: 0.3, ...}``; ``"3"`` -> ``{3: 1.0}``.

    >>> parse_k_distribution("2:1, 4:3")
    {2: 1.0, 4: 3.0}
    """
    weights: dict[int, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k_text, _, weight_text = part.partition(":")
        try:
            weights[int(k_text)] = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"k distribution: expected K:WEIGHT pairs such as '2:0.5,3:0.5', got {part!r}") from None
    return weights


# ---------------------------------------------------------------------------------------------
# Layout geometry (pure: sizes in, rectangles out)


@dataclass(frozen=True)
class Placement:
    """Where one tile goes: top-left corner and size in the composite."""

    x: int
    y: int
    width: int
    height: int


def plan_layout(
    sizes: Sequence[tuple[int, int]], layout: str, tile_size: int, rng: random.Random
) -> tuple[tuple[int, int], list[Placement]]:
    """Canvas (width, height) and one placement per source size, for ``layout``."""
    if layout == "horizontal":
        placements, x = [], 0
        for w, h in sizes:
            width = max(1, round(w * tile_size / h))
            placements.append(Placement(x, 0, width, tile_size))
            x += width
        return (x, tile_size), placements
    if layout == "vertical":
        placements, y = [], 0
        for w, h in sizes:
            height = max(1, round(h * tile_size / w))
            placements.append(Placement(0, y, tile_size, height))
            y += height
        return (tile_size, y), placements
    if layout == "grid":
        cols = math.ceil(math.sqrt(len(sizes)))
        rows = math.ceil(len(sizes) / cols)
        placements = []
        for i, (w, h) in enumerate(sizes):
            width, height = _fit(w, h, tile_size)
            row, col = divmod(i, cols)
            placements.append(Placement(col * tile_size + (tile_size - width) // 2,
                                        row * tile_size + (tile_size - height) // 2, width, height))
        return (cols * tile_size, rows * tile_size), placements
    if layout == "random":
        return _plan_random(sizes, tile_size, rng)
    raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")


def _fit(w: int, h: int, side: float) -> tuple[int, int]:
    """Scale (w, h) so that the longer side is ``side``."""
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _plan_random(
    sizes: Sequence[tuple[int, int]], tile_size: int, rng: random.Random
) -> tuple[tuple[int, int], list[Placement]]:
    scaled = [_fit(w, h, tile_size * rng.uniform(*_RANDOM_SCALE_RANGE)) for w, h in sizes]
    side = max(
        max(max(w, h) for w, h in scaled),
        math.ceil(math.sqrt(_RANDOM_FILL * sum(w * h for w, h in scaled))),
    )
    # Larger tiles first: they are the hard ones to fit.
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i][0] * scaled[i][1])
    while True:
        placed: dict[int, Placement] = {}
        for i in order:
            w, h = scaled[i]
            for _ in range(_PLACEMENT_TRIES):
                candidate = Placement(rng.randint(0, side - w), rng.randint(0, side - h), w, h)
                if not any(_overlap(candidate, other) for other in placed.values()):
                    placed[i] = candidate
                    break
            else:
                break
        if len(placed) == len(scaled):
            return (side, side), [placed[i] for i in range(len(scaled))]
        side = math.ceil(side * _CANVAS_GROWTH)


def _overlap(a: Placement, b: Placement) -> bool:
    return a.x < b.x + b.width and b.x < a.x + a.width and a.y < b.y + b.height and b.y < a.y + a.height


def remap_box(box: PixelBox, source_size: tuple[int, int], placement: Placement) -> PixelBox:
    """A source-pixel box in composite pixels (exact: the scale factors are the resize's own).

    >>> remap_box((10, 20, 30, 40), (100, 100), Placement(50, 0, 200, 50))
    (70.0, 10.0, 110.0, 20.0)
    """
    sx = placement.width / source_size[0]
    sy = placement.height / source_size[1]
    x1, y1, x2, y2 = box
    return (placement.x + x1 * sx, placement.y + y1 * sy, placement.x + x2 * sx, placement.y + y2 * sy)


def render(sources: Sequence[Annotation], canvas: tuple[int, int], placements: Sequence[Placement],
           background: tuple[int, int, int]) -> Any:
    """Paste each source, resized to its placement, on a ``canvas`` of ``background`` colour."""
    from PIL import Image

    composite = Image.new("RGB", canvas, background)
    for source, placement in zip(sources, placements, strict=True):
        with Image.open(io.BytesIO(source.image.read())) as image:
            tile = image.convert("RGB").resize((placement.width, placement.height), Image.Resampling.BILINEAR)
        composite.paste(tile, (placement.x, placement.y))
    return composite


def encode(image: Any, image_format: str, jpeg_quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class ComposeSummary:
    """What a compose run wrote."""

    out_dir: Path
    composites: int = 0
    rows: int = 0
    probe_rows: int = 0
    probe_entities: int = 0
    sources: int = 0
    multi_box_sources: int = 0
    #: Sources whose box is their whole image (no box given: fine for Food-101-like sets, a sign of
    #: a misnamed box column otherwise).
    whole_image_sources: int = 0
    per_category: Counter = field(default_factory=Counter)
    per_k: Counter = field(default_factory=Counter)
    per_layout: Counter = field(default_factory=Counter)
    skipped_categories: list[str] = field(default_factory=list)
    #: Largest k asked for (a positive weight in ``k_weights``).
    max_k: int = 0
    #: Categories (composed from) with fewer entities than ``max_k``: category -> its entity count.
    #: Composites there never reach the larger k, so the k mix drifts from the one asked for.
    k_out_of_reach: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        def counts(counter: Counter) -> str:
            return ", ".join(f"{key} {value}" for key, value in sorted(counter.items()))

        lines = [
            f"read {self.sources} single-entity images; wrote {self.composites} composites",
            f"  {self.rows} grounding rows -> {self.out_dir / GROUNDING_FILE}",
            f"  {self.probe_rows} probe images of {self.probe_entities} entities -> {self.out_dir / PROBE_FILE}",
            f"  categories: {counts(self.per_category)}",
            f"  k: {counts(self.per_k)}",
            f"  layouts: {counts(self.per_layout)}",
        ]
        if self.skipped_categories:
            lines.append(f"  skipped (too few entities for the smallest k): {', '.join(self.skipped_categories)}")
        if self.k_out_of_reach:
            listing = ", ".join(f"{name} ({count})" for name, count in sorted(self.k_out_of_reach.items()))
            lines.append(f"  warning: k up to {self.max_k} was asked for, but these categories have fewer entities "
                         f"(count in brackets), so their composites stop below it: {listing}; add entities or "
                         "narrow --k-dist")
        if self.multi_box_sources:
            lines.append(f"  {self.multi_box_sources} source images have several boxes of their entity")
        if self.whole_image_sources:
            lines.append(f"  {self.whole_image_sources} of {self.sources} source images had no box: their whole image "
                         "is the entity's box (if your file has boxes, name the column: --field boxes=COLUMN)")
        return "\n".join(lines)


def load_sources(inputs: Sequence[str | Path], options: ReadOptions, progress: bool) -> list[Annotation]:
    """Read and validate every source annotation (a source without boxes covers its whole image)."""
    import dataclasses

    from tqdm import tqdm

    options = dataclasses.replace(options, allow_missing_boxes=True)
    sources: list[Annotation] = []
    for path in inputs:
        path = Path(path)
        records = iter_annotations(path, options)
        sources.extend(tqdm(records, total=count_records(path), desc=f"read {path.name}", unit="image",
                            disable=not progress))
    return sources


def compose_dataset(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    config: ComposeConfig | None = None,
    options: ReadOptions | None = None,
    *,
    progress: bool = True,
) -> ComposeSummary:
    """Compose ``config.num_images`` composites from the single-entity annotations in ``inputs``."""
    from tqdm import tqdm

    config = config or ComposeConfig()
    out_dir = Path(out_dir)
    sources = load_sources(inputs, options or ReadOptions(), progress)
    summary = ComposeSummary(out_dir=out_dir, sources=len(sources))
    summary.multi_box_sources = sum(len(source.boxes) > 1 for source in sources)
    summary.whole_image_sources = sum(
        source.boxes == ((0.0, 0.0, float(source.width), float(source.height)),) for source in sources
    )

    pools: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, source in enumerate(sources):
        pools[source.category][source.entity].append(i)
    min_k = min(k for k, weight in config.k_weights.items() if weight > 0)
    categories = sorted(name for name, entities in pools.items() if len(entities) >= min_k)
    summary.skipped_categories = sorted(set(pools) - set(categories))
    summary.max_k = max(k for k, weight in config.k_weights.items() if weight > 0)
    summary.k_out_of_reach = {name: len(pools[name]) for name in categories if len(pools[name]) < summary.max_k}
    if not categories:
        raise ValueError(f"no category has single-entity images of at least {min_k} different entities")
    category_weights = [sum(len(images) for images in pools[name].values()) for name in categories]

    rng = random.Random(config.seed)
    co_entities: dict[tuple[str, str], set[str]] = defaultdict(set)
    extra_fields = _composite_fields()
    grounding_path, probe_path = out_dir / GROUNDING_FILE, out_dir / PROBE_FILE
    with contextlib.ExitStack() as stack:
        # Both files appear together or not at all.
        grounding_tmp = stack.enter_context(atomic_path(grounding_path))
        probe_tmp = stack.enter_context(atomic_path(probe_path))
        writer = RowWriter(grounding_tmp, rl_schema(extra_fields))
        try:
            for composite_id in tqdm(range(config.num_images), desc="compose", unit="image", disable=not progress):
                category = rng.choices(categories, weights=category_weights)[0]
                members, layout, canvas, placements = _draw_composite(pools[category], sources, config, rng)
                image_bytes = encode(render(members, canvas, placements, config.background),
                                     config.image_format, config.jpeg_quality)
                k, chosen = len(members), [member.entity for member in members]
                num_queries = k if config.queries_per_image == 0 else min(k, config.queries_per_image)
                for target in sorted(rng.sample(range(k), num_queries)):
                    member = members[target]
                    boxes = [composite_grid_box(box, member, placements[target], canvas) for box in member.boxes]
                    writer.add(rl_row(
                        image_bytes=image_bytes,
                        width=canvas[0],
                        height=canvas[1],
                        entity=member.entity,
                        category=category,
                        boxes=boxes,
                        split=config.split,
                        index=writer.count,
                        extra_info={
                            "composite_id": composite_id,
                            "layout": layout,
                            "num_entities": k,
                            "entities": chosen,
                            "source_id": member.id or str(member.where),
                        },
                    ))
                for entity in chosen:
                    co_entities[(category, entity)].update(e for e in chosen if e != entity)
                summary.per_category[category] += 1
                summary.per_k[k] += 1
                summary.per_layout[layout] += 1
        finally:
            writer.close()
        summary.composites = config.num_images
        summary.rows = writer.count
        summary.probe_rows = write_probe_set(probe_tmp, sources, pools, co_entities, config, rng, progress)
        summary.probe_entities = len(co_entities)
    return summary


def _draw_composite(
    pool: Mapping[str, list[int]], sources: Sequence[Annotation], config: ComposeConfig, rng: random.Random
) -> tuple[list[Annotation], str, tuple[int, int], list[Placement]]:
    """k distinct entities of one category (``pool``: entity -> source indices), one image each, and a layout."""
    entities = sorted(pool)
    # k larger than the category's entity count is left out; the smallest k always remains.
    ks = [k for k, weight in config.k_weights.items() if k <= len(entities) and weight > 0]
    k = rng.choices(ks, weights=[config.k_weights[k] for k in ks])[0]
    members = [sources[rng.choice(pool[entity])] for entity in rng.sample(entities, k)]
    layout = rng.choice(config.layouts)
    canvas, placements = plan_layout([(m.width, m.height) for m in members], layout, config.tile_size, rng)
    return members, layout, canvas, placements


def composite_grid_box(box: PixelBox, member: Annotation, placement: Placement, canvas: tuple[int, int]) -> GridBox:
    """A source box of ``member`` on the composite's 0-1000 grid."""
    remapped = remap_box(box, (member.width, member.height), placement)
    return check_grid_box(to_grid(remapped, canvas[0], canvas[1]), member.where)


def _composite_fields() -> list[tuple[str, Any]]:
    import pyarrow as pa

    return [
        ("composite_id", pa.int64()),
        ("layout", pa.string()),
        ("num_entities", pa.int64()),
        ("entities", pa.list_(pa.string())),
        ("source_id", pa.string()),
    ]


def probe_schema() -> Any:
    """pyarrow schema of the probe set (:data:`PROBE_COLUMNS`)."""
    import pyarrow as pa

    return pa.schema([
        ("entity", pa.string()),
        ("category", pa.string()),
        ("image", pa.struct([("bytes", pa.binary())])),
        ("image_width", pa.int64()),
        ("image_height", pa.int64()),
        ("box", pa.list_(pa.int64())),
        ("source_id", pa.string()),
        ("co_entities", pa.list_(pa.string())),
        ("split", pa.string()),
    ])


def write_probe_set(
    path: Path,
    sources: Sequence[Annotation],
    pools: Mapping[str, Mapping[str, list[int]]],
    co_entities: Mapping[tuple[str, str], set[str]],
    config: ComposeConfig,
    rng: random.Random,
    progress: bool,
) -> int:
    """Up to ``probe_images_per_entity`` single-entity images per entity of ``co_entities``; returns the row count."""
    from tqdm import tqdm

    writer = RowWriter(path, probe_schema())
    try:
        for category, entity in tqdm(sorted(co_entities), desc="probe set", unit="entity", disable=not progress):
            pool = pools[category][entity]
            picked = sorted(rng.sample(pool, min(len(pool), config.probe_images_per_entity)))
            for i in picked:
                source = sources[i]
                writer.add({
                    "entity": entity,
                    "category": category,
                    "image": {"bytes": source.image.read()},
                    "image_width": source.width,
                    "image_height": source.height,
                    "box": list(source.grid_boxes()[0]),
                    "source_id": source.id or str(source.where),
                    "co_entities": sorted(co_entities[(category, entity)]),
                    "split": config.split,
                })
    finally:
        writer.close()
    return writer.count
