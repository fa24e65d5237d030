"""The trainer's side of knowledge-infused rollouts (``karl.inject``): plans, the actor's loss, metrics.

Runs in verl's TaskRunner, inside the ``karl`` trainer, only when ``karl.inject.enable``:

* :meth:`InjectionDriver.tag` puts ``karl_inject_sessions`` and ``karl_reference`` on every
  training prompt (the plan of :func:`karl_verl.inject.plan_prompt`, from the prompt's level and
  the reference file, read once here: the agent-loop workers need no access to it);
* :meth:`InjectionDriver.loss_fn` is the actor loss the trainer hands the workers
  (:func:`~karl_verl.integration.inject_loss.karl_inject_ppo_loss` bound to the actor config);
* :meth:`InjectionDriver.observe` gathers the step's metrics from TransferQueue, after the actor
  recomputed the old log-probs of every row (injected ones included):

  ``karl/inject/level_k/{rows, reward_mean, prob_mean, logprob_mean}`` for each injection level k:
  injected rows, their reward, the policy's mean per-token probability and log-probability of
  them (from ``old_log_probs``, before this step's update); the same without ``level_k`` over all
  levels; ``karl/inject/{prompts, missing_references, fallbacks}``: prompts planned for injection,
  prompts at an injection level without a reference (sampled normally), and teacher calls that
  failed (the session was sampled).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from functools import partial
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from karl_verl.config import ConfigError, InjectConfig
from karl_verl.inject import instance_key, load_references, plan_prompt, vision_tokens
from karl_verl.integration.inject_agent_loop import NAME as AGENT_LOOP
from karl_verl.integration.inject_agent_loop import REFERENCE_FIELD, SESSIONS_FIELD, STATUS_KEY
from karl_verl.integration.inject_loss import INJECTED_FIELD, karl_inject_ppo_loss
from karl_verl.integration.tq_fields import padded, row_values

#: verl's rollout-vs-actor diagnostics (``verl/utils/debug/metrics.py``), recomputed without injected rows.
DEBUG_METRICS_PREFIX = "training/rollout_"

logger = logging.getLogger(__name__)


def check_trainer_config(inject: InjectConfig, config: Any) -> None:
    """Raise :class:`ConfigError` for a verl configuration injection cannot run with (names the key)."""
    rollout = config.actor_rollout_ref.rollout
    inject.check_group_size(int(rollout.n))
    agent_loop = rollout.get("agent", {}).get("default_agent_loop")
    if agent_loop != AGENT_LOOP:
        raise ConfigError(f"actor_rollout_ref.rollout.agent.default_agent_loop: karl.inject.enable needs "
                          f"{AGENT_LOOP!r} (recipe karl_kvg_inject sets it), got {agent_loop!r}")
    distillation = config.get("distillation") or {}
    if distillation.get("enabled", False):
        raise ConfigError("distillation.enabled: karl.inject.enable replaces the actor's loss and does not combine "
                          "with verl's distillation loss")
    correction = config.algorithm.get("rollout_correction") or {}
    if correction.get("bypass_mode", False):
        raise ConfigError("algorithm.rollout_correction.bypass_mode: karl.inject.enable needs the actor's old "
                          "log-probs (bypass mode takes the rollout's, which injected rows do not have)")
    estimator = config.algorithm.adv_estimator
    if inject.on_policy_group_stats and estimator != "karl_grpo":
        raise ConfigError(f"karl.inject.on_policy_group_stats: needs algorithm.adv_estimator=karl_grpo, got "
                          f"{estimator!r}")


class InjectionDriver:
    """Plans, loss and metrics of ``karl.inject`` on the trainer's side (see the module docstring)."""

    def __init__(self, inject: InjectConfig, references: dict[str, str] | None) -> None:
        self.inject = inject
        self.references = references
        self._planned: Counter[str] = Counter()
        self._rows: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
        self._fallbacks = 0

    @classmethod
    def create(cls, inject: InjectConfig, config: Any, tokenizer: Any = None, processor: Any = None) -> InjectionDriver:
        """Check the configuration and read the reference file; ``tokenizer`` and ``processor`` (the policy's)
        name the vision tokens a reference must not hold (:func:`~karl_verl.inject.vision_tokens`)."""
        check_trainer_config(inject, config)
        references = None
        if inject.source == "file":
            references = load_references(inject.responses_path, vision_tokens(tokenizer, processor))
        if references is not None:
            logger.info("karl inject: %d reference responses from %s; levels %s get %d of %d rollouts injected",
                        len(references), inject.responses_path, list(inject.levels), inject.num_injected,
                        int(config.actor_rollout_ref.rollout.n))
        return cls(inject, references)

    def loss_fn(self, actor_config: Any) -> Any:
        """The actor loss for ``actor_rollout_wg.set_loss_fn`` (verl's loss-function signature)."""
        return partial(karl_inject_ppo_loss, actor_config, shaping_gamma=self.inject.shaping_gamma)

    def tag(self, batch: Any, levels: list[int], extra_infos: list[Any]) -> None:
        """Put each training prompt's plan on it (``karl_inject_sessions``, ``karl_reference``)."""
        plans = [plan_prompt(level, instance_key(extra_info, self.inject.key_field), levels=self.inject.levels,
                             num_injected=self.inject.num_injected, references=self.references)
                 for level, extra_info in zip(levels, extra_infos, strict=True)]
        self._planned.update(plan.status for plan in plans)
        tu.assign_non_tensor_stack(batch, SESSIONS_FIELD, [plan.sessions for plan in plans])
        tu.assign_non_tensor_stack(batch, REFERENCE_FIELD, [plan.reference for plan in plans])

    def align_rollout_log_probs(self, batch: Any, metrics: dict[str, Any]) -> None:
        """Give injected rows the actor's own log-probs as rollout log-probs, and recompute verl's
        rollout-vs-actor diagnostics over the sampled rows alone (``batch``: after old log-probs).

        An injected row's rollout log-probs are a placeholder (0.0: the teacher's probabilities are
        unknown). Left so, verl's ``training/rollout_probs_diff_*`` compare them with the actor's,
        ``rollout_correction`` gives the rows importance weights of exp(old - 0) and ``rollout_rs``
        rejects them from the loss. With the actor's values the correction sees no mismatch there
        (weight 1, nothing rejected), and the diagnostics measure what they are for: the rollout
        engine against the trainer on tokens the engine sampled.
        """
        from verl.protocol import DataProto
        from verl.utils.debug.metrics import calculate_debug_metrics
        from verl.workers.utils.padding import response_to_nested

        fields = [INJECTED_FIELD, "rollout_log_probs", "old_log_probs", "response_mask", "responses"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        injected = torch.tensor([bool(int(v)) for v in row_values(data[INJECTED_FIELD])], dtype=torch.bool)
        if not bool(injected.any()):
            return
        response_mask = data["response_mask"]
        rollout, old = padded(data["rollout_log_probs"]).float(), padded(data["old_log_probs"]).float()
        aligned = torch.where(injected.unsqueeze(-1), old, rollout)
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                        fields=TensorDict({"rollout_log_probs": response_to_nested(aligned, response_mask)},
                                          batch_size=len(batch.keys)))
        for key in [key for key in metrics if key.startswith(DEBUG_METRICS_PREFIX)]:
            del metrics[key]
        sampled = ~injected
        if bool(sampled.any()):
            rows = {"rollout_log_probs": rollout[sampled], "old_log_probs": old[sampled],
                    "response_mask": padded(response_mask)[sampled], "responses": padded(data["responses"])[sampled]}
            metrics.update(calculate_debug_metrics(DataProto.from_dict(tensors=rows)))
        metrics["karl/inject/aligned_rollout_rows"] = float(injected.sum())

    def observe(self, batch: Any, levels: np.ndarray) -> None:
        """Gather the injected rows of a step (``batch``: its TransferQueue meta; padding rows left out)."""
        fields = [INJECTED_FIELD, "old_log_probs", "response_mask", "rm_scores", "extra_fields"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        valid = [not tag.get("is_padding", False) for tag in batch.tags]
        injected = row_values(data[INJECTED_FIELD])
        mask = padded(data["response_mask"]).float()
        log_probs = padded(data["old_log_probs"]).float()
        rewards = padded(data["rm_scores"]).float().sum(dim=-1)
        tokens = mask.sum(dim=-1).clamp(min=1)
        logprob_mean = (log_probs * mask).sum(dim=-1) / tokens
        prob_mean = (log_probs.exp() * mask).sum(dim=-1) / tokens
        for row, extra in enumerate(row_values(data["extra_fields"])):
            if not valid[row]:
                continue
            if isinstance(extra, dict) and extra.get(STATUS_KEY) == "fallback":
                self._fallbacks += 1
            if int(injected[row]):
                self._rows[int(levels[row])].append(
                    (float(rewards[row]), float(prob_mean[row]), float(logprob_mean[row])))

    def on_policy_rows(self, batch: Any) -> np.ndarray | None:
        """Which rows of ``batch`` were sampled (for on-policy group statistics), or None when not asked."""
        if not self.inject.on_policy_group_stats:
            return None
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[INJECTED_FIELD])
        return np.array([not int(v) for v in row_values(data[INJECTED_FIELD])], dtype=bool)

    def consume_metrics(self) -> dict[str, float]:
        """The metrics gathered since the last call, then reset."""
        out: dict[str, float] = {
            "karl/inject/prompts": float(self._planned["injected"]),
            "karl/inject/missing_references": float(self._planned["missing"]),
            "karl/inject/fallbacks": float(self._fallbacks),
        }
        groups = {f"level_{level}/": self._rows.get(level, []) for level in self.inject.levels}
        groups[""] = [row for rows in self._rows.values() for row in rows]
        for prefix, rows in groups.items():
            out[f"karl/inject/{prefix}rows"] = float(len(rows))
            if rows:
                reward, prob, logprob = (float(np.mean(column)) for column in zip(*rows, strict=True))
                out.update({f"karl/inject/{prefix}reward_mean": reward, f"karl/inject/{prefix}prob_mean": prob,
                            f"karl/inject/{prefix}logprob_mean": logprob})
        self._planned.clear()
        self._rows = defaultdict(list)
        self._fallbacks = 0
        return out
