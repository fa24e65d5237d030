"""Request helpers and output validation shared by every backend (pure, CPU)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from karl_verl.backends.base import (
    BackendError,
    GenerationRequest,
    OptionScorer,
    SamplingSettings,
    TextGenerator,
    check_generations,
    check_option_logprobs,
    fit_to_pixels,
    image_size,
    load_image,
    request_images,
    structured_messages,
)


def _png(color=(10, 20, 30), size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sampling_defaults_are_the_kvg_bench_evaluator_settings():
    assert SamplingSettings() == SamplingSettings(temperature=0.5, top_p=1.0, max_new_tokens=4096, seed=20, n=1)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0}, {"max_new_tokens": 0}])
def test_sampling_settings_reject_bad_values(kwargs):
    with pytest.raises(BackendError):
        SamplingSettings(**kwargs)


def test_load_image_accepts_every_stored_form(tmp_path):
    data = _png()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 255))
    for image in (data, bytearray(data), {"bytes": data}, {"bytes": None, "path": str(path)}, str(path), path, rgba):
        loaded = load_image(image)
        assert loaded.mode == "RGB" and loaded.size == (8, 6) and loaded.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize(("size", "budget"), [((3000, 3000), 1_003_520), ((4000, 30), 10_000), ((1, 5000), 100),
                                             ((640, 480), 640 * 480), ((7, 3), 1)])
def test_fit_to_pixels_keeps_the_aspect_within_the_budget(size, budget):
    width, height = fit_to_pixels(*size, budget)
    assert width * height <= budget and width >= 1 and height >= 1
    if size[0] * size[1] <= budget:
        assert (width, height) == size
    else:  # both sides scaled by one factor, floored to whole pixels: nothing beyond a row and a column wasted
        scale = (budget / (size[0] * size[1])) ** 0.5
        assert width <= max(1, math.ceil(size[0] * scale)) and height <= max(1, math.ceil(size[1] * scale))
        assert (width + 1) * (height + 1) > budget
    assert fit_to_pixels(*size, None) == size


def test_load_image_resizes_to_max_pixels_and_request_images_applies_the_requests_budget():
    data = _png(size=(300, 200))
    assert load_image(data).size == (300, 200)
    assert load_image(data, max_pixels=6_000).size == fit_to_pixels(300, 200, 6_000) == (94, 63)
    assert load_image(data, max_pixels=10**6).size == (300, 200)
    request = GenerationRequest(messages=[{"role": "user", "content": "<image> x"}], images=[data], max_pixels=6_000)
    assert [image.size for image in request_images(request)] == [(94, 63)]


@pytest.mark.parametrize("bad", [b"not an image", {"other": 1}, 42])
def test_load_image_errors_name_the_place(bad):
    with pytest.raises(BackendError, match="request 3, image 0"):
        load_image(bad, where="request 3, image 0")


def test_image_size_reads_every_stored_form_without_decoding(tmp_path, monkeypatch):
    data = _png(size=(9, 5))
    path = tmp_path / "x.png"
    path.write_bytes(data)

    class Lazy:  # a ParquetImage: read when asked
        where = "probe.parquet: row 4"

        def read(self):
            return data

    forms = (data, bytearray(data), {"bytes": data}, {"bytes": None, "path": str(path)}, str(path), path, Lazy(),
             Image.new("RGBA", (9, 5)))
    # Only the header is read: decoding the pixels would fail here.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("image decoded"))
    assert [image_size(image) for image in forms] == [(9, 5)] * len(forms)
    with pytest.raises(BackendError, match=r"request 3, image 0: cannot read image"):
        image_size(b"not an image", where="request 3, image 0")


def test_structured_messages_splits_placeholders_like_verl():
    request = GenerationRequest(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Left <image> right?"}],
        [_png(), _png()],
    )
    messages = structured_messages(request)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert messages[1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Left "},
        {"type": "image"},
        {"type": "text", "text": " right?"},
    ]
    assert request.messages[1]["content"] == "<image>Left <image> right?"  # input untouched
    assert len(request_images(request)) == 2


def test_structured_messages_placeholder_count_must_match_images():
    with pytest.raises(BackendError, match="request 7: 1 <image> placeholder.*but 0 image"):
        structured_messages(GenerationRequest([{"role": "user", "content": "<image>?"}], []), where="request 7")
    with pytest.raises(BackendError, match="'role' and 'content'"):
        structured_messages(GenerationRequest([{"text": "hi"}], []))


def test_check_generations():
    assert check_generations([["a", "b"], ["c", "d"]], 2, 2) == [["a", "b"], ["c", "d"]]
    for bad in ([["a", "b"]], [["a"], ["c", "d"]], ["ab", "cd"], [["a", 1], ["c", "d"]], None):
        with pytest.raises(BackendError, match="generate"):
            check_generations(bad, 2, 2)


def test_check_option_logprobs():
    good = np.log(np.full((2, 4), 0.25))
    assert check_option_logprobs(good.tolist(), 2, 4).shape == (2, 4)
    assert check_option_logprobs(np.full((1, 4), -np.inf), 1, 4).shape == (1, 4)
    for bad in (good[:1], good[:, :3], np.full((2, 4), np.nan), np.full((2, 4), 0.5), "x"):
        with pytest.raises(BackendError, match="option_logprobs"):
            check_option_logprobs(bad, 2, 4)


def test_protocols_are_structural():
    class Both:
        def generate(self, requests, sampling):
            return [[""] * sampling.n for _ in requests]

        def option_logprobs(self, requests, options):
            return np.zeros((len(requests), len(options)))

    assert isinstance(Both(), TextGenerator) and isinstance(Both(), OptionScorer)
    assert not isinstance(object(), TextGenerator)
