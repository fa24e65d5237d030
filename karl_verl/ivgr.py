"""iVGR (Internalizing Visually Grounded Reasoning, arXiv 2605.31096): the pure part.

Pure module: no Ray, no verl, no torch. The trainer-side wiring (the paired sampler, the judge calls
during reward computation) lives in the integration layer; the judge's HTTP client and a local rule
judge are in :mod:`karl_verl.judge`.

Every training instance is rolled out in two streams, each its own GRPO group (:func:`stream_uid`):

* ``grounded`` (group A): a grounding prompt whose reasoning writes boxes ``[x1,y1,x2,y2]`` of the
  candidates it considers inside ``<think>``; its reward is the KARL reward.
* ``textual`` (group B): the same question reasoned in words only; its reward is the KARL reward
  plus ``consistency_weight`` x the judge's score of its reasoning against the instance's cached
  grounded reasoning (:func:`consistency_reward`).

:func:`pair_streams` turns a batch of instance rows into the two streams' rows, side by side, so
that both streams of an instance are in the same batch. The :class:`TeacherCache` keeps, per
instance, the best correct grounded rollout seen so far (the judge's reference).

The judge is told the reference reasoning is correct and scores the candidate with the rubric
(:data:`RUBRIC_SCORES`): 0.0 any contradiction, 0.3 both extra and missing details, 0.7 one of
them, 1.0 fully consistent. :func:`rubric_score` reads its reply; anything else is a failed
judgement (scored as missing, never guessed).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from karl_verl.atomic import atomic_write_text
from karl_verl.inject import instance_key

GROUNDED = "grounded"
TEXTUAL = "textual"
STREAMS: tuple[str, ...] = (GROUNDED, TEXTUAL)

#: ``extra_info`` fields :func:`pair_streams` sets on each row.
STREAM_FIELD = "ivgr_stream"
INSTANCE_FIELD = "ivgr_instance"

#: The only scores the judge may give (the rubric's four grades).
RUBRIC_SCORES: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0)

#: Placeholder of the question in a prompt template (replaced as text, so templates may hold other braces).
QUESTION_PLACEHOLDER = "{question}"

#: Built-in prompt templates, one per stream; the final answer uses KARL's box form ``(x1,y1),(x2,y2)``.
DEFAULT_TEMPLATES: Mapping[str, str] = {
    GROUNDED: (
        "{question}  Think step by step in <think> </think>. Look at the candidate regions of the image one by "
        "one: whenever you consider a candidate, write its bounding box as [x1,y1,x2,y2] and say what it shows "
        "and whether it matches, e.g. <think>The car at [120,340,410,560] has round headlights ...</think>. "
        "Then give the final answer (bounding box) in <answer> </answer> tags as (x1,y1),(x2,y2)."
    ),
    TEXTUAL: (
        "{question}  Think step by step in <think> </think>, in words only: describe the candidates you consider "
        "and why they match or not, without writing any coordinates. Then give the final answer (bounding box) in "
        "<answer> </answer> tags as (x1,y1),(x2,y2)."
    ),
}

#: Lines of the judge's user message that open the reference and the candidate reasoning
#: (:class:`karl_verl.judge.RuleJudgeServer` finds the two texts by them).
QUESTION_MARKER = "[Question]"
REFERENCE_MARKER = "[Reference reasoning]"
CANDIDATE_MARKER = "[Candidate reasoning]"
#: Last line of the judge's user message.
SCORE_REQUEST = "Score (0.0, 0.3, 0.7 or 1.0):"

JUDGE_SYSTEM_PROMPT = (
    "You judge whether a candidate reasoning is consistent with a reference reasoning about the same image "
    "question. The reference reasoning is correct. It may cite bounding boxes [x1,y1,x2,y2] of the regions it "
    "considered; the candidate reasons in words only, so compare what the regions are and why they match or "
    "not, never coordinates.\n"
    "Score the candidate:\n"
    "0.0 - it contradicts the reference anywhere (a different conclusion, a fact stated the other way);\n"
    "0.3 - no contradiction, but it both adds details the reference does not have and misses details the "
    "reference has;\n"
    "0.7 - no contradiction, and it either adds details or misses details (one of the two);\n"
    "1.0 - fully consistent: the same reasoning, nothing added, nothing missing.\n"
    "Output only the score: 0.0, 0.3, 0.7 or 1.0."
)

_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN = "<think>", "</think>", "<answer>"
# An optional "score" label, then one number; surrounding quotes, markdown emphasis and a final period are dropped.
_SCORE_REPLY = re.compile(r"(?:score\s*[:=]?\s*)?(\d+(?:\.\d+)?)")


def render_prompt(stream: str, question: str, templates: Mapping[str, str] | None = None) -> str:
    """The user-turn text of ``stream`` for ``question``: the stream's template with ``{question}`` replaced.

    ``templates`` maps stream names to templates (e.g. :func:`load_templates`); a stream it lacks takes
    :data:`DEFAULT_TEMPLATES`'s.

    >>> render_prompt(TEXTUAL, "Find X", {TEXTUAL: "{question}. Words only."})
    'Find X. Words only.'
    """
    if stream not in STREAMS:
        raise ValueError(f"stream: expected one of {list(STREAMS)}, got {stream!r}")
    template = (templates or {}).get(stream) or DEFAULT_TEMPLATES[stream]
    return template.replace(QUESTION_PLACEHOLDER, question)


def load_templates(path: str | os.PathLike[str]) -> dict[str, str]:
    """The prompt templates of a YAML (``.yaml``/``.yml``) or JSON file: a mapping with keys ``grounded``
    and/or ``textual``, each a non-empty string holding ``{question}``. A stream left out keeps the
    built-in template. Raises ValueError naming the file and the key that is wrong."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the iVGR template file ({err.strerror or err})") from None
    is_yaml = path.endswith((".yaml", ".yml"))
    try:
        if is_yaml:
            import yaml  # only for YAML files; verl depends on PyYAML

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError or ValueError: both say where the file is broken
        raise ValueError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'} ({err})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping with keys {list(STREAMS)}, got {type(data).__name__}")
    templates: dict[str, str] = {}
    for key, value in data.items():
        if key not in STREAMS:
            raise ValueError(f"{path}: key {key!r}: unknown stream; expected keys {list(STREAMS)}")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: key {key!r}: expected a non-empty string, got {value!r:.100}")
        if QUESTION_PLACEHOLDER not in value:
            raise ValueError(f"{path}: key {key!r}: the template has no {QUESTION_PLACEHOLDER} placeholder")
        templates[key] = value
    return templates


def message_text(content: Any) -> str:
    """A chat message's text: a string, or the text parts of a content list joined (image parts dropped).

    >>> message_text([{"type": "image"}, {"type": "text", "text": "Find X"}])
    'Find X'
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def extract_reasoning(response: str) -> str:
    """The reasoning of a response, stripped: the first ``<think>...</think>`` span's text.

    Without ``<think>``: the text before ``</think>`` (a chat template that opens the block in the
    prompt), else the text before ``<answer>``. An unclosed ``<think>`` (a truncated response) or a
    response with none of the tags has no reasoning: ``""``.

    >>> extract_reasoning("<think> The red car. </think><answer>(1,2),(3,4)</answer>")
    'The red car.'
    >>> extract_reasoning("The red car.<answer>(1,2),(3,4)</answer>"), extract_reasoning("<think>cut off")
    ('The red car.', '')
    """
    if not isinstance(response, str):
        return ""
    start = response.find(_THINK_OPEN)
    if start >= 0:
        end = response.find(_THINK_CLOSE, start + len(_THINK_OPEN))
        return response[start + len(_THINK_OPEN):end].strip() if end >= 0 else ""
    for tag in (_THINK_CLOSE, _ANSWER_OPEN):
        end = response.find(tag)
        if end >= 0:
            return response[:end].strip()
    return ""


def stream_uid(instance_uid: str, stream: str) -> str:
    """The GRPO group id of ``stream``'s rollouts of an instance: the two streams are normalised apart.

    >>> stream_uid("7f3a", GROUNDED), stream_uid("7f3a", TEXTUAL)
    ('7f3a/grounded', '7f3a/textual')
    """
    if stream not in STREAMS:
        raise ValueError(f"stream: expected one of {list(STREAMS)}, got {stream!r}")
    return f"{instance_uid}/{stream}"


def pair_streams(rows: Sequence[Mapping[str, Any]], key_field: str = "index") -> list[dict[str, Any]]:
    """Both streams of every instance row: for each row its grounded copy, then its textual copy.

    Each copy has a fresh ``extra_info`` with :data:`STREAM_FIELD` (the stream) and :data:`INSTANCE_FIELD`
    (``extra_info[key_field]`` as text: integers print as integers); its other values are shared with
    the input row, not copied. The prompt is left as it is (the caller renders each stream's).
    Raises ValueError naming the row number and key field when a row has no key.
    """
    paired: list[dict[str, Any]] = []
    for number, row in enumerate(rows):
        extra_info = row.get("extra_info") if isinstance(row, Mapping) else None
        key = instance_key(extra_info, key_field)
        if key is None:
            raise ValueError(f"row {number}: no extra_info[{key_field!r}] to pair its iVGR streams by "
                             f"(karl.ivgr.key_field); extra_info is {extra_info!r:.200}")
        for stream in STREAMS:
            paired.append({**row, "extra_info": {**extra_info, STREAM_FIELD: stream, INSTANCE_FIELD: key}})
    return paired


def rubric_score(text: str) -> float | None:
    """The judge's score in ``text``, or None when the reply is not exactly one rubric score.

    Rule: after dropping surrounding whitespace, quotes, markdown ``*``/`````, a final period and an
    optional ``Score:`` label (any case), the reply must be one number equal to 0, 0.3, 0.7 or 1
    (``"1"``, ``"1.0"``, ``"0.70"``); anything else (another number, words, two numbers) is None.

    >>> [rubric_score(t) for t in ("0.7", " 0.3\\n", "Score: 1", "0.5", "0.7 or 0.3", "")]
    [0.7, 0.3, 1.0, None, None, None]
    """
    if not isinstance(text, str):
        return None
    cleaned = text.strip().strip("\"'`*").strip().lower().removesuffix(".").strip()
    match = _SCORE_REPLY.fullmatch(cleaned)
    if match is None:
        return None
    value = float(match.group(1))
    return next((score for score in RUBRIC_SCORES if math.isclose(value, score, abs_tol=1e-9)), None)


def judge_messages(reference_reasoning: str, candidate_reasoning: str, question: str) -> list[dict[str, str]]:
    """Chat messages asking the judge to score ``candidate_reasoning`` against the correct ``reference_reasoning``.

    The system message holds the rubric; the user message the question, the reference and the
    candidate, each after its marker line (:data:`QUESTION_MARKER`, :data:`REFERENCE_MARKER`,
    :data:`CANDIDATE_MARKER`).
    """
    user = (f"{QUESTION_MARKER}\n{question.strip()}\n\n{REFERENCE_MARKER}\n{reference_reasoning.strip()}\n\n"
            f"{CANDIDATE_MARKER}\n{candidate_reasoning.strip()}\n\n{SCORE_REQUEST}")
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_judge_prompt(user_text: str) -> tuple[str, str, str] | None:
    """(question, reference, candidate) of a :func:`judge_messages` user message, or None when it is not one.

    The reference runs from its marker line to the last candidate marker line, so a reference that
    quotes the candidate marker is read whole; a candidate that quotes it is cut there.

    >>> parse_judge_prompt(judge_messages("ref [1,2,3,4]", "cand", "Find X")[1]["content"])
    ('Find X', 'ref [1,2,3,4]', 'cand')
    """
    question_at = user_text.find(f"{QUESTION_MARKER}\n")
    reference_at = user_text.find(f"\n{REFERENCE_MARKER}\n")
    candidate_at = user_text.rfind(f"\n{CANDIDATE_MARKER}\n")
    if not 0 <= question_at < reference_at < candidate_at:
        return None
    question = user_text[question_at + len(QUESTION_MARKER) + 1:reference_at]
    reference = user_text[reference_at + len(REFERENCE_MARKER) + 2:candidate_at]
    candidate = user_text[candidate_at + len(CANDIDATE_MARKER) + 2:].removesuffix(SCORE_REQUEST)
    return question.strip(), reference.strip(), candidate.strip()


@dataclass(frozen=True)
class CacheEntry:
    """One instance's cached grounded rollout: the judge's reference for its textual stream."""

    response: str
    correct: bool
    iou: float
    #: Training step it came from (None: unknown).
    step: int | None = None

    @property
    def reasoning(self) -> str:
        return extract_reasoning(self.response)

    def beats(self, other: CacheEntry) -> bool:
        """More accurate: correct beats not, then a higher IoU; a tie keeps ``other`` (the older)."""
        return (self.correct, self.iou) > (other.correct, other.iou)


class TeacherCache:
    """Per instance key, the best grounded rollout so far that is correct with IoU reward >= ``tau``.

    Lives in the trainer process, updated after each step's rewards (one thread: no locking). Only
    rollouts with a non-empty reasoning qualify, since the reasoning is what the judge compares.
    Saved as JSON: ``{"version": 1, "tau": ..., "entries": {key: {"response", "correct", "iou", "step"}}}``.
    """

    VERSION = 1

    def __init__(self, tau: float = 0.3) -> None:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau)):
            raise ValueError(f"tau: expected a finite number, got {tau!r}")
        self.tau = float(tau)
        self._entries: dict[str, CacheEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return str(key) in self._entries

    def offer(self, key: str, response: str, *, correct: bool, iou: float, step: int | None = None) -> bool:
        """Store ``response`` as ``key``'s reference when it qualifies and beats the cached one; True when stored."""
        iou = float(iou)
        if not (correct and math.isfinite(iou) and iou >= self.tau and extract_reasoning(response)):
            return False
        candidate = CacheEntry(response, bool(correct), iou, None if step is None else int(step))
        current = self._entries.get(str(key))
        if current is not None and not candidate.beats(current):
            return False
        self._entries[str(key)] = candidate
        return True

    def entry(self, key: str) -> CacheEntry | None:
        return self._entries.get(str(key))

    def reference(self, key: str) -> str | None:
        """The cached reasoning of ``key`` (what the judge is told is correct), or None."""
        entry = self._entries.get(str(key))
        return None if entry is None else entry.reasoning

    def coverage(self, keys: Iterable[str]) -> float:
        """Share of the distinct ``keys`` with a reference (0.0 for no keys)."""
        distinct = {str(key) for key in keys}
        return sum(key in self._entries for key in distinct) / len(distinct) if distinct else 0.0

    def to_json(self) -> str:
        entries = {key: {"response": e.response, "correct": e.correct, "iou": e.iou, "step": e.step}
                   for key, e in sorted(self._entries.items())}
        return json.dumps({"version": self.VERSION, "tau": self.tau, "entries": entries}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, *, tau: float | None = None, where: str = "teacher cache") -> TeacherCache:
        """A cache from :meth:`to_json`'s text. ``tau`` None keeps the saved one; another drops the entries
        below it. Raises ValueError naming ``where`` (the file) and the entry that is malformed."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{where}: not JSON ({err})") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("entries"), Mapping):
            raise ValueError(f"{where}: expected an object with 'version', 'tau' and 'entries' (an object by key)")
        if data.get("version") != cls.VERSION:
            raise ValueError(f"{where}: version {data.get('version')!r}, expected {cls.VERSION}")
        saved_tau = data.get("tau")
        if isinstance(saved_tau, bool) or not isinstance(saved_tau, (int, float)) or not math.isfinite(saved_tau):
            raise ValueError(f"{where}: 'tau': expected a finite number, got {saved_tau!r}")
        cache = cls(saved_tau if tau is None else tau)
        for key, raw in data["entries"].items():
            entry = _entry_of(raw, f"{where}: entry {key!r}")
            if entry.correct and entry.iou >= cache.tau:
                cache._entries[key] = entry
        return cache

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the cache to ``path`` atomically (a reader sees the previous file or this one)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, tau: float | None = None) -> TeacherCache:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as err:
            raise ValueError(f"{os.fspath(path)}: cannot read the iVGR teacher cache ({err.strerror or err})") from None
        return cls.from_json(text, tau=tau, where=os.fspath(path))


def _entry_of(raw: Any, where: str) -> CacheEntry:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object with 'response', 'correct', 'iou' and 'step', got {raw!r:.100}")
    response, correct, iou, step = raw.get("response"), raw.get("correct"), raw.get("iou"), raw.get("step")
    if not isinstance(response, str):
        raise ValueError(f"{where}: 'response': expected a string, got {response!r:.100}")
    if not isinstance(correct, bool):
        raise ValueError(f"{where}: 'correct': expected true or false, got {correct!r}")
    if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not math.isfinite(iou):
        raise ValueError(f"{where}: 'iou': expected a finite number, got {iou!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise ValueError(f"{where}: 'step': expected an integer or null, got {step!r}")
    return CacheEntry(response, correct, float(iou), step)


def consistency_reward(karl_reward: float, judge_scores: Sequence[float | None] | None,
                       weight: float) -> tuple[float, dict[str, Any]]:
    """A textual rollout's reward: ``karl_reward + weight x mean(valid judge scores)``, and why.

    ``judge_scores`` holds one entry per judge call (None: a failed call); None itself means the
    instance had no cached reference, so no judge was asked. Without a valid score the term is
    absent (the reward is ``karl_reward``), never guessed. The info dict: ``judge_score`` (the mean,
    or None), ``judge_failures`` (failed calls) and ``no_reference``.
    """
    if judge_scores is None:
        return float(karl_reward), {"judge_score": None, "judge_failures": 0, "no_reference": True}
    valid = [float(s) for s in judge_scores if s is not None and math.isfinite(s)]
    info = {"judge_score": sum(valid) / len(valid) if valid else None,
            "judge_failures": len(judge_scores) - len(valid), "no_reference": False}
    bonus = weight * info["judge_score"] if valid else 0.0
    return float(karl_reward) + bonus, info


def consistency_metrics(infos: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Step metrics over the textual rollouts' :func:`consistency_reward` infos (``ivgr/*``)."""
    infos = list(infos)
    scores = [i["judge_score"] for i in infos if i.get("judge_score") is not None]
    judged = [i for i in infos if not i.get("no_reference")]
    metrics = {
        "ivgr/textual_rollouts": float(len(infos)),
        "ivgr/no_reference_rate": (len(infos) - len(judged)) / len(infos) if infos else 0.0,
        "ivgr/judge_failures": float(sum(i.get("judge_failures", 0) for i in infos)),
        "ivgr/judged_rate": len(scores) / len(infos) if infos else 0.0,
    }
    if scores:  # no mean of nothing: a step without a valid score logs no judge_score_mean
        metrics["ivgr/judge_score_mean"] = sum(scores) / len(scores)
    return metrics
