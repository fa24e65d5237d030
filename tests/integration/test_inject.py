"""The trainer's side of ``karl.inject``: configuration checks, the plans put on prompts, the step metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from karl_verl.config import ConfigError, InjectConfig
from karl_verl.dryrun.pipeline import compose_recipe
from karl_verl.integration import inject as inject_driver
from karl_verl.integration.inject import InjectionDriver, check_trainer_config
from karl_verl.integration.inject_agent_loop import REFERENCE_FIELD, SESSIONS_FIELD
from karl_verl.integration.inject_loss import INJECTED_FIELD


@pytest.fixture
def references(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text("\n".join(json.dumps({"key": k, "response": f"ref {k}"}) for k in (0, 1, 2)) + "\n")
    return str(path)


def verl_config(*overrides):
    return compose_recipe("karl_kvg_cpu", ["actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent",
                                           *overrides])


def test_configurations_injection_cannot_run_with(references):
    inject = InjectConfig(enable=True, responses_path=references)
    check_trainer_config(inject, verl_config())
    with pytest.raises(ConfigError, match=r"karl\.inject\.num_injected: expected fewer than .*rollout\.n=4"):
        check_trainer_config(InjectConfig(enable=True, responses_path=references, num_injected=4), verl_config())
    with pytest.raises(ConfigError, match=r"default_agent_loop: .*'karl_inject_agent' .*got 'single_turn_agent'"):
        check_trainer_config(inject, compose_recipe("karl_kvg_cpu", []))
    with pytest.raises(ConfigError, match=r"on_policy_group_stats: needs algorithm\.adv_estimator=karl_grpo"):
        check_trainer_config(InjectConfig(enable=True, responses_path=references, on_policy_group_stats=True),
                             verl_config("algorithm.adv_estimator=grpo"))
    with pytest.raises(ConfigError, match=r"rollout_correction\.bypass_mode: .*old log-probs"):
        check_trainer_config(inject, verl_config("algorithm.rollout_correction.bypass_mode=true"))


def test_a_reference_holding_a_vision_token_stops_the_trainer_naming_file_line_key_and_token(references):
    from transformers import AddedToken

    from karl_verl.inject import ReferenceError
    from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

    path = Path(references)
    path.write_text(path.read_text() + json.dumps({"key": 3, "response": "<think><|vision_start|></think>"}) + "\n")
    inject = InjectConfig(enable=True, responses_path=references)
    with pytest.raises(ReferenceError, match=rf"^{path} line 4: key '3': 'response' holds '<\|vision_start\|>'"):
        InjectionDriver.create(inject, verl_config())
    # The policy's own vision tokens count too: a tokenizer whose image token is <image> refuses it.
    path.write_text(json.dumps({"key": 0, "response": "look at <image> here"}) + "\n")
    assert InjectionDriver.create(inject, verl_config()).references == {"0": "look at <image> here"}
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<image>", special=True)], special_tokens=True)
    with pytest.raises(ReferenceError, match=r"line 1: key '0': 'response' holds '<image>'"):
        InjectionDriver.create(inject, verl_config(), tokenizer)


def test_tag_puts_each_prompts_plan_on_it(references):
    driver = InjectionDriver.create(InjectConfig(enable=True, responses_path=references, levels=(4, 5)), verl_config())
    batch = TensorDict({"uid": NonTensorStack(*"abcd")}, batch_size=[4])
    driver.tag(batch, [5, 2, 4, 5], [{"index": 0}, {"index": 1}, {"index": 2}, {"index": 9}])
    assert list(batch[SESSIONS_FIELD]) == [1, 0, 1, 0]
    assert list(batch[REFERENCE_FIELD]) == ["ref 0", "", "ref 2", ""]
    metrics = driver.consume_metrics()
    assert metrics["karl/inject/prompts"] == 2 and metrics["karl/inject/missing_references"] == 1
    assert driver.consume_metrics()["karl/inject/prompts"] == 0  # reset after reading


def test_observe_reports_injected_rows_per_level_with_the_policys_probability(references, monkeypatch):
    driver = InjectionDriver.create(InjectConfig(enable=True, responses_path=references), verl_config())
    nested = lambda rows: torch.nested.as_nested_tensor([torch.tensor(r) for r in rows], layout=torch.jagged)  # noqa: E731
    data = TensorDict({
        INJECTED_FIELD: torch.tensor([1, 0, 1, 0, 1]),
        "old_log_probs": nested([[math.log(0.5), math.log(0.25)], [-1.0], [math.log(0.8)], [-2.0], [0.0]]),
        "response_mask": nested([[1, 1], [1], [1], [1], [1]]),
        "rm_scores": nested([[0.0, 1.5], [0.2], [0.5], [0.0], [9.0]]),
        "extra_fields": NonTensorStack({"karl_inject": "injected"}, {}, {"karl_inject": "injected"},
                                       {"karl_inject": "fallback"}, {}),
    }, batch_size=[5])
    monkeypatch.setattr(inject_driver.tq, "kv_batch_get", lambda **kwargs: data.select(*kwargs["select_fields"]))
    # Row 4 is verl's padding: left out.
    batch = SimpleNamespace(keys=list("abcde"), partition_id="train",
                            tags=[{}, {}, {}, {}, {"is_padding": True}])
    driver.observe(batch, np.array([5, 5, 4, 4, 5]))
    metrics = driver.consume_metrics()
    assert metrics["karl/inject/rows"] == 2 and metrics["karl/inject/fallbacks"] == 1
    assert metrics["karl/inject/level_5/rows"] == 1 and metrics["karl/inject/level_4/rows"] == 1
    assert metrics["karl/inject/level_5/reward_mean"] == pytest.approx(1.5)
    assert metrics["karl/inject/level_5/prob_mean"] == pytest.approx((0.5 + 0.25) / 2)
    assert metrics["karl/inject/level_5/logprob_mean"] == pytest.approx((math.log(0.5) + math.log(0.25)) / 2)
    assert metrics["karl/inject/level_4/prob_mean"] == pytest.approx(0.8)
    assert metrics["karl/inject/reward_mean"] == pytest.approx((1.5 + 0.5) / 2)
    assert driver.on_policy_rows(batch) is None
    on_policy = InjectionDriver(InjectConfig(enable=True, responses_path=references, on_policy_group_stats=True), {})
    assert on_policy.on_policy_rows(batch).tolist() == [False, True, False, True, False]


def test_injected_rows_get_the_actors_log_probs_as_rollout_log_probs_and_leave_the_diagnostics(references,
                                                                                            monkeypatch):
    """Injected rows carry a placeholder rollout log-prob of 0.0; after old log-probs they get the actor's,
    so that verl's rollout correction gives them weight 1 and rejects none of them, and verl's
    rollout-vs-actor diagnostics are recomputed over the sampled rows alone."""
    from verl.utils.debug.metrics import calculate_debug_metrics

    driver = InjectionDriver.create(InjectConfig(enable=True, responses_path=references), verl_config())
    nested = lambda rows: torch.nested.as_nested_tensor([torch.tensor(r) for r in rows], layout=torch.jagged)  # noqa: E731
    old = [[-0.5, -1.0], [-0.2], [-2.0, -0.1], [-0.3, -0.4]]
    rollout = [[0.0, 0.0], [-0.25], [0.0, 0.0], [-0.3, -0.45]]  # rows 0 and 2 injected (placeholder 0.0)
    data = TensorDict({
        INJECTED_FIELD: torch.tensor([1, 0, 1, 0]),
        "rollout_log_probs": nested(rollout), "old_log_probs": nested(old),
        "response_mask": nested([[1, 1], [1], [1, 1], [1, 1]]), "responses": nested([[5, 6], [7], [8, 9], [1, 2]]),
    }, batch_size=[4])
    written = {}
    monkeypatch.setattr(inject_driver.tq, "kv_batch_get", lambda **kwargs: data.select(*kwargs["select_fields"]))
    monkeypatch.setattr(inject_driver.tq, "kv_batch_put", lambda **kwargs: written.update(kwargs["fields"].items()))
    batch = SimpleNamespace(keys=list("abcd"), partition_id="train", tags=[{}] * 4)
    # What verl computed over every row, injected ones included: far from agreement.
    metrics = {"actor/entropy": 1.0, **calculate_debug_metrics(_debug_batch(old, rollout, [0, 1, 2, 3]))}
    assert metrics["training/rollout_probs_diff_max"] > 0.8

    driver.align_rollout_log_probs(batch, metrics)
    aligned = written["rollout_log_probs"]
    assert aligned.is_nested
    assert [row.tolist() for row in aligned.unbind()] == [
        pytest.approx(old[0]), pytest.approx(rollout[1]), pytest.approx(old[2]), pytest.approx(rollout[3])]
    expected = calculate_debug_metrics(_debug_batch(old, rollout, [1, 3]))
    assert {k: v for k, v in metrics.items() if k.startswith("training/")} == pytest.approx(expected)
    assert metrics["training/rollout_probs_diff_max"] < 0.1
    assert metrics["actor/entropy"] == 1.0 and metrics["karl/inject/aligned_rollout_rows"] == 2

    # A step without injected rows writes nothing and leaves verl's figures alone.
    written.clear()
    data[INJECTED_FIELD] = torch.tensor([0, 0, 0, 0])
    untouched = dict(metrics)
    driver.align_rollout_log_probs(batch, metrics)
    assert written == {} and metrics == untouched


def _debug_batch(old, rollout, rows):
    from verl.protocol import DataProto

    width = max(len(r) for r in old)
    pad = lambda values: torch.tensor([list(v) + [0.0] * (width - len(v)) for v in values])  # noqa: E731
    mask = torch.tensor([[1.0] * len(old[i]) + [0.0] * (width - len(old[i])) for i in rows])
    return DataProto.from_dict(tensors={"old_log_probs": pad([old[i] for i in rows]),
                                        "rollout_log_probs": pad([rollout[i] for i in rows]),
                                        "response_mask": mask, "responses": torch.zeros(len(rows), width).long()})
