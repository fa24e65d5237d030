"""Synthetic images drawn with Pillow: the shapes that stand for entities, and a built-in single-entity set.

:func:`draw_shape` draws every object of the synthetic KVG world (:mod:`karl_verl.world`) and of
:func:`write_single_entity_images`: small single-entity images of the built-in entities, each a
distinct shape and colour on a plain background with its box known exactly, which
``karl-verl data compose`` turns into multi-entity composites and the matching probe set, as for
real FGVC-style sources (the dry run's data, and the built-in CoT set of :mod:`karl_verl.data.cot`).
CPU only, a fraction of a second.

:func:`draw_sized_image` draws one entity on a photo-sized canvas (:data:`REALISTIC_IMAGE_SIZES`), so
that tests see prompts of a real model's length (with the 8B geometry of
:mod:`karl_verl.testing.tiny_qwen3vl`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from karl_verl.atomic import atomic_write_text

#: The shapes :func:`draw_shape` draws.
SHAPES: tuple[str, ...] = ("ellipse", "square", "triangle", "diamond", "cross", "bar")

#: category -> entity names; five entities each, so probe questions always have 3 distractors.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "aircraft": ("Sukhoi Su-30", "Boeing 747", "Airbus A380", "Cessna 172", "F-16 Fighting Falcon"),
    "car": ("Tesla Model S", "Ford Mustang", "Fiat 500", "Volvo XC90", "Mini Cooper"),
    "bird": ("Blue Jay", "Northern Cardinal", "American Robin", "Barn Owl", "Mallard"),
}

_COLOURS = ((200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 160, 30), (140, 60, 170))

#: (width, height) of photo-sized test images, as fine-grained sets have them (448 to 1600 pixel sides),
#: and one 3000x3000 image: Qwen3-VL-8B makes 8,836 tokens of it (one per 32x32 pixels), more than
#: karl_kvg's ``rollout.max_model_len`` of 8192, so it must be reported, not trained on.
REALISTIC_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((448, 448), (1024, 768), (1600, 1200), (3000, 3000))


def draw_shape(draw: Any, shape: str, colour: tuple[int, int, int], box: tuple[int, int, int, int], *,
               cross_inset: tuple[float, float] | None = None) -> None:
    """Draw ``shape`` filling ``box`` (pixel x1, y1, x2, y2, inclusive of x1/y1, exclusive of x2/y2).

    ``cross_inset``: how far a cross's arms stand in from the box's sides (x, y), in pixels; by
    default a third of the box's width and height.
    """
    x1, y1, x2, y2 = box
    right, bottom = x2 - 1, y2 - 1
    cx, cy = (x1 + right) / 2, (y1 + bottom) / 2
    if shape == "ellipse":
        draw.ellipse((x1, y1, right, bottom), fill=colour)
    elif shape == "square":
        draw.rectangle((x1, y1, right, bottom), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (right, bottom), (x1, bottom)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (right, cy), (cx, bottom), (x1, cy)], fill=colour)
    elif shape == "cross":
        w, h = cross_inset if cross_inset is not None else ((x2 - x1) / 3, (y2 - y1) / 3)
        draw.rectangle((x1 + w, y1, right - w, bottom), fill=colour)
        draw.rectangle((x1, y1 + h, right, bottom - h), fill=colour)
    elif shape == "bar":
        h = (y2 - y1) / 4
        for k in (0, 2):
            draw.rectangle((x1, y1 + k * h + h / 2, right, y1 + (k + 1) * h + h / 2), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    margin = rng.randint(size // 8, size // 4)
    x1, y1 = margin + rng.randint(-4, 4), margin + rng.randint(-4, 4)
    x2, y2 = size - margin + rng.randint(-4, 4), size - margin + rng.randint(-4, 4)
    # (x1, y1, x2, y2) is the annotated box, its last pixel inclusive; a cross's arms stand in whole pixels.
    draw_shape(ImageDraw.Draw(image), shape, colour, (x1, y1, x2 + 1, y2 + 1),
               cross_inset=((x2 - x1) // 3, (y2 - y1) // 3))
    return image, (x1, y1, x2, y2)


def write_single_entity_images(
    out_dir: str | Path, *, images_per_entity: int = 3, size: int = 64, seed: int = 0
) -> Path:
    """Draw ``images_per_entity`` images of every built-in entity; return the annotations JSONL.

    Rows: ``{"image": "images/<file>.png", "entity", "category", "boxes": [[x1, y1, x2, y2]],
    "coords": "pixel_xyxy", "id"}`` (paths relative to the JSONL's folder).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for category, entities in CATEGORIES.items():
        for entity_index, entity in enumerate(entities):
            # Shape by entity and colour by category: entities of a category look alike but differ.
            shape = SHAPES[entity_index % len(SHAPES)]
            colour = _COLOURS[list(CATEGORIES).index(category) % len(_COLOURS)]
            for n in range(images_per_entity):
                image, box = _draw(shape, colour, size, rng)
                name = f"{category}_{entity_index}_{n}.png"
                image.save(out_dir / "images" / name)
                rows.append({"image": f"images/{name}", "entity": entity, "category": category,
                             "boxes": [list(box)], "coords": "pixel_xyxy", "id": name})
    annotations = out_dir / "annotations.jsonl"
    atomic_write_text(annotations, "".join(json.dumps(row) + "\n" for row in rows))
    return annotations


def draw_sized_image(width: int, height: int, *, shape: str = "ellipse", colour: tuple[int, int, int] = _COLOURS[0],
                     seed: int = 0) -> tuple[Any, tuple[int, int, int, int]]:
    """A ``width`` x ``height`` RGB image with one ``shape`` on a plain light background; (image, its box).

    The box is in pixels (x1, y1, x2, y2), last pixel inclusive, and covers 30-60% of each side at a
    seeded place. A plain background keeps the encoded file small (a 3000x3000 PNG is a few KiB),
    while the pixel count, which alone sets the token count, is the photo's.
    """
    from PIL import Image, ImageDraw

    if width < 8 or height < 8:
        raise ValueError(f"draw_sized_image: expected sides of at least 8 pixels, got {width}x{height}")
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randint(225, 255) for _ in range(3)))
    box_w, box_h = int(width * rng.uniform(0.3, 0.6)), int(height * rng.uniform(0.3, 0.6))
    x1, y1 = rng.randint(0, width - box_w), rng.randint(0, height - box_h)
    box = (x1, y1, x1 + box_w - 1, y1 + box_h - 1)
    draw_shape(ImageDraw.Draw(image), shape, colour, (x1, y1, x1 + box_w, y1 + box_h))
    return image, box
