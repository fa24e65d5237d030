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

Stable entry point (the trainer calls it)::

    run_probe(questions, backend, *, mode="logprob", thresholds=DEFAULT_THRESHOLDS, epoch=None,
              progress=True, sampling=None, chunk_size=256) -> ProbeResult
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
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


@dataclass
class ProbeResult:
    """What a probe run measured.

    ``decisions`` maps question id -> chosen letter (None: the reply named no letter);
    ``per_entity_expected_accuracy`` (logprob mode only, else None) is the mean probability of the
    right letter after a softmax over the four letters; ``num_unparseable`` counts generate-mode
    replies with no readable letter (always 0 in logprob mode).
    """

    table: MasteryTable
    per_entity_accuracy: dict[str, float]
    per_entity_expected_accuracy: dict[str, float] | None
    num_questions: int
    num_unparseable: int
    wall_time_s: float
    decisions: dict[str, str | None]
    mode: str
    #: Fraction of all questions answered right.
    accuracy: float = 0.0
    #: Generate mode: question id -> the reply (empty in logprob mode).
    replies: dict[str, str] = field(default_factory=dict)


def question_request(question: ProbeQuestion) -> GenerationRequest:
    """The chat request of one question: a user turn with its ``<image>`` prompt and the image."""
    return GenerationRequest(messages=[{"role": "user", "content": question.prompt}], images=[question.image])


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
) -> ProbeResult:
    """Ask ``questions`` through ``backend`` and build the mastery table.

    ``thresholds``: lower ACC bounds of levels 1..4 (pass ``MasteryConfig.thresholds``).
    ``sampling``: generate mode only (default :data:`DEFAULT_PROBE_SAMPLING`; ``n`` must be 1).
    Questions go to the backend ``chunk_size`` at a time, so a tqdm bar (``progress``) advances even
    for backends without their own. A backend answering the wrong number of questions, or with
    malformed values, raises :class:`~karl_verl.probe.questions.ProbeError`.
    """
    if mode not in PROBE_MODES:
        raise ProbeError(f"mode: expected one of {PROBE_MODES}, got {mode!r}")
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
    choices: list[str | None] = []
    expected: list[float] = []
    replies: dict[str, str] = {}
    with tqdm(total=len(questions), desc=f"probe ({mode})", unit="q", disable=not progress) as bar:
        for first in range(0, len(questions), max(1, chunk_size)):
            chunk = questions[first : first + max(1, chunk_size)]
            requests = [question_request(q) for q in chunk]
            if mode == "logprob":
                probabilities = letter_probabilities(_checked_logprobs(backend, chunk, requests, name))
                for question, row in zip(chunk, probabilities, strict=True):
                    choices.append(LETTERS[int(np.argmax(row))])
                    expected.append(float(row[LETTERS.index(question.answer_letter)]))
            elif mode == "choice":
                choices.extend(LETTERS[index] for index in _chosen_options(backend, chunk, requests, name))
            else:
                try:
                    texts = check_generations(backend.generate(requests, sampling), len(chunk), 1, backend=name)
                except BackendError as err:
                    raise ProbeError(str(err)) from None
                for question, (text,) in zip(chunk, texts, strict=True):
                    replies[question.question_id] = text
                    choices.append(parse_choice(text, question.options))
            bar.update(len(chunk))
    wall_time = time.perf_counter() - start

    accuracy, counts = per_entity_accuracy(questions, choices)
    expected_accuracy = per_entity_mean(questions, expected) if mode == "logprob" else None
    # "choice" and "generate" measure the decision only.
    num_unparseable = sum(choice is None for choice in choices)
    per_question_correct = [is_correct(q, c) for q, c in zip(questions, choices, strict=True)]
    meta = {
        "source": "karl_verl.probe",
        "mode": mode,
        "num_questions": len(questions),
        "num_unparseable": num_unparseable,
        "wall_time_s": round(wall_time, 3),
        "thresholds": list(thresholds),
    }
    table = build_mastery_table(accuracy, counts, thresholds=thresholds, epoch=epoch, meta=meta)
    return ProbeResult(
        table=table,
        per_entity_accuracy=accuracy,
        per_entity_expected_accuracy=expected_accuracy,
        num_questions=len(questions),
        num_unparseable=num_unparseable,
        wall_time_s=wall_time,
        decisions=dict(zip(ids, choices, strict=True)),
        mode=mode,
        accuracy=sum(per_question_correct) / len(questions),
        replies=replies,
    )



def _checked_logprobs(backend: Any, chunk: Sequence[ProbeQuestion], requests: list[GenerationRequest],
                      name: str) -> np.ndarray:
    try:
        scores = check_option_logprobs(backend.option_logprobs(requests, list(LETTERS)), len(chunk), len(LETTERS),
                                       backend=name)
    except BackendError as err:
        raise ProbeError(str(err)) from None
    hopeless = np.isneginf(scores).all(axis=1)
    if hopeless.any():
        question_id = chunk[int(hopeless.argmax())].question_id
        raise ProbeError(f"{name}.option_logprobs: question {question_id!r}: every letter is -inf")
    return scores


def _chosen_options(backend: Any, chunk: Sequence[ProbeQuestion], requests: list[GenerationRequest],
                    name: str) -> list[int]:
    """Choice mode: the option index each request picks (``choose_options``, else the argmax of the log-probs)."""
    if not callable(getattr(backend, "choose_options", None)):
        # exact ties go to the first letter, as in logprob mode
        return [int(np.argmax(row)) for row in _checked_logprobs(backend, chunk, requests, name)]
    try:
        picked = list(backend.choose_options(requests, list(LETTERS)))
    except BackendError as err:
        raise ProbeError(str(err)) from None
    if len(picked) != len(requests) or any(not isinstance(i, int | np.integer) or not 0 <= i < len(LETTERS)
                                           for i in picked):
        raise ProbeError(f"{name}.choose_options: expected {len(requests)} option indices in 0..{len(LETTERS) - 1}, "
                         f"got {picked[:8]!r}")
    return [int(i) for i in picked]
