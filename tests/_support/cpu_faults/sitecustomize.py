"""Fault injection for the CPU main_ppo fault tests (tests only).

The fault test puts this folder on PYTHONPATH, so Python imports this file at start-up in every
process of the run (driver, TaskRunner, reward-loop workers, rollout server). It patches two
karl-verl classes right after their modules are imported (whichever process imports them first,
and in whatever order), and breaks what environment variables ask for, read at call time:

* ``KARL_TEST_FAIL_PROBE_AFTER_SYNCS=N``: the transformers rollout server raises on every probe
  request (those ask for ``allowed_token_ids`` in choice mode or ``prompt_logprobs`` in logprob mode;
  training rollouts never do) once it has taken N weight syncs: the probe at train begin works, a
  later refresh fails.
* ``KARL_TEST_FAIL_REWARD_ONCE=1``: each reward-loop worker's first scoring raises.
* ``KARL_TEST_FREEZE_ROLLOUT_WEIGHTS=1``: weight sync to the rollout server is turned off: every sync
  after the first loads the first sync's weights again (the server must be re-filled after each
  sleep), so rollouts and validation always see the initial policy while the actor trains (the
  negative control of ``karl-verl experiment``).
"""

import importlib.abc
import importlib.util
import os
import sys

_reward_calls = {"count": 0}


def _patch_rollout(module):
    original = module.TransformersRolloutServer._generate_batch

    def _generate_batch(self, batch):
        # Every request, served alone or batched with its twins, goes through here.
        after = os.environ.get("KARL_TEST_FAIL_PROBE_AFTER_SYNCS")
        params = batch[0].params
        probe = params.get("prompt_logprobs") is not None or params.get("allowed_token_ids") is not None
        if after is not None and probe and self.syncs >= int(after):
            raise RuntimeError(f"injected rollout-server fault during a probe (after {self.syncs} syncs)")
        return original(self, batch)

    module.TransformersRolloutServer._generate_batch = _generate_batch

    original_update = module.TransformersRolloutServer._update_weights

    def _update_weights(self, state, global_steps):
        if os.environ.get("KARL_TEST_FREEZE_ROLLOUT_WEIGHTS") == "1":
            first = self.__dict__.setdefault("_test_first_weights", {k: v.detach().clone() for k, v in state.items()})
            state = first
        return original_update(self, state, global_steps)

    module.TransformersRolloutServer._update_weights = _update_weights


def _patch_reward(module):
    original = module.KarlRewardManager.score

    def score(self, response, ground_truth, extra_info, data_source):
        if os.environ.get("KARL_TEST_FAIL_REWARD_ONCE") == "1":
            _reward_calls["count"] += 1
            if _reward_calls["count"] == 1:
                raise RuntimeError("injected reward fault on one sample")
        return original(self, response, ground_truth, extra_info, data_source)

    module.KarlRewardManager.score = score


_PATCHES = {"karl_verl.cpu.rollout": _patch_rollout, "karl_verl.integration.reward_manager": _patch_reward}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


sys.meta_path.insert(0, _Finder())
