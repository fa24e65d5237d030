"""The mastery-aware prompt sampler (karl_verl/curriculum.py): frequencies, verl's order, state, band-pass."""

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.ppo.utils import create_rl_sampler

from karl_verl.config import ConfigError, CurriculumConfig, KarlConfig
from karl_verl.curriculum import STATE_FORMAT, CurriculumError, PromptCurriculum

#: 40 rows over 8 entities; entity i sits at level 1 + i % 5.
ENTITIES = [f"entity-{i % 8}" for i in range(40)]
LEVELS = [1 + (i % 8) % 5 for i in range(40)]


def curriculum(config=None, *, entities=ENTITIES, levels=LEVELS, batch_size=4, shuffle=True, seed=7):
    sampler = PromptCurriculum(entities, config or CurriculumConfig(enable=True), batch_size=batch_size,
                               shuffle=shuffle, seed=seed)
    sampler.set_levels(levels)
    return sampler


def draw(sampler, batches):
    return [sampler.next_batch() for _ in range(batches)]


def verl_order(num_rows, batch_size, epochs, *, shuffle, seed):
    """What verl's train loader yields: create_rl_sampler under a StatefulDataLoader with drop_last."""
    data = OmegaConf.create({"shuffle": shuffle, "seed": seed})
    dataset = list(range(num_rows))
    loader = StatefulDataLoader(dataset, batch_size=batch_size, drop_last=True,
                                sampler=create_rl_sampler(data, dataset), collate_fn=list)
    return [batch for _ in range(epochs) for batch in loader]


class TestVerlOrder:
    @pytest.mark.parametrize(("shuffle", "seed"), [(True, 1), (True, 12345), (True, None), (False, 1)])
    @pytest.mark.parametrize(("num_rows", "batch_size"), [(40, 4), (43, 5), (7, 7)])
    def test_uniform_weights_draw_exactly_verls_batches(self, shuffle, seed, num_rows, batch_size):
        entities = [f"e{i % 3}" for i in range(num_rows)]
        sampler = curriculum(entities=entities, levels=[1 + i % 5 for i in range(num_rows)], batch_size=batch_size,
                             shuffle=shuffle, seed=seed)
        assert sampler.verl_order
        epochs = 3
        ours = draw(sampler, epochs * (num_rows // batch_size))
        assert ours == verl_order(num_rows, batch_size, epochs, shuffle=shuffle, seed=seed)

    def test_any_equal_weights_are_verls_order_and_levels_do_not_matter(self):
        a = curriculum(CurriculumConfig(enable=True, level_weights=(2.0,) * 5))
        b = curriculum(levels=[5] * 40)
        assert draw(a, 30) == draw(b, 30) == verl_order(40, 4, 3, shuffle=True, seed=7)

    def test_unequal_weights_are_not_verls_order(self):
        weighted = curriculum(CurriculumConfig(enable=True, level_weights=(1.0, 1.0, 1.0, 1.0, 1.01)))
        assert not weighted.verl_order
        assert draw(weighted, 10) != verl_order(40, 4, 1, shuffle=True, seed=7)


class TestFrequencies:
    """Draws with replacement, probability proportional to the row's weight: level k's expected share
    is w_k * n_k / sum_j w_j * n_j; the counts must lie within 4 binomial standard deviations."""

    DRAWS = 20_000

    @staticmethod
    def expected_shares(weights, levels):
        per_level = np.bincount(np.asarray(levels) - 1, minlength=5) * np.asarray(weights)
        return per_level / per_level.sum()

    @staticmethod
    def level_counts(sampler, draws):
        indices = [i for batch in draw(sampler, draws // sampler.batch_size) for i in batch]
        return np.bincount(np.asarray(LEVELS)[indices] - 1, minlength=5)

    @staticmethod
    def within(counts, shares, draws):
        bound = 4.0 * np.sqrt(draws * shares * (1 - shares))
        return np.all(np.abs(counts - draws * shares) <= bound + 1e-9)

    @pytest.mark.parametrize("weights", [(1.0, 2.0, 3.0, 4.0, 5.0), (0.0, 1.0, 0.0, 4.0, 0.5),
                                         (5.0, 1.0, 1.0, 1.0, 1.0)])
    def test_level_frequencies_match_the_weights(self, weights):
        sampler = curriculum(CurriculumConfig(enable=True, level_weights=weights))
        counts = self.level_counts(sampler, self.DRAWS)
        shares = self.expected_shares(weights, LEVELS)
        assert self.within(counts, shares, self.DRAWS), (counts, self.DRAWS * shares)
        assert all(counts[k] == 0 for k in range(5) if weights[k] == 0)
        np.testing.assert_allclose(sampler.level_shares(), shares)

    def test_the_check_fails_for_other_weights(self):
        """The bound is tight enough to tell (1, 2, 3, 4, 5) from a 10% change of one weight."""
        sampler = curriculum(CurriculumConfig(enable=True, level_weights=(1.0, 2.0, 3.0, 4.0, 5.0)))
        counts = self.level_counts(sampler, self.DRAWS)
        wrong = self.expected_shares((1.0, 2.0, 3.0, 4.4, 5.0), LEVELS)
        assert not self.within(counts, wrong, self.DRAWS)

    def test_chi_square_against_the_weights(self):
        weights = (1.0, 2.0, 3.0, 4.0, 5.0)
        sampler = curriculum(CurriculumConfig(enable=True, level_weights=weights))
        counts = self.level_counts(sampler, self.DRAWS)
        expected = self.DRAWS * self.expected_shares(weights, LEVELS)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 18.47  # 0.999 quantile of chi-square with 4 degrees of freedom

    def test_an_epoch_is_verls_number_of_prompts(self):
        sampler = curriculum(CurriculumConfig(enable=True, level_weights=(1, 0, 0, 0, 1)), batch_size=6)
        assert len(sampler) == 40 // 6
        batches = list(sampler.epoch_batches())
        assert len(batches) == 6 and all(len(b) == 6 for b in batches) and sampler.epoch == 0
        assert len(list(sampler.epoch_batches())) == 6 and sampler.epoch == 1

    def test_new_levels_change_the_next_batch(self):
        """A refresh moves every entity to level 5, whose weight is 0: the fallback draws them all."""
        sampler = curriculum(CurriculumConfig(enable=True, level_weights=(1.0, 0.0, 0.0, 0.0, 0.0)))
        first = draw(sampler, 5)
        assert {LEVELS[i] for batch in first for i in batch} == {1}
        sampler.reweight([2 if LEVELS[i] == 1 else 1 for i in range(40)], "refresh")
        second = {LEVELS[i] for batch in draw(sampler, 5) for i in batch}
        assert 1 not in second
        sampler.reweight([5] * 40, "refresh")
        assert sampler.consume_metrics()["karl/curriculum/fallback"] == 1.0
        assert len({i for batch in draw(sampler, 20) for i in batch}) > 20


class TestState:
    CONFIGS = [
        CurriculumConfig(enable=True),
        CurriculumConfig(enable=True, level_weights=(3.0, 1.0, 0.0, 1.0, 2.0)),
        CurriculumConfig(enable=True, level_weights=(1.0, 2.0, 1.0, 2.0, 1.0), min_success_rate=0.2,
                         max_success_rate=0.8, min_observations=4, revisit_every_epochs=2, decay=0.5),
    ]

    @staticmethod
    def feed(sampler, batch, step):
        """Outcomes that depend on the entity: entity-0 always succeeds, entity-1 never, the others alternate."""
        entities = [ENTITIES[i] for i in batch for _ in range(4)]
        outcomes = [1.0 if e == "entity-0" else 0.0 if e == "entity-1" else float((step + j) % 2)
                    for j, e in enumerate(entities)]
        sampler.observe(entities, outcomes)

    def run(self, sampler, steps, start=0):
        out = []
        for step in range(start, start + steps):
            if step and step % 7 == 0:  # a mastery refresh every 7 steps, moving levels around
                sampler.reweight([1 + (LEVELS[i] + step) % 5 for i in range(40)], "refresh")
            batch = sampler.next_batch()
            self.feed(sampler, batch, step)
            out.append(batch)
        return out

    @pytest.mark.parametrize("config", CONFIGS)
    @pytest.mark.parametrize("cut", [1, 9, 10, 23])
    def test_resumed_sampler_draws_what_the_uninterrupted_one_draws(self, config, cut):
        total = 40
        reference = self.run(curriculum(config), total)
        first = curriculum(config)
        head = self.run(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # through JSON, as the checkpoint stores it
        refreshes = [step for step in range(1, cut) if step % 7 == 0]  # the resumed run's table is the last one
        resumed = curriculum(config, levels=[1 + (LEVELS[i] + refreshes[-1]) % 5 if refreshes else LEVELS[i]
                                             for i in range(40)])
        resumed.load_state_dict(state)
        assert head + self.run(resumed, total - cut, start=cut) == reference
        assert resumed.state_dict() == self._final_state(config, total)

    def _final_state(self, config, total):
        sampler = curriculum(config)
        self.run(sampler, total)
        return sampler.state_dict()

    def test_state_is_plain_json(self):
        sampler = curriculum(self.CONFIGS[2])
        self.run(sampler, 12)
        state = sampler.state_dict()
        assert state["format"] == STATE_FORMAT and json.loads(json.dumps(state)) == state
        assert state["epoch"] == 1 and state["position"] == 8

    @pytest.mark.parametrize(("change", "key"), [
        ({"format": "other"}, "format"), ({"num_rows": 41}, "num_rows"), ({"batch_size": 8}, "batch_size"),
        ({"rng": "not base64!"}, "rng"), ({"position": 99}, "position"), ({"skipped": ["a"]}, "malformed"),
    ])
    def test_a_state_that_does_not_fit_is_refused_naming_the_key(self, change, key):
        sampler = curriculum()
        draw(sampler, 3)
        state = {**sampler.state_dict(), **change}
        with pytest.raises(CurriculumError, match=key):
            curriculum().load_state_dict(state, source="ckpt/global_step_2/karl_curriculum_state.json")

    def test_new_weights_at_resume_carry_epoch_position_and_generator_over(self, caplog):
        plain = curriculum()
        draw(plain, 3)
        weighted = curriculum(CurriculumConfig(enable=True, level_weights=(1.0, 0.0, 0.0, 0.0, 0.0)))
        with caplog.at_level("WARNING", logger="karl_verl.curriculum"):
            weighted.load_state_dict(plain.state_dict())
        assert "this run draws weighted draws from epoch 0, position 12" in caplog.text
        assert {LEVELS[i] for batch in draw(weighted, 2) for i in batch} == {1} and weighted.position == 20
        back = curriculum()  # and back to verl's order: the rest of the same epoch's permutation
        back.load_state_dict(weighted.state_dict())
        assert draw(back, 5) == verl_order(40, 4, 1, shuffle=True, seed=7)[5:]

    def test_levels_must_fit_the_rows(self):
        with pytest.raises(CurriculumError, match="expected 40 levels"):
            curriculum().set_levels([1] * 39)
        with pytest.raises(CurriculumError, match="levels in 1..5"):
            curriculum().set_levels([0] * 40)


class TestBandPass:
    CONFIG = CurriculumConfig(enable=True, min_success_rate=0.1, max_success_rate=0.9, min_observations=8,
                              revisit_every_epochs=2)

    def test_always_and_never_solved_entities_are_skipped_after_enough_rollouts_then_revisited(self):
        sampler = curriculum(self.CONFIG, batch_size=8)
        assert not sampler.verl_order
        sampler.observe(["entity-0"] * 8 + ["entity-1"] * 8 + ["entity-2"] * 7 + ["entity-3"] * 8,
                        [1.0] * 8 + [0.0] * 8 + [1.0] * 7 + [1.0, 0.0] * 4)
        record = sampler.reweight(None, "refresh")
        # entity-2 has 7 < min_observations rollouts; entity-3 succeeds half the time.
        assert sorted(sampler.skipped) == ["entity-0", "entity-1"] and record.newly_skipped == 2
        weights = sampler.row_weights()
        assert all((weights[i] == 0) == (ENTITIES[i] in ("entity-0", "entity-1")) for i in range(40))
        drawn = {ENTITIES[i] for _ in range(2) for batch in sampler.epoch_batches() for i in batch}
        assert "entity-0" not in drawn and "entity-1" not in drawn and len(drawn) == 6
        # Epoch 2 (skipped in epoch 0, revisit every 2 epochs): back, with counts reset.
        batch = sampler.next_batch()
        assert sampler.epoch == 2
        metrics = sampler.consume_metrics()
        assert metrics["karl/curriculum/revisited"] == 2 and metrics["karl/curriculum/skipped_entities"] == 0
        assert sampler.counts.evidence("entity-0") == 0 and sampler.counts.evidence("entity-3") == 8
        assert batch and sampler.row_weights().min() > 0

    def test_skipped_weight_keeps_some_draws(self):
        config = CurriculumConfig(enable=True, max_success_rate=0.9, min_observations=1, skipped_weight=0.25)
        sampler = curriculum(config)
        sampler.observe(["entity-0"], [1.0])
        sampler.reweight(None, "refresh")
        weights = sampler.row_weights()
        assert {weights[i] for i in range(40) if ENTITIES[i] == "entity-0"} == {0.25}
        assert {weights[i] for i in range(40) if ENTITIES[i] != "entity-0"} == {1.0}

    def test_without_revisits_an_entity_stays_skipped(self):
        config = CurriculumConfig(enable=True, min_success_rate=0.5, min_observations=1, revisit_every_epochs=0)
        sampler = curriculum(config)
        sampler.observe(["entity-1"], [0.0])
        sampler.reweight(None, "refresh")
        for _ in range(4):
            for batch in sampler.epoch_batches():
                assert all(ENTITIES[i] != "entity-1" for i in batch)
        assert list(sampler.skipped) == ["entity-1"]

    def test_a_refresh_at_an_epoch_boundary_skips_for_the_epoch_about_to_start(self):
        sampler = curriculum(CurriculumConfig(enable=True, max_success_rate=0.9, min_observations=1))
        list(sampler.epoch_batches())  # epoch 0 used up, epoch 1 not started
        sampler.observe(["entity-0"], [1.0])
        sampler.reweight(None, "refresh")
        assert sampler.skipped == {"entity-0": 1}
        for batch in sampler.epoch_batches():  # epoch 1: still skipped (revisit after one epoch)
            assert all(ENTITIES[i] != "entity-0" for i in batch)
        sampler.next_batch()  # epoch 2: back
        assert sampler.skipped == {}

    def test_everything_skipped_falls_back_to_the_level_weights(self):
        config = CurriculumConfig(enable=True, min_success_rate=0.5, min_observations=1)
        sampler = curriculum(config, entities=["a"] * 8, levels=[1] * 8)
        sampler.observe(["a"], [0.0])
        record = sampler.reweight(None, "refresh")
        assert record.fallback and sampler.row_weights().min() == 1.0
        assert len(sampler.next_batch()) == 4

    def test_decay_at_each_epoch_start(self):
        sampler = curriculum(CurriculumConfig(enable=True, max_success_rate=0.99, decay=0.5, min_observations=100))
        sampler.observe(["entity-0"] * 4, [1.0] * 4)
        list(sampler.epoch_batches())
        sampler.next_batch()
        assert sampler.counts.evidence("entity-0") == 2.0

    def test_rows_without_an_entity_are_never_skipped(self):
        config = CurriculumConfig(enable=True, min_success_rate=0.5, min_observations=1)
        sampler = curriculum(config, entities=[None, "", "a", "a"] * 2, levels=[1] * 8)
        sampler.observe(["a"], [0.0])
        sampler.reweight(None, "refresh")
        assert sampler.row_weights().tolist() == [1.0, 1.0, 0.0, 0.0] * 2


class TestMetrics:
    def test_drawn_per_level_this_step_and_this_epoch(self):
        sampler = curriculum(CurriculumConfig(enable=True, level_weights=(1, 1, 0, 0, 2)), batch_size=8)
        first = sampler.next_batch()
        metrics = sampler.consume_metrics()
        drawn = [metrics[f"karl/curriculum/level_{k}/drawn"] for k in range(1, 6)]
        assert drawn == np.bincount(np.asarray(LEVELS)[first] - 1, minlength=5).tolist()
        assert drawn[2] == drawn[3] == 0 and sum(drawn) == 8
        second = sampler.next_batch()
        metrics = sampler.consume_metrics()
        assert sum(metrics[f"karl/curriculum/level_{k}/drawn"] for k in range(1, 6)) == 8
        assert sum(metrics[f"karl/curriculum/level_{k}/drawn_epoch"] for k in range(1, 6)) == 16
        assert metrics["karl/curriculum/level_5/drawn_epoch"] == sum(LEVELS[i] == 5 for i in first + second)
        assert metrics["karl/curriculum/reweights"] == 0  # the epoch-start re-weight was reported by the first call
        assert math.isclose(sum(metrics[f"karl/curriculum/level_{k}/weight_share"] for k in range(1, 6)), 1.0)


class TestConfig:
    @pytest.mark.parametrize(("values", "key"), [
        ({"level_weights": [1, 1, 1]}, "karl.curriculum.level_weights"),
        ({"level_weights": [1, -1, 1, 1, 1]}, "karl.curriculum.level_weights"),
        ({"level_weights": [0, 0, 0, 0, 0]}, "karl.curriculum.level_weights"),
        ({"min_success_rate": 1.5}, "karl.curriculum.min_success_rate"),
        ({"max_success_rate": -0.1}, "karl.curriculum.max_success_rate"),
        ({"min_success_rate": 0.8, "max_success_rate": 0.2}, "karl.curriculum.min_success_rate"),
        ({"min_observations": -1}, "karl.curriculum.min_observations"),
        ({"skipped_weight": 2}, "karl.curriculum.skipped_weight"),
        ({"revisit_every_epochs": 0.5}, "karl.curriculum.revisit_every_epochs"),
        ({"decay": 0}, "karl.curriculum.decay"),
        ({"seed": "x"}, "karl.curriculum.seed"),
        ({"enable": "yes"}, "karl.curriculum.enable"),
        ({"level_weight": [1] * 5}, "karl.curriculum.level_weight: unknown key; did you mean "
                                    "karl.curriculum.level_weights"),
    ])
    def test_bad_values_name_the_key(self, values, key):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            KarlConfig.from_mapping({"curriculum": values})

    def test_defaults(self):
        config = KarlConfig.from_mapping({}).curriculum
        assert not config.enable and config.is_uniform and not config.band_pass and config.seed is None
        banded = CurriculumConfig(max_success_rate=0.95)
        assert banded.band_pass and not banded.is_uniform

    def test_the_pre_flight_check_reports_curriculum_problems_with_the_others(self):
        _, _, problems = KarlConfig.check_sections({"curriculum": {"decay": 2}, "mastery": {"seed": -1}}, None)
        assert any(p.startswith("karl.curriculum.decay:") for p in problems)
        assert any(p.startswith("karl.mastery.seed:") for p in problems)

    def test_sampler_refuses_a_training_set_smaller_than_a_batch(self):
        with pytest.raises(CurriculumError, match="fewer than one batch"):
            PromptCurriculum(["a"] * 3, CurriculumConfig(), batch_size=4)
