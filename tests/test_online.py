"""Online mastery (karl_verl/online.py): the Beta posterior with decay, and the online / blend tables."""

import doctest
import json
import math

import numpy as np
import pytest

from karl_verl import online as online_module
from karl_verl.config import ConfigError, MasteryConfig
from karl_verl.mastery import MasteryEntry, MasteryError, MasteryTable
from karl_verl.online import (
    OnlineMastery,
    blend_table,
    entry_score,
    level_midpoint,
    online_table,
)


def test_doctests():
    result = doctest.testmod(online_module)
    assert result.attempted > 0 and result.failed == 0


class TestPosterior:
    @pytest.mark.parametrize("seed", range(20))
    def test_matches_a_plain_loop(self, seed):
        """Observations in batches, decays in between: the same as replaying them one by one."""
        rng = np.random.default_rng(seed)
        alpha, beta, decay = rng.uniform(0.5, 3), rng.uniform(0.5, 3), rng.uniform(0.3, 1.0)
        online = OnlineMastery(prior_alpha=alpha, prior_beta=beta, decay=decay)
        expected = {}  # entity -> [successes, failures], computed the slow way
        for _ in range(rng.integers(1, 6)):
            entities = [f"e{i}" for i in rng.integers(0, 4, size=rng.integers(0, 12))]
            outcomes = rng.choice([0.0, 1.0], size=len(entities)).tolist()
            online.observe(entities, outcomes)
            for entity, outcome in zip(entities, outcomes, strict=True):
                counts = expected.setdefault(entity, [0.0, 0.0])
                counts[0 if outcome >= 0.5 else 1] += 1.0
            online.apply_decay()
            for counts in expected.values():
                counts[0] *= decay
                counts[1] *= decay
        for entity, (s, f) in expected.items():
            assert online.evidence(entity) == pytest.approx(s + f)
            assert online.mean(entity) == pytest.approx((alpha + s) / (alpha + beta + s + f))

    def test_skips_missing_entities_and_outcomes(self):
        online = OnlineMastery()
        assert online.observe(["a", None, "", "b", "c"], [1.0, 1.0, 1.0, None, math.nan]) == 1
        assert online.entities() == ["a"]
        assert online.mean("never seen") is None and online.evidence("never seen") == 0.0

    def test_entity_names_are_stripped(self):
        online = OnlineMastery()
        online.observe([" a "], [1.0])
        assert online.evidence("a") == 1.0 and online.mean(" a") == pytest.approx(2 / 3)

    def test_length_mismatch_raises(self):
        with pytest.raises(ValueError, match="one outcome per entity"):
            OnlineMastery().observe(["a", "b"], [1.0])

    def test_decay_one_keeps_counts(self):
        online = OnlineMastery(decay=1.0)
        online.observe(["a"] * 3, [1.0, 0.0, 1.0])
        online.apply_decay()
        assert online.evidence("a") == 3.0

    @pytest.mark.parametrize("kwargs", [{"prior_alpha": 0.0}, {"prior_beta": -1.0}, {"decay": 0.0}, {"decay": 1.5}])
    def test_bad_parameters_raise(self, kwargs):
        with pytest.raises(MasteryError):
            OnlineMastery(**kwargs)

    def test_json_round_trip_is_exact(self):
        online = OnlineMastery(prior_alpha=2.0, prior_beta=0.5, decay=0.7)
        online.observe(["a", "b", "a"], [1.0, 0.0, 0.0])
        online.apply_decay()
        text = json.dumps(online.to_json())
        again = OnlineMastery.from_json(json.loads(text))
        assert again == online

    @pytest.mark.parametrize("data", [[1, 2], {"counts": {"a": [1]}}, {"counts": {"a": "xy"}}])
    def test_bad_json_names_the_problem(self, data):
        with pytest.raises(MasteryError, match="online posterior"):
            OnlineMastery.from_json(data, source="state.json")


class TestTables:
    def test_level_midpoints_lie_inside_their_levels(self):
        from karl_verl.mastery import level_from_accuracy

        for level in range(1, 6):
            assert level_from_accuracy(level_midpoint(level)) == level
        with pytest.raises(MasteryError):
            level_midpoint(6)

    def test_entry_score_prefers_the_measured_score(self):
        assert entry_score(MasteryEntry(level=3, score=0.33)) == 0.33
        assert entry_score(MasteryEntry(level=3)) == pytest.approx(0.375)

    def test_online_table_needs_evidence_and_keeps_the_base(self):
        base = MasteryTable.from_scores({"a": 0.9, "b": 0.05})
        online = OnlineMastery()
        online.observe(["b"] * 10 + ["c"] * 2, [1.0] * 10 + [1.0] * 2)
        table = online_table(online, base, min_evidence=4, epoch=3)
        assert table.get("a") == base.get("a")  # no rollouts: unchanged
        assert table.get("b").score == pytest.approx(11 / 12) and table.get("b").epoch == 3
        assert "c" not in table  # 2 rollouts < min_evidence
        assert online_table(online, None, min_evidence=1).level_of("c") == 1

    # (probe score or None, online outcomes, weight, expected score or None)
    BLEND_CASES = [
        (0.8, [], 0.5, 0.8),  # no online evidence: the probe alone
        (0.8, [0.0] * 8, 0.0, 0.8),  # weight 0: the probe alone
        (0.8, [0.0] * 8, 1.0, 0.1),  # weight 1: the posterior mean (1 / 10)
        (0.8, [0.0] * 8, 0.25, 0.75 * 0.8 + 0.25 * 0.1),
        (None, [1.0] * 8, 0.5, 0.9),  # never probed: the posterior mean alone
        (None, [], 0.5, None),  # nothing known: not in the table (default level at lookup)
    ]

    @pytest.mark.parametrize(("probe", "outcomes", "weight", "expected"), BLEND_CASES)
    def test_blend(self, probe, outcomes, weight, expected):
        table = MasteryTable.from_scores({} if probe is None else {"e": probe})
        online = OnlineMastery()
        online.observe(["e"] * len(outcomes), outcomes)
        blended = blend_table(table, online, weight=weight, min_evidence=4)
        if expected is None:
            assert "e" not in blended
        else:
            assert blended.get("e").score == pytest.approx(expected)

    def test_blend_reads_level_only_entries_as_midpoints(self):
        table = MasteryTable({"e": MasteryEntry(level=4)})  # a released file: a level, no score
        online = OnlineMastery()
        online.observe(["e"] * 8, [1.0] * 8)
        entry = blend_table(table, online, weight=0.5, min_evidence=1).get("e")
        assert entry.score == pytest.approx(0.5 * 0.2 + 0.5 * 0.9) and entry.level == 2

    def test_blend_weight_out_of_range_raises(self):
        with pytest.raises(MasteryError):
            blend_table(None, OnlineMastery(), weight=1.5)


class TestConfig:
    def test_defaults(self):
        config = MasteryConfig()
        assert config.online_prior == (1.0, 1.0) and config.online_min_evidence == 8.0
        assert MasteryConfig.from_mapping({"online_prior": [2, 3]}).online_prior == (2.0, 3.0)

    @pytest.mark.parametrize("values", [
        {"online_weight": 1.5}, {"online_decay": 0.0}, {"online_prior": [1.0]}, {"online_prior": [0, 1]},
        {"online_min_evidence": -1}, {"refresh_every_steps": -1}, {"probe_timeout_s": 0},
        {"probe_max_concurrency": 0},
    ])
    def test_bad_values_name_the_key(self, values):
        with pytest.raises(ConfigError, match=f"karl.mastery.{next(iter(values))}"):
            MasteryConfig.from_mapping(values)
