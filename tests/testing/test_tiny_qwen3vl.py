"""The tiny Qwen3-VL fixture builds, generates on an image, and survives a save/load round trip (CPU); with
Qwen3-VL-8B's image geometry its prompts have the 8B's token counts."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from sized_data import smart_resize_tokens
from transformers import Qwen3VLForConditionalGeneration

from karl_verl.synthetic_images import REALISTIC_IMAGE_SIZES, draw_sized_image
from karl_verl.testing.tiny_qwen3vl import (
    QWEN3_VL_8B_IMAGE_GEOMETRY,
    SPECIAL_TOKENS,
    TINY_MARKER_FILE,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    is_tiny_checkpoint,
    load_tiny_processor,
    save_tiny_checkpoint,
    set_image_geometry,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_tiny_processor(tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(seed=0, tokenizer=tokenizer)


def _image() -> Image.Image:
    return Image.new("RGB", (48, 40), (200, 30, 30))


def _messages(text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_tokenizer_has_qwen_special_tokens_and_single_token_letters(tokenizer):
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tokenizer.convert_ids_to_tokens(ids[0]) == token
    for letter in "ABCD":
        assert len(tokenizer.encode(letter, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "<think>x</think> <answer>(1,2),(3,4)</answer>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_image_part_and_generation_prompt(processor):
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_model_config_matches_tokenizer(model, tokenizer):
    config = model.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert config.vision_config.deepstack_visual_indexes == [0]


def test_generate_on_one_image(model, processor):
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_image()], return_tensors="pt")
    # 48x40 is resized to 64x32: 4x2 patches of 16, merged 2x2 -> 2 image tokens.
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 2
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_same_seed_same_weights():
    a, b, c = build_tiny_model(seed=3), build_tiny_model(seed=3), build_tiny_model(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_save_and_load_round_trip(tmp_path, model, processor):
    directory = save_tiny_checkpoint(tmp_path / "tiny", seed=0)
    assert is_tiny_checkpoint(directory) and (directory / TINY_MARKER_FILE).is_file()
    assert not is_tiny_checkpoint(tmp_path)
    saved = json.loads((directory / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen3VLProcessor"

    loaded_model = Qwen3VLForConditionalGeneration.from_pretrained(directory).eval()
    loaded_processor = load_tiny_processor(directory)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded_model.state_dict()[key]), key

    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    assert loaded_processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False) == text
    original = processor(text=[text], images=[_image()], return_tensors="pt")
    reloaded = loaded_processor(text=[text], images=[_image()], return_tensors="pt")
    assert torch.equal(original["input_ids"], reloaded["input_ids"])
    assert torch.allclose(original["pixel_values"], reloaded["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(model(**original).logits, loaded_model(**reloaded).logits, atol=1e-6)


def test_load_tiny_processor_refuses_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tiny fixture"):
        load_tiny_processor(tmp_path)


def test_processor_pickles(processor):
    import pickle

    from karl_verl.testing.tiny_qwen3vl import TinyQwen3VLProcessor

    clone = pickle.loads(pickle.dumps(processor))
    assert isinstance(clone, TinyQwen3VLProcessor)
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    assert torch.equal(clone(text=[text], images=[_image()], return_tensors="pt")["input_ids"],
                       processor(text=[text], images=[_image()], return_tensors="pt")["input_ids"])


def test_the_vllm_cpu_size_has_32_wide_text_heads_and_generates(tokenizer, processor):
    from karl_verl.testing.tiny_qwen3vl import VLLM_CPU_SIZE, TinySize

    model = build_tiny_model(seed=0, tokenizer=tokenizer, size=VLLM_CPU_SIZE)
    text = model.config.text_config
    assert text.head_dim == 32 and text.num_attention_heads * text.head_dim == text.hidden_size == 128
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert model.config.vision_config.hidden_size // model.config.vision_config.num_heads == 16
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_image()], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    with pytest.raises(ValueError, match="hidden_size: expected a multiple of 32"):
        TinySize(hidden_size=48, text_head_dim=32)
    with pytest.raises(ValueError, match="text_head_dim: expected a multiple of 16"):
        TinySize(text_head_dim=24)


# Qwen3-VL-8B-Instruct's released preprocessor_config.json, written out again so that a wrong constant in
# the module fails here: patch 16, merge 2 (a token per 32x32 pixels), 64 to 16,384 tokens an image.
RELEASED_8B = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
               "size": {"shortest_edge": 65536, "longest_edge": 16777216},
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def _image_tokens(processor, image: Image.Image) -> int:
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    return int((ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_the_8b_geometry_gives_the_8bs_image_token_counts(tokenizer, processor):
    processor_8b = build_tiny_processor(tokenizer, image_geometry="qwen3_vl_8b")
    # The realistic sizes and one below the 8B's 64-token floor.
    sizes = (*REALISTIC_IMAGE_SIZES, (100, 80))
    counts = {}
    for width, height in sizes:
        image, box = draw_sized_image(width, height, colour=(200, 40, 40), seed=width)
        assert image.size == (width, height)
        assert image.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)) == (200, 40, 40)  # the ellipse
        counts[(width, height)] = _image_tokens(processor_8b, image)
    assert counts == {size: smart_resize_tokens(*size) for size in sizes}
    assert counts[(448, 448)] == 196 and counts[(1600, 1200)] == 1900
    assert counts[(100, 80)] == 72  # scaled up to the floor
    assert counts[(3000, 3000)] == 8836 > 8192  # karl_kvg's rollout.max_model_len
    # Above the 16,384-token cap, by the count vLLM asks the image processor for (processing a 17-megapixel
    # image would take seconds): scaled down.
    patches = processor_8b.image_processor.get_number_of_image_patches(4100, 4200, {})
    assert patches // 4 == smart_resize_tokens(4200, 4100) == 16254 <= 16384
    # The default geometry is untouched: an image is at most 64x64 pixels, 4 tokens.
    assert _image_tokens(processor, draw_sized_image(1600, 1200)[0]) == smart_resize_tokens(
        1600, 1200, min_pixels=32 * 32, max_pixels=64 * 64) == 2


def test_a_saved_fixture_carries_the_8b_geometry(tmp_path, tokenizer):
    directory = save_tiny_checkpoint(tmp_path / "tiny-8b", image_geometry="qwen3_vl_8b")
    saved = json.loads((directory / "processor_config.json").read_text())["image_processor"]
    assert {key: saved[key] for key in RELEASED_8B} == RELEASED_8B
    assert json.loads((directory / TINY_MARKER_FILE).read_text())["image_geometry"] == "qwen3_vl_8b"
    assert QWEN3_VL_8B_IMAGE_GEOMETRY.factor == 32
    image = draw_sized_image(1024, 768)[0]
    assert _image_tokens(load_tiny_processor(directory), image) == 768
    plain = save_tiny_checkpoint(tmp_path / "tiny")  # the default is unchanged
    assert json.loads((plain / TINY_MARKER_FILE).read_text())["image_geometry"] == "tiny"
    assert _image_tokens(load_tiny_processor(plain), image) == 2
    # A fixture saved with the tiny geometry (the dry run's warmed-up model) takes the 8B's in place.
    assert _image_tokens(load_tiny_processor(set_image_geometry(plain, "qwen3_vl_8b")), image) == 768
    assert json.loads((plain / TINY_MARKER_FILE).read_text())["image_geometry"] == "qwen3_vl_8b"
    with pytest.raises(ValueError, match="image_geometry: expected one of"):
        build_tiny_processor(tokenizer, image_geometry="qwen3_vl_32b")
    with pytest.raises(FileNotFoundError, match="not a tiny fixture"):
        set_image_geometry(tmp_path, "qwen3_vl_8b")
