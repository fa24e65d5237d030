"""Built-in data for the dry run: small single-entity images drawn with Pillow.

Each entity of a category is a distinct shape and colour on a plain background, with its box
known exactly; ``karl-verl data compose`` then turns them into multi-entity composites and the
matching probe set, as for real FGVC-style sources. CPU only, a fraction of a second.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from karl_verl.atomic import atomic_write_text

#: category -> entity names; five entities each, so probe questions always have 3 distractors.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "aircraft": ("Sukhoi Su-30", "Boeing 747", "Airbus A380", "Cessna 172", "F-16 Fighting Falcon"),
    "car": ("Tesla Model S", "Ford Mustang", "Fiat 500", "Volvo XC90", "Mini Cooper"),
    "bird": ("Blue Jay", "Northern Cardinal", "American Robin", "Barn Owl", "Mallard"),
}

_SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "cross")
_COLOURS = ((200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 160, 30), (140, 60, 170))


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    margin = rng.randint(size // 8, size // 4)
    x1, y1 = margin + rng.randint(-4, 4), margin + rng.randint(-4, 4)
    x2, y2 = size - margin + rng.randint(-4, 4), size - margin + rng.randint(-4, 4)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    if shape == "ellipse":
        draw.ellipse((x1, y1, x2, y2), fill=colour)
    elif shape == "rectangle":
        draw.rectangle((x1, y1, x2, y2), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=colour)
    else:
        third_w, third_h = (x2 - x1) // 3, (y2 - y1) // 3
        draw.rectangle((x1 + third_w, y1, x2 - third_w, y2), fill=colour)
        draw.rectangle((x1, y1 + third_h, x2, y2 - third_h), fill=colour)
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
            shape = _SHAPES[entity_index % len(_SHAPES)]
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
