"""Prompt and ground-truth templates of knowledge-intensive visual grounding (KVG).

The single place where the query wording, the answer-format suffix and the ground-truth string
live; :mod:`karl_verl.data.convert`, :mod:`karl_verl.data.compose` and the evaluator all build
their text here (examples: docs/DATA_FORMATS.md, "RL parquet").

The released inference code joins question and suffix with two spaces
(``"{Question}  Output the thinking process ..."``); :func:`grounding_prompt` does the same so that
training prompts and evaluation prompts are the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
IMAGE_PLACEHOLDER = "<image>"

#: Verbatim answer-format suffix used at training and evaluation time (the released prompts).
ANSWER_FORMAT_SUFFIX = (
    "Output the thinking process in <think> </think> and final answer (bounding box) in <answer> </answer> tags."
)
#: Qwen3-VL's own grounding request (the released evaluator's ``qwen3-vl`` prompt).
JSON_FORMAT_SUFFIX = ", output its bbox coordinates using JSON format."
#: Between the query and :data:`ANSWER_FORMAT_SUFFIX`, as in the released ``GROUNDING_TEMPLATE``.
SUFFIX_SEPARATOR = "  "

QUERY_TEMPLATE = "Find and give the bounding box of {entity}"

#: Prompt styles: ``karl`` (query + answer-format suffix, the paper's), ``json`` (Qwen3-VL's JSON
#: request), ``plain`` (the query alone).
PROMPT_STYLES: tuple[str, ...] = ("karl", "json", "plain")

#: verl's ``ability`` column for grounding rows.
ABILITY = "visual_grounding"


def mark_entity(entity: str) -> str:
    """``<|object_ref_start|>ENTITY<|object_ref_end|>``."""
    return f"{OBJECT_REF_START}{entity}{OBJECT_REF_END}"


def grounding_query(entity: str) -> str:
    """The KVG query for ``entity``, with entity markers and no image placeholder.

    >>> grounding_query("Sukhoi Su-30")
    'Find and give the bounding box of <|object_ref_start|>Sukhoi Su-30<|object_ref_end|>'
    """
    return QUERY_TEMPLATE.format(entity=mark_entity(entity))


def grounding_prompt(query: str, num_images: int = 1, style: str = "karl") -> str:
    """User-turn text: ``num_images`` ``<image>`` placeholders, the query, then the style's suffix.

    Placeholders already in ``query`` count towards ``num_images`` (the benchmark's questions may
    carry one); missing ones are prepended, as the released inference code does.

    >>> grounding_prompt("Find and give the bounding box of X")  # doctest: +NORMALIZE_WHITESPACE
    '<image>Find and give the bounding box of X  Output the thinking process in <think> </think>
    and final answer (bounding box) in <answer> </answer> tags.'
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style: expected one of {PROMPT_STYLES}, got {style!r}")
    present = query.count(IMAGE_PLACEHOLDER)
    if present > num_images:
        raise ValueError(f"query holds {present} {IMAGE_PLACEHOLDER} placeholders for {num_images} image(s)")
    text = IMAGE_PLACEHOLDER * (num_images - present) + query
    if style == "karl":
        return text + SUFFIX_SEPARATOR + ANSWER_FORMAT_SUFFIX
    if style == "json":
        return text + JSON_FORMAT_SUFFIX
    return text


def chat_messages(prompt_text: str) -> list[dict[str, str]]:
    """One user turn in verl's ``RLHFDataset`` style (``<image>`` placeholders inside the text)."""
    return [{"role": "user", "content": prompt_text}]


def format_box(box: Sequence[int]) -> str:
    """``(x1,y1),(x2,y2)``: the released form, no spaces (integers on the 0-1000 grid).

    >>> format_box((12, 40, 300, 520))
    '(12,40),(300,520)'
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"({x1},{y1}),({x2},{y2})"


def ground_truth(entity: str, box: Sequence[int]) -> str:
    """``<|object_ref_start|>ENTITY<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``.

    >>> ground_truth("Su-30", (1, 2, 3, 4))
    '<|object_ref_start|>Su-30<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>'
    """
    return f"{mark_entity(entity)}{BOX_START}{format_box(box)}{BOX_END}"


def data_source(category: str) -> str:
    """verl's ``data_source`` for a KVG row: ``kvg/<category>``."""
    return f"kvg/{category}"
