"""The ``karl`` reward manager: verl's reward loop calls it once per response.

Thin glue over :class:`karl_verl.reward.KarlReward` (the formula lives in :mod:`karl_verl.reward`).
Runs inside verl's reward-loop workers (Ray actors, CPU); each worker builds its own scorer from
the verl config it is given:

* ``karl.reward.*``: :class:`karl_verl.config.RewardConfig` fields (preset, tau, tables, ...).
* the mastery table: ``karl.reward.mastery_path``, else ``karl.mastery.table_path``; re-read
  when the file changes on disk (an atomic swap by another process is seen whole). The ``karl``
  trainer does not write this file: its refreshed levels reach the workers on each sample.
* a sample's level: the sample's ``knowledge_level`` field (set by the ``karl`` trainer), else
  ``extra_info["knowledge_level"]``, else the table by entity, else ``default_level``. The table
  file is only opened for a sample that carries no level: a worker on a node without the file
  scores the trainer's tagged samples, and one that does need the file and cannot read it stops
  the run (:class:`MasteryTableUnavailable`) instead of scoring every sample as a miss.

If ``reward.custom_reward_function.path`` is set, that function scores instead (verl's contract).

A sample whose scoring raises (a bug, or data the pre-flight would have refused) scores as a miss
with ``reward_error`` 1 in its breakdown and a warning naming it, and the run goes on; an unreadable
mastery table is not such a sample (it would zero every reward of the worker) and is raised. verl 0.9.1
has no handler there: the agent loop awaits the reward worker
(``verl/experimental/agent_loop/agent_loop.py:1026``) inside a plain ``asyncio.gather`` (``:654``),
so one exception from a reward manager ends the whole run.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register as register_manager
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER

from karl_verl.config import KarlConfig
from karl_verl.mastery import MasteryError, MasteryTable
from karl_verl.reward import KarlReward, _load_table_cached

logger = logging.getLogger(__name__)

REGISTRY = "reward manager (verl.experimental.reward_loop.reward_manager)"
NAME = "karl"


class MasteryTableUnavailable(RuntimeError):
    """A reward worker needs the mastery table (a sample without a level) and cannot read it."""


def karl_config_from(config: Any) -> KarlConfig:
    """Read the ``karl`` section of a verl config (DictConfig or dict); defaults when absent."""
    section = config.get("karl") if hasattr(config, "get") else None
    return KarlConfig.from_mapping(section)


class KarlRewardManager(RewardManagerBase):
    """verl reward manager computing the KA-IoU + format reward with a per-sample breakdown."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None) -> None:
        super().__init__(config, tokenizer, compute_score)
        karl = karl_config_from(config)
        self.karl_config = karl
        self.table_path = karl.reward.mastery_path or karl.mastery.table_path
        custom = config.get("reward", {}).get("custom_reward_function", {}) if hasattr(config, "get") else {}
        self.custom_score = compute_score if custom and custom.get("path") else None
        self.is_async_custom = inspect.iscoroutinefunction(self.custom_score)
        self.scorer = KarlReward(karl.reward, table=None)

    def current_table(self) -> MasteryTable | None:
        if not self.table_path:
            return None
        try:
            return _load_table_cached(self.table_path)
        except MasteryError as err:
            import socket

            raise MasteryTableUnavailable(
                f"karl reward worker on {socket.gethostname()}: a sample has no knowledge_level, so its level "
                f"comes from the mastery table, which cannot be read: {err}. On a multi-node run the table "
                "(karl.reward.mastery_path / karl.mastery.table_path) must be on a filesystem every node sees"
            ) from None

    def score(self, response: str, ground_truth: str, extra_info: dict, data_source: Any) -> dict:
        if extra_info.get("knowledge_level") is None:
            self.scorer.set_table(self.current_table())
        return self.scorer(data_source, response, ground_truth, extra_info)

    async def run_single(self, data: DataProto) -> dict:
        data_item = data[-1:][0]
        response_ids = data_item.batch["responses"]
        valid_length = int(data_item.batch["attention_mask"][-response_ids.shape[-1]:].sum())
        non_tensor = data_item.non_tensor_batch
        data_source = non_tensor.get("data_source")
        ground_truth = non_tensor["reward_model"]["ground_truth"]
        extra_info = dict(non_tensor.get("extra_info") or {})
        if non_tensor.get("knowledge_level") is not None:
            extra_info["knowledge_level"] = non_tensor["knowledge_level"]
        response = await self.loop.run_in_executor(
            None, lambda: self.tokenizer.decode(response_ids[:valid_length], skip_special_tokens=True)
        )
        try:
            result = await self._score_one(response, ground_truth, extra_info, data_source)
            if not isinstance(result, dict):
                result = {"score": float(result)}
            result = {**result, "score": float(result["score"]), "reward_error": 0.0}
        except MasteryTableUnavailable:
            raise
        except Exception as err:
            logger.warning("karl reward: scoring a sample of %r (ground truth %.80r) raised %s: %s; it scores as a "
                           "miss (reward_error=1)", data_source, ground_truth, type(err).__name__, err)
            result = self.miss(data_source, extra_info)
        return {"reward_score": float(result["score"]), "reward_extra_info": dict(result)}

    async def _score_one(self, response: str, ground_truth: str, extra_info: dict, data_source: Any) -> Any:
        if self.custom_score is not None:
            kwargs = dict(data_source=data_source, solution_str=response, ground_truth=ground_truth,
                          extra_info=extra_info)
            if self.is_async_custom:
                return await self.custom_score(**kwargs)
            return await self.loop.run_in_executor(None, lambda: self.custom_score(**kwargs))
        return await self.loop.run_in_executor(None, lambda: self.score(response, ground_truth, extra_info,
                                                                        data_source))

    def miss(self, data_source: Any, extra_info: dict) -> dict:
        """The breakdown of a sample that could not be scored: every key a scored sample has, as a miss.

        verl gathers reward breakdowns key by key across a batch, so the keys must be the same; the
        level is the sample's own where it can be read.
        """
        try:
            result = dict(self.scorer(data_source, "", "", extra_info))
        except Exception:
            result = dict(self.scorer(data_source, "", "", {}))
        result["score"] = 0.0
        result["reward_error"] = 1.0
        return result


def register() -> None:
    register_manager(NAME)(KarlRewardManager)


def is_registered() -> bool:
    return REWARD_MANAGER.get(NAME) is KarlRewardManager


# Importing this module registers it, as verl's own decorators do (a dict entry, nothing more):
# so a part imported on its own, before verl, is registered too (see register_all).
register()
