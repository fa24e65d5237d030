"""The KARL reward: knowledge-aware IoU (KA-IoU) plus format reward. The formula lives here.

Paper: KARL, arXiv 2503.12797, Sec. 3.2 and 5.1; behaviour of the released reward in
docs/METHOD.md section 3. Pure module: no Ray, no verl.

    R = R_KA-IoU + R_format

    R_KA-IoU = min(s+[k] * IoU, cap)   if IoU > tau   (>= with inclusive_threshold)
             = s-[k]                   otherwise, a zero-area union included
             = 0                       if the response has no <answer>...</answer> span,
                                       or the ground truth has no entity marker
    R_format = format_tags_weight   if the response starts with <think>..</think> <answer>..</answer>
             + format_box_weight    if the first <answer> span holds (x1,y1),(x2,y2)

k is the entity's mastery level 1..5. With :class:`~karl_verl.config.RewardConfig` defaults
(preset ``karl``) the score equals the released reward's for every response and ground truth,
and lies in [-0.6, 2.0].

:func:`compute_score` follows verl's custom score contract; :class:`KarlReward` is the picklable
callable that the reward manager holds (Ray pickles it into each reward worker).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

from karl_verl.boxes import (
    ZERO_BOX,
    Box,
    answer_span,
    box_iou,
    entity_of,
    has_reference_pair_box,
    read_box,
    read_box_reference,
)
from karl_verl.config import RewardConfig
from karl_verl.mastery import MasteryError, MasteryTable, parse_level

# The released format check, anchored at the response's first character (re.match); trailing
# text after </answer> is allowed. Evaluated by has_tag_structure, which gives the same answer.
FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

#: The breakdown key that says whether the KA-IoU term took its success branch (dynamic sampling reads it).
SUCCESS_FIELD = "success"

#: Level source values reported in ``level_source``.
LEVEL_FROM_EXTRA_INFO, LEVEL_FROM_TABLE, LEVEL_DEFAULT = "extra_info", "table", "default"


def has_tag_structure(response: str) -> bool:
    """Whether ``FORMAT_PATTERN.match(response)`` succeeds, decided in linear time.

    The regex backtracks over every ``</think>`` and rescans to the end for ``</answer>`` from
    each; it matches exactly when the text starts with ``<think>`` and some ``</think>`` (not
    overlapping the opening tag) is followed, after optional whitespace, by ``<answer>`` with a
    ``</answer>`` somewhere after it.
    """
    if not response.startswith("<think>"):
        return False
    last_close = response.rfind("</answer>")
    if last_close < 0:
        return False
    position = response.find("</think>", 7)
    while 0 <= position < last_close:
        after = position + 8
        while after < len(response) and response[after].isspace():
            after += 1
        if response.startswith("<answer>", after) and after + 8 <= last_close:
            return True
        position = response.find("</think>", position + 1)
    return False


def format_reward(response: str, config: RewardConfig) -> float:
    """Tag-structure and box-form reward of the released code (0, 0.5 or 1.0 by default)."""
    score = 0.0
    if has_tag_structure(response):
        score += config.format_tags_weight
    answer = answer_span(response)
    if answer is not None and has_reference_pair_box(answer):
        score += config.format_box_weight
    return score


def passes_threshold(iou: float | None, config: RewardConfig) -> bool:
    """Whether the KA-IoU term counts ``iou`` as a success: above tau (at or above it if inclusive)."""
    if iou is None:
        return False
    return iou >= config.tau if config.inclusive_threshold else iou > config.tau


def ka_iou_reward(iou: float | None, level: int, config: RewardConfig) -> float:
    """R_KA-IoU for an answered response of an entity at ``level`` (``iou`` None: a miss)."""
    if passes_threshold(iou, config):
        return min(config.pos_scale[level - 1] * iou, config.cap)
    return config.neg_scale[level - 1]


def _image_size(extra_info: Mapping[str, Any]) -> tuple[int, int] | None:
    for width_key, height_key in (("image_width", "image_height"), ("width", "height")):
        if width_key in extra_info and height_key in extra_info:
            return int(extra_info[width_key]), int(extra_info[height_key])
    size = extra_info.get("image_size")
    if size is not None and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _read_answer_box(answer: str, config: RewardConfig, extra_info: Mapping[str, Any]) -> Box | None:
    if config.box_format == "qwen25_vl_abs":
        resized = None
        if "resized_width" in extra_info and "resized_height" in extra_info:
            resized = (int(extra_info["resized_width"]), int(extra_info["resized_height"]))
        image_size = _image_size(extra_info)
        if resized is None and image_size is None:
            raise ValueError(
                "karl.reward.box_format='qwen25_vl_abs' needs extra_info 'image_width'/'image_height' "
                "(or 'resized_width'/'resized_height') in every row"
            )
        return read_box(answer, "qwen25_vl_abs", image_size=image_size, resized_size=resized,
                        pixels=config.abs_pixels)
    return read_box(answer, config.box_format)  # type: ignore[arg-type]


def resolve_level(
    extra_info: Mapping[str, Any] | None,
    entity: str | None,
    table: MasteryTable | None,
    default_level: int,
) -> tuple[int, str]:
    """The sample's mastery level and where it came from: extra_info, the table, or the default."""
    if extra_info is not None and extra_info.get("knowledge_level") is not None:
        return parse_level(extra_info["knowledge_level"], where="extra_info['knowledge_level']"), LEVEL_FROM_EXTRA_INFO
    if table is not None and entity:
        level = table.level_of(entity)
        if level is not None:
            return level, LEVEL_FROM_TABLE
    return default_level, LEVEL_DEFAULT


def score_response(
    response: str,
    ground_truth: str,
    level: int,
    config: RewardConfig,
    extra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score one response for an entity at mastery ``level``; never raises on model text.

    Returns ``score`` (the reward), ``ka_iou`` (its KA-IoU part), ``format``, ``iou`` (0 for a
    miss or no answer), ``acc`` (1.0 if IoU >= 0.5), ``success`` (1.0 when the KA-IoU term took its
    success branch: an answer, an entity in the ground truth, and IoU past tau as
    :func:`passes_threshold` decides; the group filter of dynamic sampling reads it), ``answered``
    and ``parsed`` (a box was read).
    """
    response = response if isinstance(response, str) else ""
    ground_truth = ground_truth if isinstance(ground_truth, str) else ""
    fmt = format_reward(response, config)
    answer = answer_span(response)
    pred: Box | None = None
    iou: float | None = None
    if answer is not None:
        pred = _read_answer_box(answer, config, extra_info or {})
        # The released reader scores "no box" as the box (0, 0, 0, 0): a miss either way.
        iou = box_iou(pred or ZERO_BOX, read_box_reference(ground_truth))
    scored = answer is not None and entity_of(ground_truth) is not None
    ka_iou = ka_iou_reward(iou, level, config) if scored else 0.0
    iou_value = iou if iou is not None else 0.0
    return {
        "score": ka_iou + fmt,
        "ka_iou": ka_iou,
        "format": fmt,
        "iou": iou_value,
        "acc": 1.0 if iou_value >= 0.5 else 0.0,
        SUCCESS_FIELD: 1.0 if scored and passes_threshold(iou, config) else 0.0,
        "answered": 1.0 if answer is not None else 0.0,
        "parsed": 1.0 if pred is not None else 0.0,
    }


class KarlReward:
    """Picklable KA-IoU scorer: a :class:`RewardConfig` plus an optional mastery table.

    The table is loaded lazily from ``config.mastery_path`` in the process that scores (each
    Ray reward worker loads its own copy), or given directly as ``table``.
    """

    def __init__(self, config: RewardConfig | None = None, table: MasteryTable | None = None) -> None:
        self.config = config or RewardConfig()
        self._table = table
        self._table_loaded = table is not None

    @property
    def table(self) -> MasteryTable | None:
        if not self._table_loaded:
            self._table = MasteryTable.load(self.config.mastery_path) if self.config.mastery_path else None
            self._table_loaded = True
        return self._table

    def set_table(self, table: MasteryTable | None) -> None:
        """Swap the whole table at once (the trainer does this after a refresh)."""
        self._table, self._table_loaded = table, True

    def __call__(
        self,
        data_source: str | None,
        solution_str: str,
        ground_truth: str,
        extra_info: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        extra_info = extra_info if isinstance(extra_info, Mapping) else {}
        gt_text = ground_truth if isinstance(ground_truth, str) else ""
        entity = extra_info.get("entity") or entity_of(gt_text)
        # The table is only read for a sample without its own level (a node may not have the file).
        table = None if extra_info.get("knowledge_level") is not None else self.table
        level, source = resolve_level(extra_info, entity, table, self.config.default_level_number)
        result = score_response(solution_str, gt_text, level, self.config, extra_info)
        result["knowledge_level"] = level
        result["level_from_table"] = 1.0 if source == LEVEL_FROM_TABLE else 0.0
        result["level_defaulted"] = 1.0 if source == LEVEL_DEFAULT else 0.0
        return result


def compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: str,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl custom score function: the KA-IoU + format reward with the default (paper) settings.

    Use as ``reward.custom_reward_function.path=pkg://karl_verl.reward`` (name ``compute_score``).
    The entity's level comes from ``extra_info["knowledge_level"]`` (a level name or 1..5), else
    the mastery table at ``extra_info["mastery_path"]`` or keyword ``mastery_path`` by entity
    (``extra_info["entity"]``, else the ground truth's marker), else "completely incorrect".
    Other keyword arguments (``reward_kwargs`` in verl's config) become :class:`RewardConfig`
    fields, e.g. ``preset="v1"`` or ``tau=0.5``; verl's own extra keywords are ignored.

    >>> r = compute_score("kvg", "<think>t</think><answer>(0,0),(100,100)</answer>",
    ...                   "<|object_ref_start|>Su-30<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|>",
    ...                   {"knowledge_level": "completely correct"})
    >>> r["score"], r["iou"], r["knowledge_level"]
    (1.65, 1.0, 1)
    """
    fields = {name: kwargs[name] for name in RewardConfig.__dataclass_fields__ if name in kwargs}
    mastery_path = fields.pop("mastery_path", None) or (extra_info or {}).get("mastery_path")
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}
    scorer = KarlReward(RewardConfig(**fields), table=_load_table_cached(mastery_path) if mastery_path else None)
    return scorer(data_source, solution_str, ground_truth, extra_info)


def _load_table_cached(path: str) -> MasteryTable:
    stat = os.stat(path) if os.path.isfile(path) else None
    version = None if stat is None else (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
    return _load_table_version(str(path), version)


# Keyed by the file's identity and times: an atomic swap (rename) gives a new inode, so a swapped
# table is re-read even when it has the same size within one timestamp tick. Each process keeps
# its own cache (it is never shared between Ray workers).
@functools.lru_cache(maxsize=8)
def _load_table_version(path: str, version: tuple[int, ...] | None) -> MasteryTable:
    return MasteryTable.load(path)


__all__ = [
    "FORMAT_PATTERN",
    "SUCCESS_FIELD",
    "KarlReward",
    "MasteryError",
    "compute_score",
    "format_reward",
    "ka_iou_reward",
    "passes_threshold",
    "resolve_level",
    "score_response",
]
