"""From answers to mastery: reading a chosen letter, per-entity accuracy, the mastery table.

Pure module (no torch, no verl, no Ray; numpy only): runs anywhere, CPU. Level thresholds come
from :mod:`karl_verl.mastery` (or a :class:`karl_verl.config.MasteryConfig`), never from here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from karl_verl.mastery import DEFAULT_THRESHOLDS, MasteryTable
from karl_verl.probe.questions import LETTERS, ProbeQuestion

_LETTER_CLASS = "".join(LETTERS)
_THINK_END = re.compile(r"</think>", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
# The whole reply is a letter: "B", "b", "B.", "(B)", "[B]", "B)", "**B**".
_ONLY_LETTER = re.compile(rf"^[\s*_`\"'(\[]*([{_LETTER_CLASS}])[\s*_`\"')\].:]*$", re.IGNORECASE)
# An explicit statement: "Answer: B", "The answer is (B)", "correct option is B", "Choice: C".
_STATED = re.compile(
    rf"\b(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*[*_`\"'(\[]*([{_LETTER_CLASS}])\b(?![\-'])", re.IGNORECASE
)
# Letter markers anywhere: "(B)" or "B." / "B)" / "B:" as a word; capital letters only.
_MARKED = re.compile(rf"\(([{_LETTER_CLASS}])\)|\b([{_LETTER_CLASS}])[.):](?![\w\-])")
# A capital letter standing alone ("It is B"); not part of a name such as "C-130" or "A's".
_STANDALONE = re.compile(rf"(?<![\w\-'])([{_LETTER_CLASS}])(?![\w\-'])")
# "A" followed by a word may be the article ("A Boeing 747"), so it never decides on its own.
_ARTICLE_A = re.compile(r"A\s+\w")


def parse_choice(text: Any, options: Sequence[str] | None = None) -> str | None:
    """The option letter a reply chooses, or None when it chooses none or is ambiguous. Never raises.

    Tried in order, the first rule that decides wins (a rule that finds two different letters
    makes the reply ambiguous -> None):

    1. the reply (after any ``</think>``, inside ``<answer>`` when present) is just a letter;
    2. explicit statements: "Answer: B", "the answer is (C)";
    3. letter markers anywhere: "B. Su-30", "(B)", "B)" (capital letters only: "a" is an article);
    4. a capital letter standing alone: "It is B" ("A" followed by a word may be the article: it
       makes another letter ambiguous but never decides by itself);
    5. ``options`` given: the reply names exactly one option (the longest when one name contains another).

    >>> [parse_choice(t) for t in ("B", "(c)", "Answer: D", "The answer is B. Su-30", "A or B?", "")]
    ['B', 'C', 'D', 'B', None, None]
    >>> parse_choice("It is the Boeing 747.", ["Airbus A320", "Boeing 747", "Su-30", "F-16"])
    'B'
    """
    if not isinstance(text, str):
        return None
    try:
        return _parse(text, options)
    except Exception:  # a parser must not take a probe run down; an unreadable reply is unparseable
        return None


def _parse(text: str, options: Sequence[str] | None) -> str | None:
    parts = _THINK_END.split(text)
    body = parts[-1]
    # The first <answer>...</answer> span, found with two literal searches: a lazy regex rescans
    # to the end from every <answer> when no </answer> follows (seconds on long replies).
    opening = _ANSWER_OPEN.search(body)
    closing = _ANSWER_CLOSE.search(body, opening.end()) if opening else None
    if closing is not None:
        body = body[opening.end() : closing.start()]
    body = body.strip()
    if not body:
        return None
    match = _ONLY_LETTER.match(body)
    if match:
        return match.group(1).upper()
    for pattern in (_STATED, _MARKED):
        found = {next(g for g in m.groups() if g).upper() for m in pattern.finditer(body)}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    strong, weak = set(), False
    for match in _STANDALONE.finditer(body):
        if _ARTICLE_A.match(body, match.start()):
            weak = True
        else:
            strong.add(match.group(1))
    if len(strong) == 1 and not weak:
        return strong.pop()
    if strong:
        return None
    if options:
        return _match_option_text(body, options)
    return None


def _match_option_text(body: str, options: Sequence[str]) -> str | None:
    lowered = body.lower()
    hits = [i for i, option in enumerate(options) if isinstance(option, str) and option.strip()
            and option.strip().lower() in lowered]
    # "Boeing 747-400" also contains "Boeing 747": keep only names not contained in another hit.
    names = {i: options[i].strip().lower() for i in hits}
    maximal = [i for i in hits if not any(j != i and names[i] in names[j] for j in hits)]
    if len(maximal) == 1 and maximal[0] < len(LETTERS):
        return LETTERS[maximal[0]]
    return None


def is_correct(question: ProbeQuestion, choice: str | None) -> bool:
    """An unparseable reply (None) is wrong, as a wrong letter is."""
    return choice is not None and choice == question.answer_letter


def per_entity_accuracy(
    questions: Sequence[ProbeQuestion], choices: Sequence[str | None]
) -> tuple[dict[str, float], dict[str, int]]:
    """``(entity -> ACC_avg, entity -> number of questions)``; ``choices`` aligned with ``questions``."""
    if len(choices) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(choices)} choices")
    correct: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for question, choice in zip(questions, choices, strict=True):
        counts[question.entity] += 1
        correct[question.entity] += is_correct(question, choice)
    return {e: correct[e] / counts[e] for e in counts}, dict(counts)


def letter_probabilities(logprobs: np.ndarray) -> np.ndarray:
    """Softmax over the option letters of each row of ``[questions, 4]`` log-probabilities.

    >>> letter_probabilities(np.log([[0.2, 0.2, 0.05, 0.05]])).round(3).tolist()
    [[0.4, 0.4, 0.1, 0.1]]
    """
    logprobs = np.asarray(logprobs, dtype=np.float64)
    shifted = logprobs - logprobs.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


def per_entity_mean(questions: Sequence[ProbeQuestion], values: Iterable[float]) -> dict[str, float]:
    """Mean of a per-question value per entity."""
    sums: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for question, value in zip(questions, values, strict=True):
        sums[question.entity] = sums.get(question.entity, 0.0) + float(value)
        counts[question.entity] += 1
    return {e: sums[e] / counts[e] for e in counts}


def build_mastery_table(
    accuracy: Mapping[str, float],
    num_questions: Mapping[str, int],
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    epoch: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> MasteryTable:
    """A :class:`~karl_verl.mastery.MasteryTable` from per-entity accuracies (levels by ``thresholds``)."""
    return MasteryTable.from_scores(
        accuracy, thresholds=thresholds, num_questions=num_questions, epoch=epoch, meta=meta
    )
