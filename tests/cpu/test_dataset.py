"""Images read with Pillow alone, by qwen_vl_utils' rule (karl_verl/cpu/dataset.py)."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from karl_verl.cpu.dataset import PillowRLHFDataset, fit_image, fit_size, images_of_messages

# (height, width, factor, min_pixels, max_pixels) -> (height, width), worked out by hand from the rule:
# each side rounded to the nearest multiple of factor (at least factor; Python's round, ties to even);
# above max_pixels both sides are divided by sqrt(h*w / max) and floored to multiples, below
# min_pixels multiplied by sqrt(min / (h*w)) and ceiled.
FIT_SIZE_CASES = [
    ((100, 200, 32, 4096, 1_000_000), (96, 192)),  # 3.125 -> 3, 6.25 -> 6
    ((50, 90, 32, 4096, 1_000_000), (64, 96)),  # 1.56 -> 2, 2.81 -> 3
    ((80, 112, 32, 4096, 1_000_000), (64, 128)),  # 2.5 -> 2 and 3.5 -> 4: ties to even
    ((10, 300, 32, 1024, 1_000_000), (32, 288)),  # 0.31 -> 0, raised to one factor
    ((600, 800, 32, 4096, 65_536), (192, 288)),  # 608 x 800 too large: beta 2.706, 221.7 -> 192, 295.6 -> 288
    ((20, 30, 32, 16_384, 1_000_000), (128, 160)),  # 32 x 32 too small: beta 5.226, 104.5 -> 128, 156.8 -> 160
    ((64, 64, 32, 4096, 4096), (64, 64)),  # exactly at both limits
    ((1, 200, 32, 4096, 1_000_000), (32, 192)),  # aspect ratio 200 is still allowed
]


@pytest.mark.parametrize(("args", "expected"), FIT_SIZE_CASES)
def test_fit_size_follows_qwen_vl_utils_smart_resize(args, expected):
    assert fit_size(*args) == expected


@pytest.mark.parametrize("size", [(1, 201), (1000, 4)])
def test_fit_size_refuses_an_aspect_ratio_above_200(size):
    with pytest.raises(ValueError, match="aspect ratio"):
        fit_size(*size, 32, 4096, 1_000_000)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_fit_image_reads_pil_bytes_and_paths_alike(tmp_path):
    source = Image.new("RGB", (70, 50), (10, 120, 230))  # 50 x 70 -> 64 x 64 with patch 16
    path = tmp_path / "image.png"
    source.save(path)
    parts = [
        {"type": "image", "image": source},
        {"type": "image", "image": {"bytes": _png(source)}},
        {"type": "image", "image": _png(source)},
        {"type": "image", "bytes": _png(source)},
        {"type": "image", "image": str(path)},
        {"type": "image", "image": f"file://{path}"},
        {"type": "image_url", "image_url": str(path)},
    ]
    for part in parts:
        image = fit_image(part, patch_size=16)
        assert image.mode == "RGB" and image.size == (64, 64), part
        assert image.getpixel((32, 32)) == (10, 120, 230)


def test_fit_image_sizes_from_the_part_and_the_patch_size():
    source = Image.new("RGB", (200, 100), (0, 0, 0))
    assert fit_image({"image": source}, patch_size=16).size == (192, 96)  # (width, height)
    assert fit_image({"image": source}, patch_size=14).size == (196, 112)  # factor 28: 3.57 -> 4, 7.14 -> 7
    assert fit_image({"image": source, "max_pixels": 64 * 32}, patch_size=16).size == (64, 32)
    assert fit_image({"image": source, "resized_height": 64, "resized_width": 64}, patch_size=16).size == (64, 64)


def test_fit_image_composites_rgba_on_white_and_converts_other_modes():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))  # left half opaque blue
    image = fit_image({"image": rgba}, patch_size=16)
    assert image.mode == "RGB"
    assert image.getpixel((10, 10)) == (0, 0, 255)
    assert image.getpixel((50, 10)) == (255, 255, 255)  # not the hidden red, not black
    grey = fit_image({"image": Image.new("L", (64, 64), 77)}, patch_size=16)
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)


def test_fit_image_refuses_what_needs_the_network():
    with pytest.raises(ValueError, match="network"):
        fit_image({"type": "image", "image": "https://example.com/a.png"}, patch_size=16)


def test_images_of_messages_in_order():
    red, green = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (96, 64), (0, 255, 0))
    messages = [
        {"role": "system", "content": "plain text content is skipped"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": red},
                {"type": "text", "text": "and"},
                "a bare string part",
                {"type": "image", "image": {"bytes": _png(green)}},
            ],
        },
    ]
    images = images_of_messages(messages, patch_size=16)
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 255, 0)]
    assert [image.size for image in images] == [(64, 64), (96, 64)]
    assert images_of_messages([{"role": "user", "content": [{"type": "text", "text": "no image"}]}], 16) is None
    assert images_of_messages([], 16) is None


def test_images_of_messages_refuses_videos():
    with pytest.raises(ValueError, match="video"):
        images_of_messages([{"role": "user", "content": [{"type": "video", "video": ["frame.png"]}]}], 16)


@pytest.fixture(scope="module")
def grounding_parquet(tmp_path_factory):
    """A few rows as ``karl-verl data compose`` writes them (composite PNGs, one target entity each)."""
    from karl_verl.data.annotations import ReadOptions
    from karl_verl.data.compose import GROUNDING_FILE, ComposeConfig, compose_dataset
    from karl_verl.synthetic_images import write_single_entity_images

    root = tmp_path_factory.mktemp("compose")
    annotations = write_single_entity_images(root / "sources", images_per_entity=1, size=48)
    compose_dataset(
        [annotations],
        root / "data",
        ComposeConfig(num_images=3, tile_size=48, probe_images_per_entity=1, k_weights={2: 1.0}, image_format="png"),
        ReadOptions(),
        progress=False,
    )
    return root / "data" / GROUNDING_FILE


def test_pillow_dataset_reads_composed_rows(grounding_parquet, tmp_path, monkeypatch):
    import datasets
    import pandas as pd
    from omegaconf import OmegaConf

    from karl_verl.testing.tiny_qwen3vl import build_tiny_processor

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    processor = build_tiny_processor()
    config = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "image_key": "images",
            "max_prompt_length": 1024,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(tmp_path / "verl-cache"),
        }
    )
    rows = pd.read_parquet(grounding_parquet)
    # The length filter extracts every row's images; a row whose extraction failed would be dropped.
    dataset = PillowRLHFDataset(str(grounding_parquet), processor.tokenizer, config, processor=processor)
    assert len(dataset) == len(rows) == 3
    item = dataset[1]
    messages = item["raw_prompt"]
    assert [part["type"] for part in messages[0]["content"]] == ["image", "text"]
    # What the agent loop awaits before applying the chat template.
    images, videos = asyncio.run(PillowRLHFDataset.process_vision_info(messages, 16, config))
    assert videos is None and len(images) == 1
    width, height = item["extra_info"]["image_width"], item["extra_info"]["image_height"]
    assert images[0].size == tuple(reversed(fit_size(height, width, 32, 4 * 32 * 32, 16384 * 32 * 32)))
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    assert inputs["image_grid_thw"].shape == (1, 3)
    sync_images, sync_videos, audios = PillowRLHFDataset._process_multi_modal_info(messages, 16, config)
    assert sync_videos is None and audios is None and [i.size for i in sync_images] == [images[0].size]
