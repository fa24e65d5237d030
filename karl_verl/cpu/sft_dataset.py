"""verl's ``MultiTurnSFTDataset`` with images read by Pillow alone (``data.custom_cls``), for CPU SFT runs.

verl's SFT dataset turns each ``<image>`` placeholder of a row into an image part in
``_build_messages`` through ``verl.utils.dataset.vision_utils.process_image``, whose first line
imports ``qwen_vl_utils`` (and through it torchvision, which has no CPU build), whatever the image
is. :class:`PillowMultiTurnSFTDataset` replaces only that method: the same placeholder split as
verl's (``verl/utils/dataset/multiturn_sft_dataset.py:243-289``), each image fitted with the rule
of the RL dataset class (:func:`karl_verl.cpu.dataset.fit_image`: RGB, sides multiples of
``patch_size x 2``, pixel count within the dict's ``max_pixels``). Tokenization, masks and the chat
template stay verl's. Used by the recipe ``karl_cot_sft_cpu``. Videos are not supported (KVG has none).
"""

from __future__ import annotations

import re
from typing import Any

from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset
from verl.utils.py_functional import convert_nested_value_to_list_recursive

from karl_verl.cpu.dataset import fit_image

_PLACEHOLDERS = re.compile("(<image>|<video>)")


def _image_part(image: Any) -> dict[str, Any]:
    """A row's image (a dict with ``bytes`` or ``image`` and optional ``max_pixels``, or a path) as a part."""
    if isinstance(image, dict):
        return {key: value for key, value in image.items() if value is not None}
    return {"image": image}


class PillowMultiTurnSFTDataset(MultiTurnSFTDataset):
    """``MultiTurnSFTDataset`` whose images need no torchvision (see the module docstring)."""

    def _build_messages(self, example: dict) -> list:
        messages: list = convert_nested_value_to_list_recursive(example[self.messages_key])
        images = list(example[self.image_key]) if self.image_key in example else []
        if self.video_key in example and len(example[self.video_key]) > 0:
            raise ValueError("video rows are not supported by karl-verl's CPU SFT dataset class")
        used = 0
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                continue
            if self.image_key not in example:
                if self.processor is not None:
                    message["content"] = [{"type": "text", "text": content}]
                continue
            if self.processor is None:
                raise ValueError("rows with an images column need a processor (a vision-language model.path)")
            parts = []
            for segment in filter(None, _PLACEHOLDERS.split(content)):
                if segment == "<video>":
                    raise ValueError("<video> placeholders are not supported by karl-verl's CPU SFT dataset class")
                if segment == "<image>":
                    if used >= len(images):
                        raise ValueError(f"row has more <image> placeholders than its {len(images)} images")
                    parts.append({"type": "image",
                                  "image": fit_image(_image_part(images[used]), int(self.image_patch_size))})
                    used += 1
                else:
                    parts.append({"type": "text", "text": segment})
            message["content"] = parts
        if used != len(images):
            raise ValueError(f"row has {used} <image> placeholders but {len(images)} images")
        return messages
