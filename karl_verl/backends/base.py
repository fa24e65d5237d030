"""What every generation backend takes and returns: requests, sampling settings, two protocols.

Pure module (numpy, and Pillow when images are decoded; no torch, no verl, no Ray): it runs
wherever a backend runs, CPU or GPU. Backends implementing the protocols:

* :class:`karl_verl.backends.hf.HFBackend`: transformers, CPU or one GPU;
* :class:`karl_verl.backends.vllm_backend.VLLMBackend`: vLLM's offline engine, GPU only;
* the trainer's backend on verl's rollout servers (``karl_verl.integration``).

Requests carry messages in verl's ``RLHFDataset`` style: a user turn whose content is a string
with one ``<image>`` placeholder per image, and the images beside it (PIL images, encoded bytes,
``{"bytes": ...}`` dicts as stored in parquet, or paths).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: The image placeholder of verl's RLHFDataset prompts.
IMAGE_PLACEHOLDER = "<image>"


class BackendError(ValueError):
    """A request or a backend's output is malformed; the message names the request and field."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: chat ``messages`` (``{"role", "content"}``; ``<image>`` placeholders) and its ``images``."""

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    #: Each image is resized to at most this many pixels when decoded (:func:`fit_to_pixels`), before the
    #: processor sees it; None: as stored (the processor's own cap still applies).
    max_pixels: int | None = None


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling of :meth:`TextGenerator.generate`; defaults are KVG-Bench's released evaluator settings.

    ``temperature == 0`` means greedy decoding. ``n`` texts are returned per request.
    """

    temperature: float = 0.5
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 20
    n: int = 1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BackendError(f"SamplingSettings.temperature: expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BackendError(f"SamplingSettings.top_p: expected in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise BackendError(
                f"SamplingSettings: max_new_tokens and n must be >= 1, got {self.max_new_tokens} and {self.n}"
            )


@runtime_checkable
class TextGenerator(Protocol):
    """Generates text for chat requests."""

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSettings) -> list[list[str]]:
        """Return, for each request in order, a list of ``sampling.n`` generated texts (prompt excluded)."""
        ...


@runtime_checkable
class OptionScorer(Protocol):
    """Scores single-token options at the answer position without decoding."""

    def option_logprobs(self, requests: Sequence[GenerationRequest], options: Sequence[str]) -> np.ndarray:
        """Return a float array ``[len(requests), len(options)]``: the log-probability of each option's
        single token as the first token of the assistant's reply (right after the generation prompt)."""
        ...


def _image_source(image: Any, where: str) -> tuple[Any, str]:
    """(a PIL image, or what ``Image.open`` reads: a BytesIO or a path; the ``where`` to name) of any image form."""
    from PIL import Image

    read = getattr(image, "read", None)
    if callable(read) and not isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        # A lazily read image (karl_verl.probe.questions.ParquetImage): its own errors name the file and row.
        where = getattr(image, "where", where)
        try:
            return _image_source(read(), where)
        except ValueError as err:
            raise BackendError(str(err)) from None
    if isinstance(image, Image.Image):
        return image, where
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return _image_source(image["bytes"], where)
        if image.get("path"):
            return _image_source(image["path"], where)
        raise BackendError(f"{where}: a dict image needs a 'bytes' or 'path' entry, got keys {sorted(image)}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(image)), where
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image), where
    raise BackendError(
        f"{where}: expected a PIL image, bytes, a {{'bytes': ...}} dict or a path, got {type(image).__name__}"
    )


def fit_to_pixels(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most ``max_pixels`` pixels; unchanged when it fits
    or ``max_pixels`` is None. Each side stays >= 1.

    The one resize rule for a pixel budget: :func:`load_image` applies it to the decoded image and
    prompt-length counts apply it to the image's header size, so both agree on the tokens an image costs.
    The processor then rounds the result to its patch grid as it does for any image.
    """
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    if max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive integer, got {max_pixels}")
    scale = (max_pixels / (width * height)) ** 0.5
    new_width, new_height = max(1, int(width * scale)), max(1, int(height * scale))
    # int() floors, so the area is within the budget; a 1-pixel side may still push a sliver over it.
    while new_width * new_height > max_pixels and max(new_width, new_height) > 1:
        if new_width >= new_height:
            new_width -= 1
        else:
            new_height -= 1
    return new_width, new_height


def load_image(image: Any, *, where: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode one image (PIL image, encoded bytes, ``{"bytes": ...}`` / ``{"path": ...}`` dict, or path) to RGB,
    resized to at most ``max_pixels`` pixels (:func:`fit_to_pixels`) when given."""
    from PIL import Image, UnidentifiedImageError

    source, where = _image_source(image, where)
    try:
        if isinstance(source, Image.Image):
            decoded = source if source.mode == "RGB" else source.convert("RGB")
        else:
            with Image.open(source) as opened:
                decoded = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise BackendError(f"{where}: cannot decode image ({err})") from None
    size = fit_to_pixels(decoded.width, decoded.height, max_pixels)
    return decoded if size == decoded.size else decoded.resize(size, Image.Resampling.BICUBIC)


def image_size(image: Any, *, where: str = "image") -> tuple[int, int]:
    """(width, height) of one image in any form :func:`load_image` takes, read from its header (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError

    source, where = _image_source(image, where)
    if isinstance(source, Image.Image):
        return source.size
    try:
        with Image.open(source) as opened:
            return opened.size
    except (OSError, UnidentifiedImageError) as err:
        raise BackendError(f"{where}: cannot read image ({err})") from None


def structured_messages(request: GenerationRequest, *, where: str = "request") -> list[dict[str, Any]]:
    """Turn ``<image>`` placeholders into ``{"type": "image"}`` content parts, as verl's RLHFDataset does.

    The result is what ``processor.apply_chat_template`` expects; the images themselves travel
    separately (:func:`request_images`). Raises :class:`BackendError` when the placeholder count
    differs from the number of images.
    """
    out: list[dict[str, Any]] = []
    placeholders = 0
    for index, message in enumerate(request.messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BackendError(f"{where}: message {index} must be a dict with 'role' and 'content', got {message!r}")
        content = message["content"]
        if not isinstance(content, str):  # already structured: count its image parts
            placeholders += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
            out.append(dict(message))
            continue
        parts: list[dict[str, Any]] = []
        for segment in re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", content):
            if segment == IMAGE_PLACEHOLDER:
                parts.append({"type": "image"})
                placeholders += 1
            elif segment:
                parts.append({"type": "text", "text": segment})
        out.append({**message, "content": parts})
    if placeholders != len(request.images):
        raise BackendError(
            f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(request.images)} image(s)"
        )
    return out


def request_images(request: GenerationRequest, *, where: str = "request") -> list[Image.Image]:
    """The request's images decoded to RGB PIL images, in placeholder order, within its ``max_pixels``."""
    return [load_image(image, where=f"{where}, image {i}", max_pixels=request.max_pixels)
            for i, image in enumerate(request.images)]


def check_generations(outputs: Any, num_requests: int, n: int, *, backend: str = "backend") -> list[list[str]]:
    """Validate a ``generate`` result: ``num_requests`` lists of ``n`` strings, else :class:`BackendError`."""
    if not isinstance(outputs, (list, tuple)) or len(outputs) != num_requests:
        got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise BackendError(f"{backend}.generate: expected {num_requests} answer lists, got {got}")
    checked: list[list[str]] = []
    for i, texts in enumerate(outputs):
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or len(texts) != n:
            raise BackendError(f"{backend}.generate: request {i}: expected a list of {n} strings, got {texts!r:.200}")
        if not all(isinstance(text, str) for text in texts):
            raise BackendError(f"{backend}.generate: request {i}: expected strings, got {texts!r:.200}")
        checked.append(list(texts))
    return checked


def check_option_logprobs(values: Any, num_requests: int, num_options: int, *, backend: str = "backend") -> np.ndarray:
    """Validate an ``option_logprobs`` result: a finite-or-``-inf`` float array of the right shape."""
    import numpy as np

    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BackendError(f"{backend}.option_logprobs: not a numeric array ({err})") from None
    if array.shape != (num_requests, num_options):
        raise BackendError(
            f"{backend}.option_logprobs: expected shape ({num_requests}, {num_options}), got {array.shape}"
        )
    if np.isnan(array).any() or (array > 1e-6).any() or np.isposinf(array).any():
        raise BackendError(f"{backend}.option_logprobs: values must be log-probabilities (<= 0, no NaN)")
    return array
