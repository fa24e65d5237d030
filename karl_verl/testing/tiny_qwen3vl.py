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

# Image sizes are kept tiny: 16-pixel patches merged 2x2 means one merged token per 32x32 pixels.
_MIN_PIXELS = 32 * 32
_MAX_PIXELS = 64 * 64


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


def build_tiny_processor(tokenizer: PreTrainedTokenizerBase | None = None) -> Qwen3VLProcessor:
    """Image processor (patch 16, merge 2, temporal patch 2, 32x32..64x64 pixels) + video processor +
    tokenizer in a :class:`TinyQwen3VLProcessor` (CPU; see that class for why a subclass)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    geometry = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
    image_processor = _image_processor_class()(**geometry, min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS)
    video_processor = Qwen3VLVideoProcessor(
        **geometry, size={"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS * 2}
    )
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


def save_tiny_checkpoint(directory: str | os.PathLike[str], *, seed: int = 0, size: TinySize | None = None) -> Path:
    """Write a tiny model + tokenizer + processor to ``directory`` (created if needed); return its path.

    Load back with ``Qwen3VLForConditionalGeneration.from_pretrained(directory)`` and
    :func:`load_tiny_processor` (``AutoProcessor`` fails here without torchvision). A marker file
    (``karl_tiny_fixture.json``) records that the directory is this fixture.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    model = build_tiny_model(seed=seed, tokenizer=tokenizer, size=size)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    # Record the stock class, so that where torchvision exists AutoProcessor loads the directory as is.
    config_path = directory / "processor_config.json"
    if config_path.is_file():
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        saved["processor_class"] = "Qwen3VLProcessor"
        config_path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    (directory / TINY_MARKER_FILE).write_text(
        json.dumps({"fixture": "karl_verl.testing.tiny_qwen3vl", "seed": seed}, indent=2) + "\n", encoding="utf-8"
    )
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
