"""iVGR's trainer hooks (``karl.ivgr.enable``; arXiv 2605.31096; the pure part is :mod:`karl_verl.ivgr`).

Runs in verl's TaskRunner (the trainer process, CPU); the judge's HTTP calls are made from there too,
once per step, bounded by ``karl.ivgr.judge_budget_s`` (:class:`~karl_verl.judge.JudgeClient`). With
``karl.ivgr.judge_url=local`` this process also serves the rule judge (:class:`~karl_verl.judge.RuleJudgeServer`,
a thread) for the length of the run: CPU runs need no judge process of their own.

* Stream expansion (:meth:`Ivgr.expand_prompts`, :func:`expand_streams`): each training prompt batch
  verl fetches from the dataloader becomes two rows per instance, its grounded row then its textual
  row, before any feature tags it (so both rows get the same mastery level: it is computed from the
  same ``extra_info`` / ``reward_model``). The last user message is rendered with the stream's
  template around the instance's own text (an ``<image>`` placeholder or image part stays where it
  is); ``extra_info`` gets :data:`~karl_verl.ivgr.STREAM_FIELD`, :data:`~karl_verl.ivgr.INSTANCE_FIELD`
  and :data:`QUESTION_FIELD`; ``uid`` (verl's GRPO group id, assigned by verl's
  ``_fetch_one_gen_batch`` before the expansion) becomes :func:`~karl_verl.ivgr.stream_uid` of it,
  so each stream is its own group. ``data.train_batch_size`` counts instances: a step trains
  ``2 x train_batch_size`` prompts (:meth:`Ivgr.rows_per_prompt`; the trainer asks verl's replay
  buffer for that many, and a refill of ``k`` prompts fetches ``ceil(k / 2)`` instances).
* Consistency term (:meth:`Ivgr.before_advantage`, before the advantage estimator): every grounded
  row of the step is offered to the :class:`~karl_verl.ivgr.TeacherCache` first, then every textual
  row whose instance has a reference is judged (one :meth:`~karl_verl.judge.JudgeClient.score_many`
  for the whole step). As in iVGR's released code, a grounded rollout of this very step may be the
  reference of the same step's textual rollouts. ``consistency_weight x mean judge score`` is added to
  the textual row's ``rm_scores`` where its reward sits (the last response token), written back to
  TransferQueue, so the advantage and verl's metrics see the new reward. No reference, or no valid
  judge score (a failed, garbled or late judge): no term, the KARL reward stays (counted).
* Metrics ``ivgr/*`` every step: per stream and level reward mean and acc@0.5, judge score mean,
  cache coverage and size, judge failures, rows without reference, judge time and its share of the
  step's wall time; the textual rows' KARL reward before the term and the term itself
  (``ivgr/textual/karl_reward_mean``, ``ivgr/consistency_term_mean``: their sum is
  ``ivgr/textual/reward_mean``, read back after the write); GRPO groups per stream and rows whose
  uid is not their stream's (``ivgr/uid_mismatch``); after a resume, ``ivgr/cache_restored``.
* Checkpoints: the teacher cache is ``karl_ivgr_cache.json`` in each ``global_step_N`` folder.
* Validation: ``karl.ivgr.val_stream`` "plain" (default) keeps the dataset's prompts, comparable with
  runs without iVGR; "textual" evaluates iVGR's claim that the words-only stream grounds well on its
  own; "grounded" the other stream. Validation prompts are never expanded.

Not supported together with dynamic sampling (``algorithm.filter_groups``): the filter drops one
stream's group without the other's, so pairs would not stay in one batch (refused at construction).
Multi-turn rollouts: every output row is treated as a rollout of its stream (single-turn is what
the agent loops of karl-verl produce).
"""

from __future__ import annotations

import atexit
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from karl_verl.config import LOCAL_JUDGE, ConfigError
from karl_verl.integration.features.base import Rollouts, TrainerFeature, logger, reward_infos
from karl_verl.integration.tq_fields import row_field
from karl_verl.ivgr import (
    DEFAULT_TEMPLATES,
    GROUNDED,
    INSTANCE_FIELD,
    QUESTION_PLACEHOLDER,
    STREAM_FIELD,
    STREAMS,
    TEXTUAL,
    TeacherCache,
    consistency_reward,
    extract_reasoning,
    load_templates,
    message_text,
    pair_streams,
    render_prompt,
    stream_uid,
)
from karl_verl.judge import failure_kind
from karl_verl.mastery_state import finite_or_none

#: The teacher cache's file in a ``global_step_N`` folder.
CACHE_FILE = "karl_ivgr_cache.json"
#: ``extra_info`` field holding the instance's original user text (the judge's question).
QUESTION_FIELD = "ivgr_question"


def render_messages(messages: Sequence[Mapping[str, Any]], stream: str,
                    templates: Mapping[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """(``messages`` with the last user turn rendered as ``stream``, that turn's original text).

    A string content becomes :func:`~karl_verl.ivgr.render_prompt` of it. A content list (verl's
    dataset replaces ``<image>`` by image parts) keeps its parts in place: the template's text before
    ``{question}`` becomes a text part in front, the text after it one at the end. Other messages are
    shared, not copied. Raises ValueError when there is no user message.
    """
    messages = list(messages)
    at = next((i for i in range(len(messages) - 1, -1, -1)
               if isinstance(messages[i], Mapping) and messages[i].get("role") == "user"), None)
    if at is None:
        raise ValueError(f"iVGR: the prompt has no user message to render as the {stream} stream: {messages!r:.200}")
    content = messages[at].get("content")
    question = message_text(content)
    if isinstance(content, list):
        template = (templates or {}).get(stream) or DEFAULT_TEMPLATES[stream]
        prefix, _, suffix = template.partition(QUESTION_PLACEHOLDER)
        parts = [dict(part) if isinstance(part, Mapping) else part for part in content]
        rendered: Any = ([{"type": "text", "text": prefix}] if prefix else []) + parts + (
            [{"type": "text", "text": suffix}] if suffix else [])
    else:
        rendered = render_prompt(stream, question, templates)
    messages[at] = {**messages[at], "content": rendered}
    return messages, question


def expand_streams(batch: TensorDict, *, key_field: str = "index",
                   templates: Mapping[str, str] | None = None) -> TensorDict:
    """Both iVGR streams of every row of a prompt batch (verl's TensorDict from ``_fetch_one_gen_batch``).

    Row ``i`` becomes rows ``2i`` (grounded) and ``2i+1`` (textual): every field copied, ``raw_prompt``
    rendered (:func:`render_messages`), ``extra_info`` with the stream, the instance key and the
    question, ``uid`` the stream's (:func:`~karl_verl.ivgr.stream_uid`). Raises ValueError naming the
    field when a row has no ``uid``, ``raw_prompt`` or ``extra_info[key_field]``.
    """
    size = len(batch)
    uids, prompts = row_field(batch, "uid", size), row_field(batch, "raw_prompt", size)
    for name, values in (("uid", uids), ("raw_prompt", prompts)):
        if any(value is None for value in values):
            raise ValueError(f"iVGR stream expansion: the prompt batch has no {name!r} for every row")
    paired = pair_streams([{"extra_info": info} for info in row_field(batch, "extra_info", size)], key_field)
    expanded = batch[torch.arange(size).repeat_interleave(len(STREAMS))]
    raw_prompts, extra_infos, stream_uids = [], [], []
    for row, pair in enumerate(paired):
        instance = row // len(STREAMS)
        stream = pair["extra_info"][STREAM_FIELD]
        messages, question = render_messages(prompts[instance], stream, templates)
        raw_prompts.append(messages)
        extra_infos.append({**pair["extra_info"], QUESTION_FIELD: question})
        stream_uids.append(stream_uid(str(uids[instance]), stream))
    tu.assign_non_tensor_stack(expanded, "raw_prompt", raw_prompts)
    tu.assign_non_tensor_stack(expanded, "extra_info", extra_infos)
    tu.assign_non_tensor_stack(expanded, "uid", stream_uids)
    return expanded


def _rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Per-row 1-D tensors of a TransferQueue field (nested: one per response; padded: one per row)."""
    return list(tensor.unbind()) if tensor.is_nested else list(tensor)


class _Stats:
    """Sums and counts of one step's per-row values, by name."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.sums[name] += float(value)
            self.counts[name] += 1

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / count for name, count in self.counts.items() if count}


class Ivgr(TrainerFeature):
    """Paired streams, the teacher cache, the judge's consistency term and ``ivgr/*`` (see the module docstring)."""

    def __init__(self, trainer: Any) -> None:
        from karl_verl.judge import JudgeClient, RuleJudgeServer

        super().__init__(trainer)
        self.config = trainer.karl_config.ivgr
        filter_groups = trainer.config.algorithm.get("filter_groups", None)
        if filter_groups is not None and filter_groups.get("enable", False):
            raise ConfigError("karl.ivgr.enable: not supported with algorithm.filter_groups.enable=true (dynamic "
                              "sampling drops one stream's group without the other's); turn one of them off")
        self.templates = load_templates(self.config.templates_path) if self.config.templates_path else None
        self.cache = TeacherCache(self.config.tau)
        #: The rule judge this process serves for ``judge_url: local``, stopped when the process exits.
        self.local_judge: RuleJudgeServer | None = None
        url = None
        if self.config.judge_url == LOCAL_JUDGE:
            self.local_judge = RuleJudgeServer().start()
            atexit.register(self.local_judge.stop)
            url = self.local_judge.url
            # A warning: a real training run should not end up scored by word overlap unnoticed.
            logger.warning("karl: iVGR judge: a rule judge served by this process at %s (karl.ivgr.judge_url=%s): "
                           "it checks the plumbing, not the reasoning; real training wants an LLM judge", url,
                           LOCAL_JUDGE)
        self.judge = JudgeClient.from_config(self.config, url=url)
        #: This step's rows as judged: key, instance, stream, karl_reward, reward, judge info (tests and debugging).
        self.step_rows: list[dict[str, Any]] = []
        self._stats = _Stats()
        self._counts: dict[str, float] = defaultdict(float)
        self._step_started: float | None = None
        #: Entries the last resume restored, until the next step's metrics report them.
        self._restored: int | None = None

    @classmethod
    def enabled(cls, trainer: Any) -> bool:
        return bool(trainer.karl_config.ivgr.enable)

    # -- prompts
    def rows_per_prompt(self) -> int:
        return len(STREAMS)

    def expand_prompts(self, batch: Any) -> Any:
        return expand_streams(batch, key_field=self.config.key_field, templates=self.templates)

    def tag_val_batch(self, batch_dict: dict) -> None:
        """Validation prompts rendered as ``karl.ivgr.val_stream`` (unchanged for "plain"); never expanded."""
        if self.config.val_stream == "plain":
            return
        prompts = batch_dict["raw_prompt"]
        rendered = np.empty(len(prompts), dtype=object)
        for i, messages in enumerate(prompts):
            rendered[i] = render_messages(messages, self.config.val_stream, self.templates)[0]
        batch_dict["raw_prompt"] = rendered

    # -- the step
    def on_step_begin(self) -> None:
        self._step_started = time.monotonic()

    def before_advantage(self, batch: Any, metrics: dict) -> None:
        """Teacher cache from this step's grounded rows, then the judge's term on the textual rows' rm_scores."""
        self.step_rows = []
        keys = [key for key, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding", False)]
        if not keys:
            return
        fields = ["responses", "response_mask", "rm_scores", "extra_fields", "extra_info", "uid"]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=fields)
        size = len(keys)
        infos, extra_infos = reward_infos(data, size), row_field(data, "extra_info", size)
        uids = row_field(data, "uid", size)
        responses, masks = _rows(data["responses"]), _rows(data["response_mask"])
        scores = [row.float().clone() for row in _rows(data["rm_scores"])]
        texts = [self.trainer.tokenizer.decode(ids[mask.bool()].tolist() if len(mask) == len(ids) else ids.tolist(),
                                               skip_special_tokens=True)
                 for ids, mask in zip(responses, masks, strict=True)]
        streams = [(info or {}).get(STREAM_FIELD) if isinstance(info, Mapping) else None for info in extra_infos]
        instances = [str(info.get(INSTANCE_FIELD)) if isinstance(info, Mapping) else None for info in extra_infos]
        if any(stream not in STREAMS for stream in streams):
            self.warn_once("no_stream", "karl: iVGR: %d rows without extra_info[%r]; they get no consistency term",
                           sum(stream not in STREAMS for stream in streams), STREAM_FIELD)
        self._count_groups(streams, uids)
        # Group A first: a correct grounded rollout of this step can be the reference of this step's textual ones.
        for i in (i for i, stream in enumerate(streams) if stream == GROUNDED):
            acc, iou = finite_or_none(infos[i].get("acc")), finite_or_none(infos[i].get("iou"))
            if self.cache.offer(instances[i], texts[i], correct=bool(acc), iou=iou if iou is not None else math.nan,
                                step=self.trainer.global_steps):
                self._counts["cache_updates"] += 1
        textual = [i for i, stream in enumerate(streams) if stream == TEXTUAL]
        judged = [i for i in textual if self.cache.reference(instances[i]) is not None]
        items = [(self.cache.reference(instances[i]), extract_reasoning(texts[i]),
                  str(extra_infos[i].get(QUESTION_FIELD, ""))) for i in judged]
        started = time.monotonic()
        results = dict(zip(judged, self.judge.score_many(items), strict=True)) if items else {}
        self._counts["judge_time_s"] += time.monotonic() - started
        changed: list[int] = []
        for i in textual:
            karl_reward = float(scores[i].sum())
            result = results.get(i)
            reward, info = consistency_reward(karl_reward, None if result is None else result.scores,
                                              self.config.consistency_weight)
            if result is not None and result.error is not None:
                # Once per kind: a judge that first times out and later answers errors shows both.
                kind = failure_kind(result.error)
                self.warn_once(f"judge_error/{kind}", "karl: iVGR judge failed (%s): %s (failed judgements get no "
                               "consistency term; counted in ivgr/judge_failures; each kind is logged once)",
                               kind, result.error)
            if reward != karl_reward:
                nonzero = torch.nonzero(scores[i]).flatten()
                at = int(nonzero[-1]) if len(nonzero) else len(scores[i]) - 1
                scores[i][at] += reward - karl_reward
                changed.append(i)
            self._record_judgement(info)
            self._stats.add("ivgr/textual/karl_reward_mean", karl_reward)
            self._stats.add("ivgr/consistency_term_mean", reward - karl_reward)
            self.step_rows.append({"key": keys[i], "instance": instances[i], "stream": TEXTUAL,
                                   "karl_reward": karl_reward, "reward": reward, **info})
        self._counts["instances"] += len({instances[i] for i in range(size) if streams[i] in STREAMS})
        self._counts["covered"] += len({instances[i] for i in judged})
        if changed:
            nested = torch.nested.as_nested_tensor([scores[i] for i in changed], layout=torch.jagged)
            tq.kv_batch_put(keys=[keys[i] for i in changed], partition_id=batch.partition_id,
                            fields=TensorDict({"rm_scores": nested}, batch_size=len(changed)))

    def _count_groups(self, streams: Sequence[str | None], uids: Sequence[Any]) -> None:
        """GRPO groups per stream, and rows whose ``uid`` is not their stream's: the uid is what the
        advantage groups by, so a store that dropped or rewrote the ``/<stream>`` suffix
        (:func:`~karl_verl.ivgr.stream_uid`) would mix the two streams into one group."""
        groups: dict[str, set[str]] = {stream: set() for stream in STREAMS}
        for stream, uid in zip(streams, uids, strict=True):
            if stream not in STREAMS:
                continue
            groups[stream].add(str(uid))
            if not str(uid).endswith(f"/{stream}"):
                self._counts["uid_mismatch"] += 1
        for stream, members in groups.items():
            self._counts[f"{stream}/groups"] += len(members)

    def _record_judgement(self, info: Mapping[str, Any]) -> None:
        self._counts["textual_rows"] += 1
        self._counts["no_reference"] += bool(info["no_reference"])
        self._counts["judge_failures"] += info["judge_failures"]
        self._counts["judged_rows"] += info["judge_score"] is not None
        self._stats.add("ivgr/judge_score_mean", info["judge_score"])

    def observe_rollouts(self, rollouts: Rollouts) -> None:
        """Reward (with the consistency term) and acc@0.5 per stream and per stream and level."""
        for i, extra_info in enumerate(rollouts.extra_infos):
            stream = extra_info.get(STREAM_FIELD) if isinstance(extra_info, Mapping) else None
            if not rollouts.valid[i] or stream not in STREAMS:
                continue
            level = int(rollouts.levels[i])
            for prefix in (f"ivgr/{stream}", f"ivgr/{stream}/level_{level}"):
                self._stats.add(f"{prefix}/reward_mean", float(rollouts.rewards[i]))
                self._stats.add(f"{prefix}/acc@0.5", rollouts.accs[i])

    def metrics(self) -> dict[str, float]:
        counts = self._counts
        out = self._stats.means()
        out.update({
            "ivgr/cache_size": float(len(self.cache)),
            "ivgr/cache_updates": counts["cache_updates"],
            "ivgr/cache_coverage": counts["covered"] / counts["instances"] if counts["instances"] else 0.0,
            "ivgr/textual_rollouts": counts["textual_rows"],
            "ivgr/no_reference": counts["no_reference"],
            "ivgr/judged_rollouts": counts["judged_rows"],
            "ivgr/judge_failures": counts["judge_failures"],
            "ivgr/judge_time_s": counts["judge_time_s"],
            "ivgr/grounded/groups": counts["grounded/groups"],
            "ivgr/textual/groups": counts["textual/groups"],
            "ivgr/uid_mismatch": counts["uid_mismatch"],
        })
        if self._restored is not None:  # the first step after a resume says what the checkpoint gave
            out["ivgr/cache_restored"] = float(self._restored)
            self._restored = None
        if self._step_started is not None:
            step_time = time.monotonic() - self._step_started
            if step_time > 0:
                out["ivgr/judge_time_share"] = counts["judge_time_s"] / step_time
        self._stats = _Stats()
        self._counts = defaultdict(float)
        return out

    # -- checkpoints
    def save_state(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.cache.save(os.path.join(folder, CACHE_FILE))

    def load_state(self, folder: str) -> None:
        path = os.path.join(folder, CACHE_FILE)
        if not os.path.exists(path):
            logger.warning("karl: %s has no %s (a checkpoint of a run without iVGR?): the iVGR teacher cache "
                           "starts empty", folder, CACHE_FILE)
            self.cache = TeacherCache(self.config.tau)
            self._restored = 0
            return
        self.cache = TeacherCache.load(path, tau=self.config.tau)
        self._restored = len(self.cache)
        logger.info("karl: iVGR teacher cache restored from %s (%d instances)", path, len(self.cache))
