"""karl_grpo (karl_verl/advantage.py) against verl's own GRPO, the way verl tests its estimators."""

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

from karl_verl.advantage import compute_karl_grpo_advantage, group_normalize, group_normalize_over


def random_batch(seed: int):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = int(rng.integers(1, 80))
    length = int(rng.integers(1, 16))
    groups = int(rng.integers(1, batch + 1))
    index = np.array([f"uid-{int(g)}" for g in rng.integers(0, groups, batch)], dtype=object)
    kind = seed % 5
    if kind == 0:
        rewards = torch.randn(batch, length, generator=gen)
    elif kind == 1:  # outcome rewards on the last token, KARL's value set
        rewards = torch.zeros(batch, length)
        rewards[:, -1] = torch.tensor(rng.choice([-0.6, -0.1, 0.4, 0.5, 1.0, 1.5, 2.0], batch), dtype=torch.float32)
    elif kind == 2:  # constant groups: verl's float32 noise must be reproduced
        rewards = torch.full((batch, length), 0.1)
    elif kind == 3:
        rewards = torch.randint(0, 3, (batch, length), generator=gen).float() * 0.3
    else:  # GRPO's usual layout: equal groups of 4 or 8, contiguous
        size = int(rng.choice([4, 8]))
        batch = size * int(rng.integers(1, 10))
        index = np.repeat(np.arange(batch // size), size).astype(object)
        rewards = torch.randn(batch, length, generator=gen) * 2
    mask = (torch.rand(batch, length, generator=gen) > 0.3).float()
    return rewards, mask, index


@pytest.mark.parametrize("seed", range(200))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_equals_verl_grpo_without_levels(seed, norm_by_std):
    rewards, mask, index = random_batch(seed)
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm_by_std)
    got, returns = compute_karl_grpo_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm_by_std)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.equal(got, returns)


@pytest.mark.parametrize("seed", range(40))
def test_all_ones_weights_equal_verl(seed):
    rewards, mask, index = random_batch(seed)
    levels = np.random.default_rng(seed).integers(1, 6, len(index))
    config = {"norm_adv_by_std_in_grpo": True, "karl": {"alpha_plus": [1] * 5, "alpha_minus": [1] * 5}}
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    got, _ = compute_karl_grpo_advantage(rewards, mask, index, config=config, mastery_levels=levels)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_group_of_one_and_empty_batch():
    rewards = torch.tensor([[0.0, 2.0]])
    got, _ = compute_karl_grpo_advantage(rewards, torch.ones(1, 2), np.array(["a"], dtype=object))
    assert got[0].tolist() == pytest.approx([2.0 / (1 + 1e-6)] * 2)
    empty, _ = compute_karl_grpo_advantage(torch.zeros(0, 3), torch.zeros(0, 3), np.array([], dtype=object))
    assert empty.shape == (0, 3)


def test_weights_apply_after_normalisation():
    # One group of 4 at level 5, one of 2 at level 1; positive advantages get alpha_plus[level].
    rewards = torch.tensor([[1.0], [0.0], [1.0], [0.0], [2.0], [0.0]])
    index = np.array(["g5"] * 4 + ["g1"] * 2, dtype=object)
    levels = [5, 5, 5, 5, "completely correct", 1]
    config = {"karl": {"alpha_plus": [0.5, 1, 1, 1, 3.0], "alpha_minus": [2.0, 1, 1, 1, 0.25]}}
    base, _ = compute_karl_grpo_advantage(rewards, torch.ones(6, 1), index)
    got, _ = compute_karl_grpo_advantage(rewards, torch.ones(6, 1), index, config=config, mastery_levels=levels)
    weights = torch.tensor([3.0, 0.25, 3.0, 0.25, 0.5, 2.0]).unsqueeze(1)
    torch.testing.assert_close(got, base * weights)


def test_norm_flag_is_read_from_config_when_not_passed():
    rewards, mask, index = random_batch(4)
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False)
    got, _ = compute_karl_grpo_advantage(rewards, mask, index, config={"norm_adv_by_std_in_grpo": False})
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_levels_validation():
    rewards, mask = torch.ones(2, 1), torch.ones(2, 1)
    index = np.array(["a", "a"], dtype=object)
    config = {"karl": {"alpha_plus": [2] * 5}}
    with pytest.raises(ValueError, match="expected 2 levels"):
        compute_karl_grpo_advantage(rewards, mask, index, config=config, mastery_levels=[1])
    with pytest.raises(ValueError, match="1..5"):
        compute_karl_grpo_advantage(rewards, mask, index, config=config, mastery_levels=torch.tensor([0, 7]))
    # None entries take the configured default level.
    got, _ = compute_karl_grpo_advantage(torch.tensor([[1.0], [0.0]]), mask, index, config=config,
                                         mastery_levels=[None, None])
    assert got[0, 0] > 0


def test_group_normalize_rejects_wrong_index_length():
    with pytest.raises(ValueError, match="index"):
        group_normalize(torch.zeros(3), ["a", "b"])


class TestOnPolicyGroupStats:
    """karl.inject.on_policy_group_stats: each group's mean and std over its sampled rows only."""

    def test_hand_computed_group(self):
        # Group a: the injected row scores 2.0, the sampled ones 0, 1, 2 (mean 1, std 1).
        # Group b: one injected row 1.0, sampled 0.5, 0.5, 1.5 (mean 5/6, std 0.57735).
        scores = torch.tensor([2.0, 0.0, 1.0, 2.0, 1.0, 0.5, 0.5, 1.5])
        index = ["a"] * 4 + ["b"] * 4
        sampled = [False, True, True, True, False, True, True, True]
        out = group_normalize_over(scores, index, sampled, epsilon=0.0)
        assert out[:4].tolist() == pytest.approx([1.0, -1.0, 0.0, 1.0], abs=1e-6)
        std_b = float(np.std([0.5, 0.5, 1.5], ddof=1))
        assert out[4:].tolist() == pytest.approx([(v - 5 / 6) / std_b for v in (1.0, 0.5, 0.5, 1.5)], abs=1e-6)
        centred = group_normalize_over(scores, index, sampled, norm_by_std=False)
        assert centred[:4].tolist() == pytest.approx([1.0, -1.0, 0.0, 1.0], abs=1e-6)

    def test_every_row_sampled_is_plain_grpo_and_a_lone_sampled_row_is_a_group_of_one(self):
        scores = torch.tensor([0.3, 1.2, -0.6, 0.0])
        index = ["a", "a", "b", "b"]
        assert torch.allclose(group_normalize_over(scores, index, [True] * 4), group_normalize(scores, index))
        out = group_normalize_over(scores, index, [False, True, True, False], epsilon=0.0)
        assert out[:2].tolist() == pytest.approx([0.3, 1.2])  # mean 0, std 1 as verl's group of one
        # A group without any sampled row uses all of its rows.
        assert torch.allclose(group_normalize_over(scores, index, [False, False, True, True]),
                              group_normalize(scores, index))

    def test_the_estimator_takes_stats_rows_and_all_true_is_bitwise_verl(self):
        rewards = torch.zeros(8, 3)
        rewards[:, -1] = torch.tensor([2.0, 0.0, 1.0, 2.0, 1.0, 0.5, 0.5, 1.5])
        mask = torch.ones(8, 3)
        index = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
        plain, _ = compute_karl_grpo_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=True)
        same, _ = compute_karl_grpo_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=True,
                                              stats_rows=np.ones(8, dtype=bool))
        assert torch.equal(plain, same)
        ours, _ = compute_karl_grpo_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=True,
                                              stats_rows=np.array([0, 1, 1, 1, 0, 1, 1, 1], dtype=bool))
        assert ours[0, 0].item() == pytest.approx(1.0, abs=1e-5) and ours[1, 0].item() == pytest.approx(-1.0, abs=1e-5)

    def test_bad_shapes_are_refused(self):
        with pytest.raises(ValueError, match="expected 3 values each"):
            group_normalize_over(torch.zeros(3), ["a", "a", "a"], [True, False])
