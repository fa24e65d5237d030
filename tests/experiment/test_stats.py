"""Per-case statistics of the experiment: pairing verl's validation dumps and the paired intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from karl_verl.data.prompts import ground_truth
from karl_verl.experiment.stats import by_level, mean_by_level, paired_difference, read_validation


def _dump(path, outcomes: dict[tuple[str, int], float]):
    lines = [json.dumps({"input": "x", "output": "y", "gts": ground_truth(entity, (i, i, i + 10, i + 10)),
                         "score": acc, "acc": acc, "iou": 0.8 * acc, "uid": f"{i}_0_0"})
             for (entity, i), acc in outcomes.items()]
    np.random.default_rng(0).shuffle(lines)  # verl's dump order follows random uids
    path.write_text("\n".join(lines) + "\n")
    return read_validation(path)


def test_pairs_by_ground_truth_whatever_the_order(tmp_path):
    cases = {("Kavo", i): float(i % 2) for i in range(20)}
    a, b = _dump(tmp_path / "a.jsonl", cases), _dump(tmp_path / "b.jsonl", cases)
    same = paired_difference(a, b)
    assert (same.difference, same.low, same.high, same.p_mcnemar) == (0.0, 0.0, 0.0, 1.0)
    assert not same.excludes_zero


def test_a_rise_on_every_case_has_an_interval_above_zero(tmp_path):
    before = _dump(tmp_path / "0.jsonl", {("Kavo", i): 0.0 for i in range(12)})
    after = _dump(tmp_path / "20.jsonl", {("Kavo", i): 1.0 for i in range(12)})
    rise = paired_difference(after, before)
    assert rise.difference == 1.0 and rise.low == 1.0 and rise.excludes_zero
    assert rise.p_mcnemar == 2 / 2**12  # eval --compare's exact test
    iou = paired_difference(after, before, metric="iou", resamples=200)
    assert iou.difference == pytest.approx(0.8) and iou.low > 0 and iou.p_mcnemar is None


def test_by_level_groups_cases_by_entity_level(tmp_path):
    before = _dump(tmp_path / "0.jsonl", {("Kavo", 1): 1.0, ("Kavo", 2): 1.0, ("Mirel", 3): 0.0, ("Mirel", 4): 0.0})
    after = _dump(tmp_path / "9.jsonl", {("Kavo", 1): 1.0, ("Kavo", 2): 1.0, ("Mirel", 3): 1.0, ("Mirel", 4): 1.0})
    groups = {d.group: d for d in by_level(after, before, {"Kavo": 1, "Mirel": 5}, seed=1)}
    assert set(groups) == {"all", "level_1", "level_5"}
    assert groups["level_1"].difference == 0.0 and groups["level_5"].difference == 1.0
    assert groups["all"].difference == 0.5 and groups["all"].cases == 4
    assert mean_by_level(after, {"Kavo": 1, "Mirel": 5}) == {"all": 1.0, "level_1": 1.0, "level_5": 1.0}


def test_unpaired_or_duplicated_cases_are_refused(tmp_path):
    a = _dump(tmp_path / "a.jsonl", {("Kavo", 1): 1.0})
    b = _dump(tmp_path / "b.jsonl", {("Kavo", 2): 1.0})
    with pytest.raises(ValueError, match="unpaired"):
        paired_difference(a, b)
    path = tmp_path / "dup.jsonl"
    path.write_text((tmp_path / "a.jsonl").read_text() * 2)
    with pytest.raises(ValueError, match=r"dup.jsonl, line 2: .*appears 2 times, expected 1"):
        read_validation(path)
    with pytest.raises(ValueError, match=r"dup.jsonl: 1 ground truth\(s\) with fewer than 3 answers"):
        read_validation(path, samples=3)
    path.write_text('{"gts": "x"}\n')
    with pytest.raises(ValueError, match=r"dup.jsonl, line 1"):
        read_validation(path)


def test_sampled_validation_averages_each_cases_answers_and_tests_by_sign_flips(tmp_path):
    """4 answers per case: a case's acc is its rate; the rise gets a bootstrap and a sign-flip p, not McNemar."""
    def dump(name, rate_of):
        lines = [json.dumps({"gts": ground_truth("Kavo", (i, i, i + 10, i + 10)), "acc": float(k < rate_of(i) * 4),
                             "iou": 0.8 * float(k < rate_of(i) * 4)})
                 for i in range(30) for k in range(4)]
        np.random.default_rng(1).shuffle(lines)
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return read_validation(tmp_path / name, samples=4)

    before = dump("0.jsonl", lambda i: 0.25)
    after = dump("20.jsonl", lambda i: 0.5 if i % 3 else 0.25)
    assert {case.acc for case in after.values()} == {0.25, 0.5} and len(after) == 30
    rise = paired_difference(after, before)
    assert rise.p_test == "sign-flip" and rise.difference == pytest.approx(0.25 * 20 / 30)
    assert rise.low > 0 and rise.p_mcnemar < 0.001 and "sign-flip p=" in rise.format()
    same = paired_difference(before, before)
    assert (same.difference, same.low, same.high, same.p_mcnemar) == (0.0, 0.0, 0.0, 1.0)
