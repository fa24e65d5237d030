"""Run the knowledge probe with any backend and turn the answers into a mastery table.

Runs wherever the backend runs: this module only builds requests, calls the backend and counts
(no torch, no verl). Backends: :class:`karl_verl.backends.hf.HFBackend` (CPU / one GPU),
:class:`karl_verl.backends.vllm_backend.VLLMBackend` (GPU), or the trainer's backend on verl's
rollout servers. Any object with the methods of the protocols in :mod:`karl_verl.backends.base` works:

* ``mode="logprob"`` (default, fast): one forward pass per question through
  ``backend.option_logprobs(requests, ["A", "B", "C", "D"])``; the decision is the most likely letter,
  and the mean probability of the right letter is reported as the expected accuracy.
* ``mode="choice"``: the same decision from ``backend.choose_options(requests, letters)`` (on rollout
  servers one constrained greedy token per question, the cheapest request), or from the argmax of
  ``option_logprobs`` for a backend without it; no expected accuracy.
* ``mode="generate"`` (the paper's protocol): ``backend.generate(requests, sampling)``; the decision
  is the letter :func:`karl_verl.probe.scoring.parse_choice` reads from the reply (unreadable: wrong).

A question can fail without failing the probe. A backend that can lose single questions (the
trainer's :class:`~karl_verl.integration.rollout_probe.RolloutProbeBackend`: an unreadable image, a
prompt over the server's ``max_model_len``, a server error) says which after each call in its
attribute ``question_failures``: request index -> :class:`QuestionFailure`, with a NaN row
(``option_logprobs``) or None (``choose_options``, ``generate``) in that request's place. Such a
question is *skipped*: left out of its entity's accuracy (not counted wrong) and listed in
:attr:`ProbeResult.skipped`; an entity with no answered question is left out of the table. The probe
fails (:class:`TooFewAnswers`) when the answered share falls below ``min_answered_share``. Backends
without the attribute (HF, offline vLLM) report no failures: anything they cannot answer raises.

Stable entry point (the trainer calls it)::

    run_probe(questions, backend, *, mode="logprob", thresholds=DEFAULT_THRESHOLDS, epoch=None,
              progress=True, sampling=None, chunk_size=256, min_answered_share=1.0) -> ProbeResult
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from karl_verl.backends.base import (
    BackendError,
    GenerationRequest,
    SamplingSettings,
    check_generations,
    check_option_logprobs,
)
from karl_verl.mastery import DEFAULT_THRESHOLDS, MasteryTable
from karl_verl.probe.questions import LETTERS, ProbeError, ProbeQuestion
from karl_verl.probe.scoring import (
    build_mastery_table,
    is_correct,
    letter_probabilities,
    parse_choice,
    per_entity_accuracy,
    per_entity_mean,
)

PROBE_MODES = ("logprob", "choice", "generate")

#: Sampling of generate mode: greedy (a mastery estimate should not hinge on sampling noise) and
#: enough tokens for a letter with a short preamble. Pass ``sampling=`` to change it.
DEFAULT_PROBE_SAMPLING = SamplingSettings(temperature=0.0, max_new_tokens=64, seed=20, n=1)

#: The backend attribute naming the questions the last call could not answer (request index -> failure).
FAILURES_ATTRIBUTE = "question_failures"


@dataclass(frozen=True)
class QuestionFailure:
    """Why a backend could not answer one question.

    ``kind`` is short and from a small set, so that failures can be counted by it ("unreadable image",
    "prompt too long", "short answer", "timeout", "encoding error", "server error: ValueError");
    ``detail`` is the error's message (naming the request, file and row where known).
    """

    kind: str
    detail: str = ""


class TooFewAnswers(ProbeError):
    """Fewer questions were answered than ``min_answered_share`` asks; ``skipped`` says which and why."""

    def __init__(self, message: str, *, num_questions: int, skipped: Mapping[str, QuestionFailure]) -> None:
        super().__init__(message)
        self.num_questions = num_questions
        self.skipped = dict(skipped)


def skipped_by_kind(skipped: Mapping[str, QuestionFailure]) -> dict[str, int]:
    """Skipped questions per failure kind, most frequent first (ties by name)."""
    counts = Counter(failure.kind for failure in skipped.values())
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def describe_skipped(skipped: Mapping[str, QuestionFailure], *, first: int = 3) -> str:
    """One line on skipped questions: the count per kind, then the first few question ids (and the
    first one's error) so that a log shows where to look without a line per question."""
    kinds = ", ".join(f"{count} {kind}" for kind, count in skipped_by_kind(skipped).items())
    ids = sorted(skipped)
    shown = ", ".join(f"{question_id!r} ({skipped[question_id].kind})" for question_id in ids[:first])
    more = f" and {len(ids) - first} more" if len(ids) > first else ""
    detail = skipped[ids[0]].detail if ids else ""
    return f"{kinds}; skipped: {shown}{more}" + (f"; first error: {detail:.300}" if detail else "")


@dataclass
class ProbeResult:
    """What a probe run measured.

    ``decisions`` maps each *answered* question's id -> chosen letter (None: the reply named no
    letter); ``per_entity_expected_accuracy`` (logprob mode only, else None) is the mean probability
    of the right letter after a softmax over the four letters; ``num_unparseable`` counts
    generate-mode replies with no readable letter (always 0 in logprob mode). ``num_questions``
    counts every question asked, ``skipped`` the ones the backend could not answer (question id ->
    :class:`QuestionFailure`); accuracies are over the answered ones.
    """

    table: MasteryTable
    per_entity_accuracy: dict[str, float]
    per_entity_expected_accuracy: dict[str, float] | None
    num_questions: int
    num_unparseable: int
    wall_time_s: float
    decisions: dict[str, str | None]
    mode: str
    #: Fraction of the answered questions answered right.
    accuracy: float = 0.0
    #: Generate mode: question id -> the reply (empty in logprob mode).
    replies: dict[str, str] = field(default_factory=dict)
    #: Questions the backend could not answer: question id -> why. Not counted right or wrong.
    skipped: dict[str, QuestionFailure] = field(default_factory=dict)
    #: Probed entities with no answered question: not in ``table`` (no measurement), sorted.
    unanswered_entities: tuple[str, ...] = ()

    @property
    def num_answered(self) -> int:
        return self.num_questions - len(self.skipped)

    @property
    def answered_share(self) -> float:
        return self.num_answered / self.num_questions if self.num_questions else 0.0

    def skipped_by_kind(self) -> dict[str, int]:
        return skipped_by_kind(self.skipped)


def question_request(question: ProbeQuestion, *, max_pixels: int | None = None) -> GenerationRequest:
    """The chat request of one question: a user turn with its ``<image>`` prompt and the image, resized to at
    most ``max_pixels`` pixels when it is decoded (``karl.mastery.probe_max_pixels``)."""
    return GenerationRequest(messages=[{"role": "user", "content": question.prompt}], images=[question.image],
                             max_pixels=max_pixels)


def run_probe(
    questions: Sequence[ProbeQuestion],
    backend: Any,
    *,
    mode: str = "logprob",
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    epoch: int | None = None,
    progress: bool = True,
    sampling: SamplingSettings | None = None,
    chunk_size: int = 256,
    min_answered_share: float = 1.0,
    max_pixels: int | None = None,
) -> ProbeResult:
    """Ask ``questions`` through ``backend`` and build the mastery table.

    ``thresholds``: lower ACC bounds of levels 1..4 (pass ``MasteryConfig.thresholds``).
    ``sampling``: generate mode only (default :data:`DEFAULT_PROBE_SAMPLING`; ``n`` must be 1).
    Questions go to the backend ``chunk_size`` at a time, so a tqdm bar (``progress``) advances even
    for backends without their own. A backend answering the wrong number of questions, or with
    malformed values, raises :class:`~karl_verl.probe.questions.ProbeError`.
    ``min_answered_share``: in (0, 1]; questions the backend reports failed are skipped, and fewer
    answered than this share of all raises :class:`TooFewAnswers` (the default 1.0: any failure does;
    the trainer passes ``karl.mastery.min_answered_share``).
    ``max_pixels``: each question's image is resized to at most this many pixels before the backend
    builds its prompt (``karl.mastery.probe_max_pixels``); None: as stored.
    """
    if mode not in PROBE_MODES:
        raise ProbeError(f"mode: expected one of {PROBE_MODES}, got {mode!r}")
    if isinstance(min_answered_share, bool) or not isinstance(min_answered_share, int | float) \
            or not 0.0 < min_answered_share <= 1.0:
        raise ProbeError(f"min_answered_share: expected a number in (0, 1], got {min_answered_share!r}")
    if not questions:
        raise ProbeError("run_probe: no questions")
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        raise ProbeError("run_probe: question ids are not unique")
    thresholds = tuple(thresholds)
    sampling = sampling or DEFAULT_PROBE_SAMPLING
    if mode == "generate" and sampling.n != 1:
        raise ProbeError(f"run_probe: generate mode takes one reply per question, got sampling.n={sampling.n}")
    name = type(backend).__name__
    methods = {"logprob": ("option_logprobs",), "choice": ("choose_options", "option_logprobs"),
               "generate": ("generate",)}[mode]
    if not any(callable(getattr(backend, method, None)) for method in methods):
        raise ProbeError(f"run_probe: mode {mode!r} needs a backend with {' or '.join(m + '()' for m in methods)}; "
                         f"{name} has none")

    from tqdm.auto import tqdm

    start = time.perf_counter()
    # Per answered question, aligned with ``answered``; skipped questions only go to ``skipped``.
    answered: list[ProbeQuestion] = []
    choices: list[str | None] = []
    expected: list[float] = []
    replies: dict[str, str] = {}
    skipped: dict[str, QuestionFailure] = {}
    with tqdm(total=len(questions), desc=f"probe ({mode})", unit="q", disable=not progress) as bar:
        for first in range(0, len(questions), max(1, chunk_size)):
            chunk = questions[first : first + max(1, chunk_size)]
            requests = [question_request(q, max_pixels=max_pixels) for q in chunk]
            if mode == "logprob":
                scores, failed = _checked_logprobs(backend, chunk, requests, name)
                probabilities = letter_probabilities(scores)
                kept = [q for i, q in enumerate(chunk) if i not in failed]
                for question, row in zip(kept, probabilities, strict=True):
                    choices.append(LETTERS[int(np.argmax(row))])
                    expected.append(float(row[LETTERS.index(question.answer_letter)]))
            elif mode == "choice":
                picked, failed = _chosen_options(backend, chunk, requests, name)
                kept = [q for i, q in enumerate(chunk) if i not in failed]
                choices.extend(LETTERS[index] for index in picked)
            else:
                try:
                    outputs = backend.generate(requests, sampling)
                    failed = _reported_failures(backend, len(chunk), name)
                    if failed:
                        if not isinstance(outputs, list | tuple) or len(outputs) != len(chunk):
                            check_generations(outputs, len(chunk), 1, backend=name)  # raises, naming the count
                        _check_failed_entries(outputs, failed, name, "generate", "a reply")
                        outputs = [texts for i, texts in enumerate(outputs) if i not in failed]
                    texts = check_generations(outputs, len(chunk) - len(failed), 1, backend=name)
                except BackendError as err:
                    raise ProbeError(str(err)) from None
                kept = [q for i, q in enumerate(chunk) if i not in failed]
                for question, (text,) in zip(kept, texts, strict=True):
                    replies[question.question_id] = text
                    choices.append(parse_choice(text, question.options))
            answered.extend(kept)
            skipped.update((chunk[i].question_id, failure) for i, failure in sorted(failed.items()))
            bar.update(len(chunk))
    wall_time = time.perf_counter() - start

    num_answered = len(answered)
    if num_answered < min_answered_share * len(questions):
        raise TooFewAnswers(
            f"the probe answered {num_answered} of {len(questions)} questions "
            f"({100 * num_answered / len(questions):.1f}%), "
            f"below {min_answered_share:g} (min_answered_share; karl.mastery.min_answered_share in training): "
            f"{describe_skipped(skipped)}",
            num_questions=len(questions), skipped=skipped)
    accuracy, counts = per_entity_accuracy(answered, choices)
    expected_accuracy = per_entity_mean(answered, expected) if mode == "logprob" else None
    # "choice" and "generate" measure the decision only.
    num_unparseable = sum(choice is None for choice in choices)
    per_question_correct = [is_correct(q, c) for q, c in zip(answered, choices, strict=True)]
    meta = {
        "source": "karl_verl.probe",
        "mode": mode,
        "num_questions": len(questions),
        "num_unparseable": num_unparseable,
        "num_skipped": len(skipped),
        "wall_time_s": round(wall_time, 3),
        "thresholds": list(thresholds),
    }
    if skipped:
        meta["skipped_by_kind"] = dict(sorted(skipped_by_kind(skipped).items()))
    table = build_mastery_table(accuracy, counts, thresholds=thresholds, epoch=epoch, meta=meta)
    return ProbeResult(
        table=table,
        per_entity_accuracy=accuracy,
        per_entity_expected_accuracy=expected_accuracy,
        num_questions=len(questions),
        num_unparseable=num_unparseable,
        wall_time_s=wall_time,
        decisions={q.question_id: choice for q, choice in zip(answered, choices, strict=True)},
        mode=mode,
        accuracy=sum(per_question_correct) / num_answered,
        replies=replies,
        skipped=skipped,
        unanswered_entities=tuple(sorted({q.entity for q in questions} - set(accuracy))),
    )


def _reported_failures(backend: Any, num_requests: int, name: str) -> dict[int, QuestionFailure]:
    """The failures the backend reports for its last call (none for a backend without the attribute)."""
    reported = getattr(backend, FAILURES_ATTRIBUTE, None)
    if not reported:
        return {}
    if not isinstance(reported, Mapping):
        raise ProbeError(f"{name}.{FAILURES_ATTRIBUTE}: expected a mapping of request index -> QuestionFailure, "
                         f"got {type(reported).__name__}")
    failures: dict[int, QuestionFailure] = {}
    for index, failure in reported.items():
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < num_requests:
            raise ProbeError(f"{name}.{FAILURES_ATTRIBUTE} names request {index!r} of {num_requests} asked")
        if not isinstance(failure, QuestionFailure):
            raise ProbeError(f"{name}.{FAILURES_ATTRIBUTE}[{index}]: expected a QuestionFailure, got {failure!r:.100}")
        failures[int(index)] = failure
    return failures


def _check_failed_entries(values: Sequence[Any], failed: Mapping[int, QuestionFailure], name: str, method: str,
                          what: str) -> None:
    """A request reported failed must hold the failure marker (None), or the report and the answers disagree."""
    for index in failed:
        if values[index] is not None:
            raise ProbeError(f"{name}.{method}: request {index} is reported failed but has {what} "
                             f"({values[index]!r:.100})")


def _checked_logprobs(backend: Any, chunk: Sequence[ProbeQuestion], requests: list[GenerationRequest],
                      name: str) -> tuple[np.ndarray, dict[int, QuestionFailure]]:
    """(the answered requests' log-probabilities, in order; the failed requests by index)."""
    try:
        values = backend.option_logprobs(requests, list(LETTERS))
        failed = _reported_failures(backend, len(chunk), name)
        if failed:
            values = _without_failed_rows(values, failed, len(chunk), name)
        scores = check_option_logprobs(values, len(chunk) - len(failed), len(LETTERS), backend=name)
    except BackendError as err:
        raise ProbeError(str(err)) from None
    hopeless = np.isneginf(scores).all(axis=1)
    if hopeless.any():
        kept = [q for i, q in enumerate(chunk) if i not in failed]
        question_id = kept[int(hopeless.argmax())].question_id
        raise ProbeError(f"{name}.option_logprobs: question {question_id!r}: every letter is -inf")
    return scores, failed


def _without_failed_rows(values: Any, failed: Mapping[int, QuestionFailure], num_requests: int, name: str) -> Any:
    """The rows of the answered requests; each failed request's row must be NaN (the failure marker)."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != (num_requests, len(LETTERS)):
        check_option_logprobs(values, num_requests, len(LETTERS), backend=name)  # raises, naming what is wrong
    for index in sorted(failed):
        if not np.isnan(array[index]).all():
            raise ProbeError(f"{name}.option_logprobs: request {index} is reported failed but has log-probabilities "
                             f"{array[index].tolist()} (expected a row of NaN)")
    return np.delete(array, sorted(failed), axis=0)


def _chosen_options(backend: Any, chunk: Sequence[ProbeQuestion], requests: list[GenerationRequest],
                    name: str) -> tuple[list[int], dict[int, QuestionFailure]]:
    """Choice mode: (the option index each answered request picks, in order; the failed requests by index),
    from ``choose_options``, else the argmax of the log-probs."""
    if not callable(getattr(backend, "choose_options", None)):
        # exact ties go to the first letter, as in logprob mode
        scores, failed = _checked_logprobs(backend, chunk, requests, name)
        return [int(np.argmax(row)) for row in scores], failed
    try:
        picked = list(backend.choose_options(requests, list(LETTERS)))
    except BackendError as err:
        raise ProbeError(str(err)) from None
    failed = _reported_failures(backend, len(chunk), name)
    if len(picked) == len(requests):
        _check_failed_entries(picked, failed, name, "choose_options", "an answer")
    if len(picked) != len(requests) or any(not isinstance(c, int | np.integer) or not 0 <= c < len(LETTERS)
                                           for i, c in enumerate(picked) if i not in failed):
        also = f" (None for the {len(failed)} reported failed)" if failed else ""
        raise ProbeError(f"{name}.choose_options: expected {len(requests)} option indices in "
                         f"0..{len(LETTERS) - 1}{also}, got {picked[:8]!r}")
    return [int(c) for i, c in enumerate(picked) if i not in failed], failed
