"""The ``karl`` reward manager: verl's reward loop calls it once per response.

Thin glue over :class:`karl_verl.reward.KarlReward` (the formula lives in :mod:`karl_verl.reward`).
Runs inside verl's reward-loop workers (Ray actors, CPU); each worker builds its own scorer from
the verl config it is given:

* ``karl.reward.*``: :class:`karl_verl.config.RewardConfig` fields (preset, tau, tables, ...).
* the mastery table: ``karl.reward.mastery_path``, else ``karl.mastery.table_path``; re-read
  when the file changes on disk (an atomic swap by another process is seen whole). The ``karl``
  trainer does not write this file: its refreshed levels reach the workers on each sample.
* a sample's level: the sample's ``knowledge_level`` field (set by the ``karl`` trainer), else
  ``extra_info["knowledge_level"]``, else the table by entity, else ``default_level``.

If ``reward.custom_reward_function.path`` is set, that function scores instead (verl's contract).
"""

from __future__ import annotations

import inspect
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register as register_manager
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER

from karl_verl.config import KarlConfig
from karl_verl.mastery import MasteryTable
from karl_verl.reward import KarlReward, _load_table_cached

REGISTRY = "reward manager (verl.experimental.reward_loop.reward_manager)"
NAME = "karl"


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
        return _load_table_cached(self.table_path) if self.table_path else None

    def score(self, response: str, ground_truth: str, extra_info: dict, data_source: Any) -> dict:
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
        if self.custom_score is not None:
            kwargs = dict(data_source=data_source, solution_str=response, ground_truth=ground_truth,
                          extra_info=extra_info)
            if self.is_async_custom:
                result = await self.custom_score(**kwargs)
            else:
                result = await self.loop.run_in_executor(None, lambda: self.custom_score(**kwargs))
        else:
            result = await self.loop.run_in_executor(
                None, lambda: self.score(response, ground_truth, extra_info, data_source)
            )
        if not isinstance(result, dict):
            result = {"score": float(result)}
        return {"reward_score": float(result["score"]), "reward_extra_info": dict(result)}


def register() -> None:
    register_manager(NAME)(KarlRewardManager)


def is_registered() -> bool:
    return REWARD_MANAGER.get(NAME) is KarlRewardManager


# Importing this module registers it, as verl's own decorators do (a dict entry, nothing more):
# so a part imported on its own, before verl, is registered too (see register_all).
register()
