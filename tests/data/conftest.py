"""Small generated KVG data: single-entity images with one coloured rectangle per entity."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

# Saturated, well separated colours: a composite's pixels can be told apart by colour alone.
PALETTE: dict[str, tuple[int, int, int]] = {
    "Sukhoi Su-30": (220, 20, 20),
    "Boeing 747": (20, 20, 220),
    "Airbus A320": (20, 180, 20),
    "Cessna 172": (230, 140, 0),
    "Tesla Model 3": (150, 0, 180),
    "Fiat 500": (0, 170, 170),
    "Mini Cooper": (120, 70, 20),
}
CATEGORY_OF = {
    "Sukhoi Su-30": "aircraft", "Boeing 747": "aircraft", "Airbus A320": "aircraft", "Cessna 172": "aircraft",
    "Tesla Model 3": "car", "Fiat 500": "car", "Mini Cooper": "car",
}
# Different sizes and aspect ratios, so every layout has to rescale.
SIZES = [(90, 60), (64, 96), (120, 120), (80, 50), (70, 110)]


def image_bytes(size: tuple[int, int], box: tuple[int, int, int, int] | None, color: tuple[int, int, int],
                fmt: str = "PNG") -> bytes:
    """A white image with ``box`` (pixel corners, exclusive end) filled with ``color``; the whole image if None."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    x1, y1, x2, y2 = box if box is not None else (0, 0, *size)
    ImageDraw.Draw(image).rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class SingleEntitySet:
    """An annotations.jsonl with images beside it; ``records`` as written."""

    root: Path
    annotations: Path
    records: list[dict]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_single_entity_set(
    root: Path, images_per_entity: int = 2, entities: list[str] | None = None
) -> SingleEntitySet:
    """Every entity gets ``images_per_entity`` PNGs (varied sizes) with its rectangle at a known pixel box."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for e, entity in enumerate(entities or list(PALETTE)):
        for i in range(images_per_entity):
            width, height = SIZES[(e + i) % len(SIZES)]
            box = (5 + 3 * i, 4 + 2 * e, width - 6 - e, height - 5 - i)
            name = f"img_{e}_{i}.png"
            (root / name).write_bytes(image_bytes((width, height), box, PALETTE[entity]))
            records.append({"image": name, "entity": entity, "category": CATEGORY_OF[entity],
                            "boxes": list(box), "coords": "pixel_xyxy", "id": f"{e}-{i}"})
    return SingleEntitySet(root, write_jsonl(root / "annotations.jsonl", records), records)


@pytest.fixture
def single_entity_set(tmp_path: Path) -> SingleEntitySet:
    return make_single_entity_set(tmp_path / "src")


@pytest.fixture
def make_image():
    """:func:`image_bytes` for tests (conftest modules are not importable under importlib mode)."""
    return image_bytes


@pytest.fixture
def make_set():
    """:func:`make_single_entity_set` for tests."""
    return make_single_entity_set


@pytest.fixture
def palette() -> dict[str, tuple[int, int, int]]:
    return dict(PALETTE)


@pytest.fixture
def jsonl():
    """:func:`write_jsonl` for tests."""
    return write_jsonl
