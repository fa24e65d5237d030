"""Grounding rows and a probe set on photo-sized images, for the tests of Qwen3-VL-8B's prompt shapes.

The images are :func:`karl_verl.synthetic_images.draw_sized_image`'s (one shape on a plain background,
a few KiB of PNG at any size); with a tiny Qwen3-VL saved with ``image_geometry="qwen3_vl_8b"`` their
prompts have the 8B's token counts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from karl_verl.synthetic_images import CATEGORIES, REALISTIC_IMAGE_SIZES, SHAPES, draw_sized_image

#: The category every row is of: five entities, so a probe set of it has 4-choice questions.
CATEGORY = "aircraft"


def smart_resize_tokens(width: int, height: int, factor: int = 32, min_pixels: int = 65536,
                        max_pixels: int = 16777216) -> int:
    """Image tokens by Qwen's published ``smart_resize`` (qwen_vl_utils, Qwen2-VL's image processor), with
    Qwen3-VL-8B's released numbers as defaults (a token per 32x32 pixels, 64 to 16,384 tokens): sides
    rounded to multiples of ``factor``; scaled down (floor) above ``max_pixels``, up (ceil) below
    ``min_pixels``. Written out here, apart from the code under test, so that the two can disagree."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


def png_of_size(width: int, height: int, index: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """(PNG bytes, pixel box) of the ``index``-th sized image: shape and place vary with ``index``."""
    image, box = draw_sized_image(width, height, shape=SHAPES[index % len(SHAPES)], seed=index)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), box


def write_sized_grounding_parquet(path: Path, sizes: Sequence[tuple[int, int]] = REALISTIC_IMAGE_SIZES) -> Path:
    """verl RL rows (``karl-verl data``'s schema), one per (width, height) of ``sizes``, in that order;
    the entity of row i is the i-th of :data:`CATEGORY` (cycling)."""
    from karl_verl.data.schema import RowWriter, rl_row, rl_schema, to_grid

    entities = CATEGORIES[CATEGORY]
    writer = RowWriter(path, rl_schema())
    try:
        for index, (width, height) in enumerate(sizes):
            image_bytes, box = png_of_size(width, height, index)
            writer.add(rl_row(image_bytes=image_bytes, width=width, height=height,
                              entity=entities[index % len(entities)], category=CATEGORY,
                              boxes=[to_grid(box, width, height)], split="train", index=index))
    finally:
        writer.close()
    return path


def write_sized_probe_parquet(path: Path, sizes: Sequence[tuple[int, int]]) -> Path:
    """A probe set (``entity``, ``category``, ``image``, ``image_id``), one row per size; the entities of
    :data:`CATEGORY` in turn."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    entities = CATEGORIES[CATEGORY]
    rows = [{"entity": entities[index % len(entities)], "category": CATEGORY,
             "image": {"bytes": png_of_size(width, height, index)[0]}, "image_id": f"sized-{index}-{width}x{height}"}
            for index, (width, height) in enumerate(sizes)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path



def resize_grounding_images(source: Path, path: Path, sizes: Sequence[tuple[int, int]]) -> Path:
    """``source``'s rows with row i's image stretched to ``sizes[i % len(sizes)]`` (width, height), as PNG.

    Ground-truth boxes are on the 0-1000 grid of the image, so they stay right under any stretch; the
    prompts, entities and everything else are kept.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(source)
    rows = table.to_pylist()
    for index, row in enumerate(rows):
        width, height = sizes[index % len(sizes)]
        with Image.open(io.BytesIO(row["images"][0]["bytes"])) as image:
            buffer = io.BytesIO()
            image.convert("RGB").resize((width, height)).save(buffer, format="PNG")
        row["images"] = [{**row["images"][0], "bytes": buffer.getvalue()}]
        row["extra_info"] = {**row["extra_info"], "image_width": width, "image_height": height}
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path)
    return path


def expected_prompt_lengths(processor: Any, parquet: Path) -> list[int]:
    """Each row's prompt in tokens, counted apart from the code under test: its chat-templated text (one
    ``<|image_pad|>`` per image) plus each image's tokens by :func:`smart_resize_tokens` (8B numbers)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from karl_verl.backends.base import GenerationRequest, structured_messages

    lengths = []
    for row in pq.read_table(parquet).to_pylist():
        sizes = []
        for image in row["images"]:
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                sizes.append(opened.size)
        messages = structured_messages(GenerationRequest(messages=row["prompt"], images=[None] * len(sizes)))
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        lengths.append(len(processor.tokenizer(text)["input_ids"]) - len(sizes)
                       + sum(smart_resize_tokens(*size) for size in sizes))
    return lengths
