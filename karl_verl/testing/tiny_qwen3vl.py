"""A tiny, randomly initialised Qwen3-VL (model, tokenizer, processor) built in code: for tests and dry runs ONLY.

Runs on CPU, needs no download and no torchvision. Everything is built from scratch in well under a
second (~0.25M parameters with its 400-token vocabulary), so tests and the CPU dry run can exercise the real
``Qwen3VLForConditionalGeneration`` code path (vision tower, M-RoPE, chat template, left padding)
without a checkpoint. The model's outputs are meaningless.

The one workaround in here (a processor subclass that skips transformers' class check of the video
processor, :class:`TinyQwen3VLProcessor`) exists because no CPU build of torchvision is available
on this project's CPU machines; it must never be on the code path of a real (GPU) run, where
torchvision comes with vLLM and ``AutoProcessor.from_pretrained`` works as is.

Loading a saved fixture back (see :func:`save_tiny_checkpoint`)::

    model = Qwen3VLForConditionalGeneration.from_pretrained(directory)  # works as is
    processor = load_tiny_processor(directory)  # NOT AutoProcessor, see below

Without torchvision, ``AutoProcessor.from_pretrained(directory)`` silently returns the bare
tokenizer (it cannot build the video processor), and so verl's ``hf_processor`` gives None: code
that loads processors itself sees a text-only model unless it uses :func:`load_tiny_processor`.

:func:`is_tiny_checkpoint` tells such a directory apart from a real checkpoint.

Image geometry: by default (:data:`TINY_IMAGE_GEOMETRY`) every image is shrunk to at most 64x64
pixels (4 image tokens), so that prompts stay short. With ``image_geometry="qwen3_vl_8b"``
(:data:`QWEN3_VL_8B_IMAGE_GEOMETRY`) the processor takes Qwen3-VL-8B's released settings instead, and
an image becomes as many tokens as the 8B would make of it (a 1600x1200 photo: 1,900); the model
itself stays tiny (its vision tower takes any grid).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The processor subclass below needs its base class at import time (a module-level class pickles,
# e.g. into Ray workers); torch and the model classes are imported only by the builders.
from transformers import Qwen3VLProcessor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen3VLForConditionalGeneration

#: Qwen's special tokens, in Qwen's order; their ids follow the trained byte-level vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Text the BPE merges are learnt from: the shapes of text the project's tests produce.
_TRAINING_SENTENCES: tuple[str, ...] = (
    "What is the aircraft in the image? A. Sukhoi Su-30 B. Boeing 747 C. Airbus A320 D. Cessna 172",
    "Answer with the letter only. A B C D (A) (B) (C) (D) A. B. C. D. Answer: B The answer is C.",
    "<think>The wings are swept and the tail is twin.</think> <answer>(120,340),(560,780)</answer>",
    "Find and give the bounding box of the car. Output the thinking process in <think> </think> and "
    "final answer (bounding box) in <answer> </answer> tags.",
    "0 1 2 3 4 5 6 7 8 9 10 25 100 250 500 999 1000 (0,0),(1000,1000) [12, 34, 56, 78]",
    "bird food reptilia car aircraft dog flower mammal landmark mollusca, red green blue, a b c d",
)

#: Marker file that save_tiny_checkpoint writes, so loaders can tell the fixture from a real model.
TINY_MARKER_FILE = "karl_tiny_fixture.json"

#: Qwen-style chat template: ``<|im_start|>role\\n...<|im_end|>\\n``; an image part becomes
#: ``<|vision_start|><|image_pad|><|vision_end|>`` (the processor expands the pad to the patch count).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class ImageGeometry:
    """How the image processor cuts an image into tokens: ``patch_size`` pixel patches, ``merge_size`` x
    ``merge_size`` of them merged into one token, so one token per ``factor`` x ``factor`` pixels; an image
    is resized (aspect kept) to sides that are multiples of ``factor`` and an area within
    [``min_pixels``, ``max_pixels``] (Qwen's ``smart_resize``).

    ``image_mean`` / ``image_std``: the normalisation (None: the image processor class's default);
    ``video_pixels``: (min, max) pixels of a video frame (None: transformers' Qwen3-VL video defaults).
    Neither changes a token count.
    """

    name: str
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    video_pixels: tuple[int, int] | None = None

    @property
    def factor(self) -> int:
        """Side in pixels of the square one merged image token covers."""
        return self.patch_size * self.merge_size


#: The fixture's own geometry (every test's default): 16-pixel patches merged 2x2 (one token per 32x32
#: pixels), images shrunk into 32x32..64x64 pixels, so an image is 1 to 4 tokens and prompts stay short.
TINY_IMAGE_GEOMETRY = ImageGeometry(
    name="tiny", patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=64 * 64,
    video_pixels=(32 * 32, 2 * 64 * 64),
)

#: Qwen3-VL-8B-Instruct's released image processor (its preprocessor_config.json: ``"size":
#: {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
#: "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]``): one token per
#: 32x32 pixels, at least 64 and at most 16,384 tokens an image. transformers (5.10) ships no Qwen3-VL
#: image processor defaults (the checkpoint's file sets them on its Qwen2VLImageProcessor, whose own
#: class defaults are Qwen2-VL's patch 14 and 56*56..28*28*1280 pixels); its Qwen3-VL *video*
#: processor (``video_processing_qwen3_vl.py``) has the same patch 16, merge 2, temporal patch 2 and
#: 0.5 mean/std. qwen_vl_utils (0.0.14, ``vision_process.py``), which verl resizes images with before
#: the processor, caps an image at ``IMAGE_MAX_TOKEN_NUM`` = 16384 tokens of (patch 16 x merge 2)^2
#: pixels = the same 16,777,216 pixels; its floor is 4 tokens (``IMAGE_MIN_TOKEN_NUM``), below the
#: processor's 64, so the processor's floor decides.
QWEN3_VL_8B_IMAGE_GEOMETRY = ImageGeometry(
    name="qwen3_vl_8b", patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65536, max_pixels=16777216,
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
)

#: The geometries the builders take by name.
IMAGE_GEOMETRIES: dict[str, ImageGeometry] = {g.name: g for g in (TINY_IMAGE_GEOMETRY, QWEN3_VL_8B_IMAGE_GEOMETRY)}


def resolve_image_geometry(image_geometry: str | ImageGeometry) -> ImageGeometry:
    """An :class:`ImageGeometry`, or the one of :data:`IMAGE_GEOMETRIES` named ``image_geometry``."""
    if isinstance(image_geometry, ImageGeometry):
        return image_geometry
    try:
        return IMAGE_GEOMETRIES[image_geometry]
    except KeyError:
        raise ValueError(f"image_geometry: expected one of {sorted(IMAGE_GEOMETRIES)} or an ImageGeometry, "
                         f"got {image_geometry!r}") from None


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained in code, with Qwen's special tokens and a chat template (CPU).

    Every byte is in the vocabulary, so any text encodes; the letters ``A``-``D`` are single tokens.
    ``eos`` is ``<|im_end|>`` and ``pad`` is ``<|endoftext|>``, as in Qwen's instruct models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_SENTENCES, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )
    return tokenizer


class TinyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` that skips transformers' class check for ``video_processor`` only (fixture workaround).

    Why: without torchvision (no CPU wheel of it works here: the registry's wheels are CUDA builds
    and break ``import transformers``), transformers resolves its expected ``BaseVideoProcessor``
    class to a placeholder, so the check rejects a perfectly usable ``Qwen3VLVideoProcessor``.
    Images never touch the video processor. Real runs have torchvision and use the stock class.
    """

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def _image_processor_class() -> type:
    # Qwen2VLImageProcessor resolves to its PIL version without torchvision, with a warning; import
    # whichever exists without going through that fallback.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # older transformers: the slow processor is the plain class
        from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil


def _vision_processors(geometry: ImageGeometry) -> tuple[Any, Any]:
    """(image processor, video processor) cutting images and frames as ``geometry`` says."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    cut = {"patch_size": geometry.patch_size, "merge_size": geometry.merge_size,
           "temporal_patch_size": geometry.temporal_patch_size}
    normalise = {key: list(value) for key, value in (("image_mean", geometry.image_mean),
                                                      ("image_std", geometry.image_std)) if value is not None}
    image_processor = _image_processor_class()(**cut, **normalise, min_pixels=geometry.min_pixels,
                                               max_pixels=geometry.max_pixels)
    video_size = ({} if geometry.video_pixels is None
                  else {"size": {"shortest_edge": geometry.video_pixels[0], "longest_edge": geometry.video_pixels[1]}})
    return image_processor, Qwen3VLVideoProcessor(**cut, **normalise, **video_size)


def build_tiny_processor(
    tokenizer: PreTrainedTokenizerBase | None = None, *, image_geometry: str | ImageGeometry = "tiny"
) -> Qwen3VLProcessor:
    """Image processor + video processor + tokenizer in a :class:`TinyQwen3VLProcessor` (CPU; see that
    class for why a subclass).

    ``image_geometry``: ``"tiny"`` (default, :data:`TINY_IMAGE_GEOMETRY`: patch 16, merge 2, temporal
    patch 2, 32x32..64x64 pixels), ``"qwen3_vl_8b"`` (:data:`QWEN3_VL_8B_IMAGE_GEOMETRY`: the 8B's
    released settings, so prompts have the 8B's token counts) or any :class:`ImageGeometry`.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_processor, video_processor = _vision_processors(resolve_image_geometry(image_geometry))
    return TinyQwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class TinySize:
    """Widths and depths of the tiny model; the defaults are the ~0.25M-parameter fixture of the tests.

    Vision attention heads are 16 wide and text heads ``text_head_dim`` wide: ``vision_hidden_size``
    must be a multiple of 16 and ``hidden_size`` of ``text_head_dim``. vLLM's CPU attention takes
    text heads of 32 and more, not 16 (:data:`VLLM_CPU_SIZE`).
    """

    hidden_size: int = 64
    num_layers: int = 2
    vision_hidden_size: int = 32
    vision_depth: int = 1
    text_head_dim: int = 16

    def __post_init__(self) -> None:
        if self.text_head_dim < 16 or self.text_head_dim % 16:
            raise ValueError(f"TinySize.text_head_dim: expected a multiple of 16; got {self.text_head_dim}")
        for name, width in (("hidden_size", self.text_head_dim), ("vision_hidden_size", 16)):
            if getattr(self, name) < 2 * width or getattr(self, name) % width:
                raise ValueError(f"TinySize.{name}: expected a multiple of {width}, >= {2 * width}; "
                                 f"got {getattr(self, name)}")
        for name in ("num_layers", "vision_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinySize.{name}: expected >= 1, got {getattr(self, name)}")


#: The fixture verl's vLLM rollout can serve on CPU: text heads of 32 (vLLM's CPU attention refuses
#: 16), 4 heads in a 128-wide model; the vision tower as in the default fixture.
VLLM_CPU_SIZE = TinySize(hidden_size=128, text_head_dim=32)


def _mrope_section(head_dim: int) -> list[int]:
    """Rotary frequencies (head_dim / 2) split over (time, height, width) as Qwen does: time gets the rest."""
    frequencies = head_dim // 2
    spatial = (frequencies * 3 // 8) or 1
    return [frequencies - 2 * spatial, spatial, spatial]


def build_tiny_model(
    seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None, *, size: TinySize | None = None
) -> Qwen3VLForConditionalGeneration:
    """A randomly initialised ``Qwen3VLForConditionalGeneration`` (~0.25M parameters, float32, eval mode, CPU).

    Sizes are tiny, for CPU tests (``size``, default :class:`TinySize`); special token ids and the
    vocabulary size come from ``tokenizer`` (default: :func:`build_tiny_tokenizer`). The same seed
    gives the same weights.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    size = size if size is not None else TinySize()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    )}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": size.hidden_size,
            "intermediate_size": 2 * size.hidden_size,
            "num_hidden_layers": size.num_layers,
            "num_attention_heads": size.hidden_size // size.text_head_dim,
            "num_key_value_heads": max(1, size.hidden_size // (2 * size.text_head_dim)),
            "head_dim": size.text_head_dim,
            "max_position_embeddings": 4096,
            # head_dim 16 -> 8 rotary frequencies, split 2/3/3 over (time, height, width), interleaved.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": _mrope_section(size.text_head_dim),
                "mrope_interleaved": True,
            },
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden_size,
            "intermediate_size": 2 * size.vision_hidden_size,
            "num_heads": size.vision_hidden_size // 16,
            "out_hidden_size": size.hidden_size,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        **ids,
    )
    # Seed a private generator state: the caller's global RNG state is restored afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_checkpoint(directory: str | os.PathLike[str], *, seed: int = 0, size: TinySize | None = None,
                         image_geometry: str | ImageGeometry = "tiny") -> Path:
    """Write a tiny model + tokenizer + processor to ``directory`` (created if needed); return its path.

    Load back with ``Qwen3VLForConditionalGeneration.from_pretrained(directory)`` and
    :func:`load_tiny_processor` (``AutoProcessor`` fails here without torchvision). A marker file
    (``karl_tiny_fixture.json``) records that the directory is this fixture, and its image geometry.
    ``image_geometry`` (see :func:`build_tiny_processor`) is saved with the processor (transformers 5
    writes the image processor's settings into ``processor_config.json``, key ``image_processor``; older
    versions into ``preprocessor_config.json``), so every loader of the directory (verl's processor,
    the rollout server, the pre-flight) cuts images with it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    geometry = resolve_image_geometry(image_geometry)
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer, image_geometry=geometry)
    model = build_tiny_model(seed=seed, tokenizer=tokenizer, size=size)
    model.save_pretrained(directory)
    _save_processor(processor, directory)
    _write_marker(directory, {"fixture": "karl_verl.testing.tiny_qwen3vl", "seed": seed,
                              "image_geometry": geometry.name})
    return directory


def _save_processor(processor: Qwen3VLProcessor, directory: Path) -> None:
    processor.save_pretrained(directory)
    # Record the stock class, so that where torchvision exists AutoProcessor loads the directory as is.
    config_path = directory / "processor_config.json"
    if config_path.is_file():
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        saved["processor_class"] = "Qwen3VLProcessor"
        config_path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")


def _write_marker(directory: Path, fields: dict[str, Any]) -> None:
    (directory / TINY_MARKER_FILE).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")


def set_image_geometry(directory: str | os.PathLike[str], image_geometry: str | ImageGeometry) -> Path:
    """Give a :func:`save_tiny_checkpoint` directory another image geometry, weights untouched; return its path.

    Rewrites the saved processor and the marker's record, so that a trained fixture (the dry run's
    warmed-up model) builds prompts of the 8B's length with ``"qwen3_vl_8b"`` without being trained
    again. Work on a copy to keep the original.
    """
    directory = Path(directory)
    if not is_tiny_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: not a tiny fixture checkpoint (no {TINY_MARKER_FILE})")
    geometry = resolve_image_geometry(image_geometry)
    _save_processor(build_tiny_processor(load_tiny_processor(directory).tokenizer, image_geometry=geometry), directory)
    marker = json.loads((directory / TINY_MARKER_FILE).read_text(encoding="utf-8"))
    _write_marker(directory, {**marker, "image_geometry": geometry.name})
    return directory


def is_tiny_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` was written by :func:`save_tiny_checkpoint`."""
    return (Path(directory) / TINY_MARKER_FILE).is_file()


def load_tiny_processor(directory: str | os.PathLike[str]) -> Qwen3VLProcessor:
    """Load the processor of a :func:`save_tiny_checkpoint` directory (CPU, no torchvision needed)."""
    directory = Path(directory)
    if not is_tiny_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: not a tiny fixture checkpoint (no {TINY_MARKER_FILE})")
    return load_qwen3vl_processor_without_torchvision(directory, chat_template=CHAT_TEMPLATE)


def load_qwen3vl_processor_without_torchvision(
    directory: str | os.PathLike[str], *, chat_template: str | None = None
) -> Qwen3VLProcessor:
    """A Qwen3-VL checkpoint's processor on a machine without torchvision (dry run and pre-flight ONLY).

    Builds the parts one by one (PIL image processor, tokenizer, video processor) into a
    :class:`TinyQwen3VLProcessor`, where ``AutoProcessor`` would return the bare tokenizer. The chat
    template is ``chat_template``, else the directory's ``chat_template.jinja`` / ``chat_template.json``,
    else the tokenizer's. Token counts match the stock processor's: the image processor's grid
    decides how many ``<|image_pad|>`` tokens an image becomes.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    if chat_template is None:
        jinja, packed = directory / "chat_template.jinja", directory / "chat_template.json"
        if jinja.is_file():
            chat_template = jinja.read_text(encoding="utf-8")
        elif packed.is_file():
            chat_template = json.loads(packed.read_text(encoding="utf-8")).get("chat_template")
        else:
            chat_template = getattr(tokenizer, "chat_template", None)
    return TinyQwen3VLProcessor(
        image_processor=_image_processor_class().from_pretrained(directory),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor.from_pretrained(directory),
        chat_template=chat_template,
    )
