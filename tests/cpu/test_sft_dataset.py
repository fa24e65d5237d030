"""verl's SFT dataset with images read by Pillow (karl_verl/cpu/sft_dataset.py): no qwen_vl_utils needed."""

from __future__ import annotations

import io
import sys

import pytest
from omegaconf import OmegaConf
from PIL import Image

from karl_verl.cpu.dataset import SPATIAL_MERGE, fit_size
from karl_verl.cpu.sft_dataset import PillowMultiTurnSFTDataset


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    from karl_verl.data.cot import write_builtin_cot_set
    from karl_verl.data.sft import convert_sharegpt
    from karl_verl.testing.tiny_qwen3vl import load_tiny_processor, save_tiny_checkpoint

    convert_sharegpt([write_builtin_cot_set(tmp_path / "data", num_images=2)], tmp_path / "sft.parquet",
                     max_pixels=64 * 64, progress=False)
    processor = load_tiny_processor(save_tiny_checkpoint(tmp_path / "tiny"))
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", None)  # importing it would now fail
    config = OmegaConf.create({"max_length": 1024, "truncation": "right", "pad_mode": "no_padding"})
    return PillowMultiTurnSFTDataset(str(tmp_path / "sft.parquet"), processor.tokenizer, config, processor=processor)


def test_rows_become_image_parts_fitted_to_their_max_pixels(dataset):
    row = dataset.dataframe.iloc[0].to_dict()
    messages = dataset._build_messages(row)
    (part,) = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    original = Image.open(io.BytesIO(row["images"][0]["bytes"]))
    factor = dataset.image_patch_size * SPATIAL_MERGE
    height, width = fit_size(original.height, original.width, factor, 4 * factor**2, 64 * 64)
    assert part["image"].size == (width, height) and part["image"].mode == "RGB"


def test_an_item_carries_the_image_tensors_and_a_loss_mask_on_the_answer(dataset):
    item = dataset[0]
    assert "pixel_values" in item["multi_modal_inputs"] and "image_grid_thw" in item["multi_modal_inputs"]
    assert 0 < int(item["loss_mask"].sum()) < len(item["input_ids"])


def test_more_placeholders_than_images_is_an_error(dataset):
    row = dataset.dataframe.iloc[0].to_dict()
    row["messages"] = [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(ValueError, match="placeholders"):
        dataset._build_messages(row)
