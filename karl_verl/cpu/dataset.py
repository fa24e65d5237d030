"""verl's ``RLHFDataset`` with images read by Pillow alone (``data.custom_cls``), for CPU runs.

verl's dataset (and through it the agent loop, which asks the dataset class to extract a prompt's
images) reads images with ``qwen_vl_utils.process_vision_info``, which imports torchvision at module
import; CPU-only machines have no torchvision build. :class:`PillowRLHFDataset` keeps everything
of ``RLHFDataset`` and replaces only that extraction, applying ``qwen_vl_utils``' own image rule
(:func:`fit_image`): RGB, then resized so that both sides are multiples of ``patch_size x 2`` and
the pixel count lies in ``[min_pixels, max_pixels]`` (defaults 4 and 16,384 merged patches). So
the prompt a CPU run builds has the same image token count as on a GPU node.

Used in the agent-loop workers, the TaskRunner (dataset) and the probe's prompt builder of a CPU
run (recipe ``karl_kvg_cpu``). Videos are not supported (KVG has none): a video part is an error.
"""

from __future__ import annotations

import asyncio
import io
import math
from typing import Any

from PIL import Image
from verl.utils.dataset.rl_dataset import RLHFDataset

#: qwen_vl_utils' limits, in merged patches of (patch_size * 2) ** 2 pixels.
MIN_MERGED_PATCHES = 4
MAX_MERGED_PATCHES = 16384
MAX_ASPECT_RATIO = 200
SPATIAL_MERGE = 2


def fit_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``qwen_vl_utils.smart_resize``: sides multiples of ``factor``, area in [min, max], aspect kept."""
    if max(height, width) / max(min(height, width), 1) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = math.floor(height / beta / factor) * factor
        new_w = math.floor(width / beta / factor) * factor
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def _open(part: dict[str, Any]) -> Image.Image:
    image = part.get("image", part.get("image_url"))
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray):
        return Image.open(io.BytesIO(image))
    if isinstance(image, dict) and image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"]))
    if part.get("bytes") is not None:
        return Image.open(io.BytesIO(part["bytes"]))
    if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
        return Image.open(image.removeprefix("file://"))
    raise ValueError(f"image part of type {type(image).__name__} cannot be read without network access: {part!r:.80}")


def fit_image(part: dict[str, Any], patch_size: int) -> Image.Image:
    """One image part of a structured message as ``qwen_vl_utils.fetch_image`` returns it."""
    image = _open(part)
    if image.mode == "RGBA":  # alpha composited on white, as qwen_vl_utils does
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    else:
        image = image.convert("RGB")
    factor = int(patch_size * SPATIAL_MERGE)
    if "resized_height" in part and "resized_width" in part:
        height, width = fit_size(int(part["resized_height"]), int(part["resized_width"]), factor,
                                 MIN_MERGED_PATCHES * factor**2, MAX_MERGED_PATCHES * factor**2)
    else:
        height, width = fit_size(image.height, image.width, factor,
                                 int(part.get("min_pixels", MIN_MERGED_PATCHES * factor**2)),
                                 int(part.get("max_pixels", MAX_MERGED_PATCHES * factor**2)))
    return image.resize((width, height))


def images_of_messages(messages: list[dict[str, Any]], patch_size: int) -> list[Image.Image] | None:
    """Every image part of ``messages`` in order, fitted; None when there is none."""
    images = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "video":
                raise ValueError("video parts are not supported by karl-verl's CPU dataset class")
            if part.get("type") == "image" or "image" in part or "image_url" in part:
                images.append(fit_image(part, patch_size))
    return images or None


class PillowRLHFDataset(RLHFDataset):
    """``RLHFDataset`` whose image extraction needs no torchvision (see the module docstring)."""

    @classmethod
    def _process_multi_modal_info(cls, messages: list[dict], image_patch_size: int, config: Any
                                  ) -> tuple[list[Image.Image] | None, None, list[Any] | None]:
        return images_of_messages(messages, int(image_patch_size)), None, cls._extract_audio_info(messages)

    @classmethod
    async def process_vision_info(cls, messages: list[dict], image_patch_size: int, config: Any
                                  ) -> tuple[list[Image.Image] | None, None]:
        loop = asyncio.get_running_loop()
        images = await loop.run_in_executor(None, images_of_messages, messages, int(image_patch_size))
        return images, None
