"""Knowledge-infused rollouts: which rollouts are replaced, by what, and how the text becomes tokens.

Pure module: no Ray, no verl (karl-verl's addition, not the paper's; ``docs/inject.md``). For a
training prompt whose entity is at one of ``karl.inject.levels``, sessions ``0 .. m-1`` of its
``n`` rollouts (``m = karl.inject.num_injected``) return an external response instead of a sample.
The decision is made once per prompt, on the trainer's side, from the prompt's mastery level and
the reference file (:func:`plan_prompt`); the agent loop only reads the result off the prompt
(:func:`is_injected_session`).

Reference file (``karl.inject.responses_path``): JSON lines or parquet, one row per instance with
a ``key`` (the value of the prompt's ``extra_info[karl.inject.key_field]``, compared as text) and
a ``response`` (the text to inject, e.g. a stage-1 CoT rationale ending in the answer)::

    {"key": "17", "response": "<think>The Fiat 500 is ...</think><answer>(12,40),(88,97)</answer>"}

A response must not hold a vision special token (:func:`vision_tokens`): the file is refused, naming
the row, the key and the token. A teacher's response (a model's output at run time) is not refused:
:func:`response_token_ids` tokenizes such a token as its characters instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Columns of a reference file.
KEY_COLUMN = "key"
RESPONSE_COLUMN = "response"


#: The Qwen-VL family's vision special tokens (Qwen2-VL to Qwen3-VL). In a prompt each stands for or delimits an
#: image or video; in a response none has one behind it, and the actor's forward fails on it (M-RoPE starts an
#: image at every <|vision_start|>, the vision merge pairs each <|image_pad|> run with an image's features).
#: verl 0.9.1 bans the two placeholders from sampling for that reason (verl/workers/rollout/utils.py,
#: get_vision_placeholder_token_ids); injected text must not bring any of them in either.
VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
#: Words naming other families' vision special tokens (``<image>``, ``<start_of_image>``, ``<IMG_CONTEXT>``).
_VISION_WORDS = ("vision", "image", "video", "img")


def vision_tokens(tokenizer: Any = None, processor: Any = None) -> tuple[str, ...]:
    """The vision special tokens injected text must never become: :data:`VISION_TOKENS`, the processor's
    image and video tokens, and the tokenizer's special tokens named after images, videos or vision.

    Of the tokenizer's added tokens only the special ones are searched: those are what a vision
    placeholder is in every family karl-verl trains (Qwen-VL), and what :func:`response_token_ids`
    can escape (``split_special_tokens`` leaves non-special added tokens matched).
    """
    found = dict.fromkeys(VISION_TOKENS)
    for name in ("image_token", "video_token", "vision_start_token", "vision_end_token"):
        token = getattr(processor, name, None)
        if isinstance(token, str) and token:
            found[token] = None
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, Mapping):
        special = [getattr(t, "content", str(t)) for t in decoder.values() if getattr(t, "special", True)]
    else:
        special = list(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in special:
        if any(word in token.lower() for word in _VISION_WORDS):
            found[token] = None
    return tuple(found)


class ReferenceError(ValueError):
    """A reference file could not be read; the message names the file, the row and what was expected."""


def _key_text(value: Any) -> str | None:
    """A key as text: integers (also integral floats, numpy scalars) print as integers; None stays None."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _rows_of(path: str) -> Iterable[tuple[str, Any]]:
    """(where, row) for each row of a JSONL or parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [c for c in (KEY_COLUMN, RESPONSE_COLUMN) if c not in table.column_names]
        if missing:
            raise ReferenceError(f"{path}: expected columns {KEY_COLUMN!r} and {RESPONSE_COLUMN!r}, missing "
                                 f"{missing} (has {table.column_names})")
        for i, row in enumerate(table.select([KEY_COLUMN, RESPONSE_COLUMN]).to_pylist()):
            yield f"{path} row {i}", row
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {number}", json.loads(line)
            except ValueError as err:
                raise ReferenceError(f"{path} line {number}: not JSON ({err})") from None


def load_references(path: str, forbidden: Sequence[str] = VISION_TOKENS) -> dict[str, str]:
    """The reference responses of a JSONL or parquet file, by key (see the module docstring).

    A response holding one of the ``forbidden`` strings (the vision special tokens, :func:`vision_tokens`)
    is refused: tokenized, it would become an image token with no image behind it.
    """
    if not os.path.isfile(path):
        raise ReferenceError(f"{path}: no such reference file (karl.inject.responses_path)")
    references: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    for where, row in _rows_of(path):
        if not isinstance(row, Mapping):
            raise ReferenceError(f"{where}: expected an object with {KEY_COLUMN!r} and {RESPONSE_COLUMN!r}, "
                                 f"got {row!r:.100}")
        key, response = _key_text(row.get(KEY_COLUMN)), row.get(RESPONSE_COLUMN)
        if key is None:
            raise ReferenceError(f"{where}: no {KEY_COLUMN!r}")
        if not isinstance(response, str) or not response.strip():
            raise ReferenceError(f"{where}: {RESPONSE_COLUMN!r} must be a non-empty string, got {response!r:.100}")
        if key in references:
            raise ReferenceError(f"{where}: key {key!r} again (first at {first_seen[key]})")
        if token := next((token for token in forbidden if token in response), None):
            raise ReferenceError(f"{where}: key {key!r}: {RESPONSE_COLUMN!r} holds {token!r}, a vision special "
                                 f"token; expected text without any of {', '.join(forbidden)} (remove or reword it: "
                                 "in a response it would stand for an image that is not there)")
        references[key] = response
        first_seen[key] = where
    return references


def instance_key(extra_info: Any, key_field: str) -> str | None:
    """The prompt's key in the reference file: ``extra_info[key_field]`` as text, or None."""
    if not isinstance(extra_info, Mapping):
        return None
    return _key_text(extra_info.get(key_field))


@dataclass(frozen=True)
class PromptPlan:
    """What happens to one training prompt's group: how many sessions get the ``reference`` (0: none)."""

    sessions: int
    reference: str
    #: "injected", "missing" (its level asks for injection but there is no reference) or "level" (not asked).
    status: str


def plan_prompt(level: int, key: str | None, *, levels: Sequence[int], num_injected: int,
                references: Mapping[str, str] | None) -> PromptPlan:
    """The plan of one prompt at mastery ``level``; ``references`` None means a teacher writes the responses."""
    if level not in levels:
        return PromptPlan(0, "", "level")
    if references is None:
        return PromptPlan(num_injected, "", "injected")
    reference = references.get(key) if key is not None else None
    if reference is None:
        return PromptPlan(0, "", "missing")
    return PromptPlan(num_injected, reference, "injected")


def is_injected_session(session_id: int, sessions: int) -> bool:
    """Whether rollout ``session_id`` (0 .. n-1) of a prompt planned for ``sessions`` injected ones is injected."""
    return 0 <= int(session_id) < int(sessions)


def response_token_ids(tokenizer: Any, text: str, end_token_id: int | None,
                       vision: Sequence[str] | None = None) -> list[int]:
    """``text`` as the policy's response tokens, ending as a generated response ends (the end-of-turn token).

    The rollout servers return a finished response with its stop token (vLLM's EOS is in its
    token ids); the injected one carries the tokenizer's EOS the same way, so that the policy
    also learns to stop after it.

    A vision special token written in ``text`` (``vision``, default :func:`vision_tokens` of the
    tokenizer) is tokenized as its characters, never as its id: a teacher's output is text, and an
    image token without an image would fail the actor's forward. Other special tokens keep their ids.
    """
    escaped = tuple(vision_tokens(tokenizer) if vision is None else vision)
    # Longest first, so that a token that begins another cannot cut it.
    pattern = "|".join(re.escape(token) for token in sorted(escaped, key=len, reverse=True))
    pieces = re.split(f"({pattern})", text) if escaped else [text]
    ids: list[int] = []
    for piece in pieces:
        if piece:
            # The tokenizer's own switch for "special tokens are text", on this piece only.
            options = {"split_special_tokens": True} if piece in escaped else {}
            ids.extend(tokenizer.encode(piece, add_special_tokens=False, **options))
    if end_token_id is not None and (not ids or ids[-1] != end_token_id):
        ids.append(int(end_token_id))
    return ids
