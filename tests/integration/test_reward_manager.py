"""The ``karl`` reward manager on real DataProto rows (karl_verl/integration/reward_manager.py).

Built the way verl's reward loop builds it (``load_reward_manager`` with
``reward.reward_manager.name=karl`` and no custom score function), with a locally built tokenizer.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.reward import load_reward_manager

from karl_verl.config import RewardConfig
from karl_verl.mastery import MasteryEntry, MasteryTable
from karl_verl.reward import compute_score
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

GT = "<|object_ref_start|>Sukhoi Su-30<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def verl_config(karl: dict | None = None, custom_path: str | None = None):
    return OmegaConf.create({
        "reward": {
            "reward_manager": {"source": "register", "name": "karl"},
            "custom_reward_function": {"path": custom_path, "name": "compute_score"},
            "sandbox_fusion": None,
        },
        "karl": karl or {},
    })


def make_rows(tokenizer, responses, ground_truths, extra_infos, levels=None, prompt_len=6, response_len=64):
    prompts, resps, masks = [], [], []
    for text in responses:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:response_len]
        pad = tokenizer.pad_token_id
        prompts.append([pad] * prompt_len)
        resps.append(ids + [pad] * (response_len - len(ids)))
        masks.append([1] * prompt_len + [1] * len(ids) + [0] * (response_len - len(ids)))
    non_tensors = {
        "data_source": np.array(["kvg/aircraft"] * len(responses), dtype=object),
        "reward_model": np.array([{"style": "rule", "ground_truth": gt} for gt in ground_truths], dtype=object),
        "extra_info": np.array(extra_infos, dtype=object),
    }
    if levels is not None:
        non_tensors["knowledge_level"] = np.array(levels, dtype=object)
    return DataProto.from_dict(
        tensors={
            "prompts": torch.tensor(prompts),
            "responses": torch.tensor(resps),
            "attention_mask": torch.tensor(masks),
        },
        non_tensors=non_tensors,
    )


def run(manager, data):
    return [manager.loop.run_until_complete(manager.run_single(data[i : i + 1])) for i in range(len(data))]


def test_registered_manager_scores_rows_like_compute_score(tokenizer):
    manager = load_reward_manager(verl_config(), tokenizer)
    assert type(manager).__name__ == "KarlRewardManager"
    responses = [
        "<think>x</think><answer>(100,100),(300,280)</answer>",
        "<think>x</think><answer>(500,500),(600,600)</answer>",
        "no tags at all",
    ]
    extra = [{"entity": "Sukhoi Su-30", "knowledge_level": 1}, {"knowledge_level": "mostly correct"}, {}]
    data = make_rows(tokenizer, responses, [GT] * 3, extra)
    results = run(manager, data)
    for result, response, info in zip(results, responses, extra, strict=True):
        expected = compute_score("kvg/aircraft", response, GT, dict(info))
        assert result["reward_score"] == pytest.approx(expected["score"])
        assert result["reward_extra_info"]["iou"] == pytest.approx(expected["iou"])
        assert set(result["reward_extra_info"]) >= {"score", "iou", "acc", "format", "knowledge_level"}
    assert results[0]["reward_extra_info"]["knowledge_level"] == 1
    assert results[1]["reward_score"] == pytest.approx(-0.5 + 1.0)


def test_sample_level_field_wins_and_table_is_read(tokenizer, tmp_path):
    table_path = tmp_path / "mastery.json"
    MasteryTable({"Sukhoi Su-30": MasteryEntry(level=2)}).save(table_path)
    manager = load_reward_manager(verl_config({"mastery": {"table_path": str(table_path)}}), tokenizer)
    miss = "<think>x</think><answer>(500,500),(600,600)</answer>"
    data = make_rows(tokenizer, [miss, miss], [GT, GT], [{}, {}], levels=[None, 4])
    from_table, from_sample = run(manager, data)
    assert from_table["reward_extra_info"]["knowledge_level"] == 2
    assert from_table["reward_score"] == pytest.approx(-0.5 + 1.0)
    assert from_sample["reward_extra_info"]["knowledge_level"] == 4
    assert from_sample["reward_score"] == pytest.approx(-0.2 + 1.0)


def test_reward_config_comes_from_verl_config(tokenizer):
    manager = load_reward_manager(verl_config({"reward": {"preset": "uniform"}}), tokenizer)
    hit = "<think>x</think><answer>(100,100),(300,280)</answer>"
    data = make_rows(tokenizer, [hit], [GT], [{"knowledge_level": 1}])
    (result,) = run(manager, data)
    assert result["reward_score"] == pytest.approx(0.9 + 1.0)  # uniform: IoU, no s+ scaling


def test_custom_score_function_is_honoured(tokenizer, tmp_path):
    module = tmp_path / "my_reward.py"
    module.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw):\n"
                      "    return {'score': 0.25, 'len': len(solution_str)}\n")
    manager = load_reward_manager(verl_config(custom_path=str(module)), tokenizer)
    (result,) = run(manager, make_rows(tokenizer, ["abc"], [GT], [{}]))
    assert result["reward_score"] == 0.25 and result["reward_extra_info"]["len"] == 3


@pytest.mark.parametrize("inclusive", [False, True], ids=["strict", "inclusive"])
@pytest.mark.parametrize("preset", ["karl", "v1", "v2", "no_pos", "no_neg", "uniform"])
def test_success_is_the_rewards_own_threshold_rule(tokenizer, preset, inclusive):
    """``success`` in the breakdown verl's reward loop gets: 1 exactly when the answer's IoU passes tau
    as this preset and threshold mode count it, 0 without an answer, for a miss, and without an entity.

    The oracle is the rule read independently: IoU as an exact fraction (the answer's box shares the
    ground truth's left, top and right edges, so IoU = (y2 - 100) / 200) against tau as a decimal."""
    tau = 0.65 if preset != "uniform" else 0.5
    manager = load_reward_manager(verl_config({"reward": {"preset": preset, "tau": tau,
                                                          "inclusive_threshold": inclusive}}), tokenizer)
    bottoms = [100, 229, 230, 231, 199, 200, 201, 300, 260]
    responses = [f"<think>t</think><answer>(100,100),(300,{y})</answer>" for y in bottoms]
    expected = []
    for y in bottoms:
        iou, threshold = Fraction(y - 100, 200), Fraction(str(tau))
        expected.append(1.0 if (iou >= threshold if inclusive else iou > threshold) else 0.0)
    no_entity = "<|box_start|>(100,100),(300,300)<|box_end|>"
    responses += ["<think>t</think>(100,100),(300,300)", "<think>t</think><answer>no box</answer>",
                  "<think>t</think><answer>(100,100),(300,300)</answer>"]
    ground_truths = [GT] * (len(responses) - 1) + [no_entity]
    expected += [0.0, 0.0, 0.0]
    results = run(manager, make_rows(tokenizer, responses, ground_truths, [{}] * len(responses),
                                     levels=[4] * len(responses)))
    infos = [result["reward_extra_info"] for result in results]
    assert [info["success"] for info in infos] == expected
    assert sum(expected) >= 3 and expected.count(0.0) >= 5  # both sides of tau, in both modes
    # The reward takes its success branch on exactly these rows: KA-IoU there is min(s+ * IoU, cap).
    config = RewardConfig(preset=preset, tau=tau, inclusive_threshold=inclusive)
    for info, success in zip(infos, expected, strict=True):
        if success:
            assert info["ka_iou"] == pytest.approx(min(config.pos_scale[3] * info["iou"], config.cap))


@pytest.mark.parametrize("key", ["mastery.table_path", "reward.mastery_path"])
def test_tagged_samples_never_read_the_table_and_a_needed_missing_table_is_loud(tokenizer, tmp_path, key):
    """A worker on a node without the table file scores the samples the trainer tagged; a sample
    that needs the table there stops the run with the path and the host, instead of a silent miss."""
    section, field = key.split(".")
    missing = tmp_path / "not-on-this-node" / "mastery.json"
    manager = load_reward_manager(verl_config({section: {field: str(missing)}}), tokenizer)
    hit = "<think>x</think><answer>(100,100),(300,280)</answer>"
    tagged = make_rows(tokenizer, [hit, hit], [GT, GT], [{}, {"knowledge_level": 2}], levels=[3, None])
    for result, level in zip(run(manager, tagged), (3, 2), strict=True):
        assert result["reward_extra_info"]["reward_error"] == 0.0
        assert result["reward_extra_info"]["knowledge_level"] == level
        assert result["reward_score"] > 1.0
    untagged = make_rows(tokenizer, [hit], [GT], [{}])
    with pytest.raises(RuntimeError, match="not-on-this-node.*filesystem every node sees"):
        run(manager, untagged)
