"""``eval --compare``: paired bootstrap intervals and McNemar's exact test on constructed runs whose
answers are known, then the command end to end on folders and predictions files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from karl_verl.cli import main
from karl_verl.evaluation.compare import (
    RunCases,
    compare_group,
    compare_runs,
    mcnemar_exact,
    paired_bootstrap_interval,
)
from karl_verl.evaluation.runner import run_compare, run_eval

SEEN, UNSEEN = ("aircraft", "car"), ("dog",)


def run(label, correct, categories=None, levels=None, protocol="karl"):
    n = len(correct)
    categories = categories or ["aircraft"] * n
    return RunCases(label=label, protocol=protocol, question_ids=tuple(f"q{i}" for i in range(n)),
                    categories=tuple(categories), correct=np.array(correct, dtype=bool),
                    levels=None if levels is None else tuple(levels))


def test_mcnemar_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == mcnemar_exact(0, 10) == 2 / 2**10
    # 3 against 1 of 4 discordant: 2 * (C(4,0) + C(4,1)) / 16 = 10 / 16.
    assert mcnemar_exact(3, 1) == 0.625
    assert mcnemar_exact(2, 2) == 1.0  # 2 * 11/16 capped at 1


def test_identical_runs_differ_by_zero_with_interval_zero():
    correct = [True, False, True, True, False] * 20
    group = compare_group("overall", np.array(correct), np.array(correct))
    assert (group.difference, group.ci_low, group.ci_high, group.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (group.a_only, group.b_only) == (0, 0)


def test_one_run_right_wherever_the_other_is_wrong():
    a = np.array([True, False] * 6)
    group = compare_group("overall", a, ~a)
    # Every case is discordant: 6 for A, 6 for B; the difference is 0 and p = 1.
    assert (group.difference, group.a_only, group.b_only, group.p_value) == (0.0, 6, 6, 1.0)
    group = compare_group("overall", np.ones(12, dtype=bool), np.zeros(12, dtype=bool))
    # All 12 right in A only: difference 1 in every resample, p = 2 / 2**12.
    assert (group.difference, group.ci_low, group.ci_high) == (1.0, 1.0, 1.0)
    assert group.p_value == 2 / 4096


def test_bootstrap_is_seeded_and_its_width_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a = rng.random(1336) < 0.68
    b = np.where(rng.random(1336) < 0.8, a, rng.random(1336) < 0.67)
    first = paired_bootstrap_interval(a, b, rng=np.random.default_rng(5))
    assert first == paired_bootstrap_interval(a, b, rng=np.random.default_rng(5))
    assert first != paired_bootstrap_interval(a, b, rng=np.random.default_rng(6))
    d = a.astype(float) - b
    sd = d.std() / math.sqrt(d.size)
    assert first[0] < d.mean() < first[1]
    assert (first[1] - first[0]) == pytest.approx(2 * 1.96 * sd, rel=0.1)


@pytest.mark.parametrize("n, resamples, seed", [(1, 50, 0), (7, 300, 1), (40, 1000, 2), (1336, 20, 3)])
def test_vectorised_bootstrap_equals_a_plain_loop(n, resamples, seed, monkeypatch):
    import karl_verl.evaluation.compare as compare

    data = np.random.default_rng(seed + 100)
    a, b = data.random(n) < 0.6, data.random(n) < 0.5
    # A plain loop over resamples, case by case, from the same random stream.
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        picks = [int(rng.integers(0, n)) for _ in range(n)]
        diffs.append(sum(int(a[i]) - int(b[i]) for i in picks) / n)
    expected = tuple(float(v) for v in np.quantile(diffs, [0.025, 0.975]))
    monkeypatch.setattr(compare, "_CHUNK_ELEMENTS", 3 * n + 1)  # several chunks, one partial
    got = paired_bootstrap_interval(a, b, resamples=resamples, rng=np.random.default_rng(seed))
    assert got == pytest.approx(expected, abs=1e-12)  # quantile interpolation may round the last bit apart


def test_bootstrap_checks_its_arguments():
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap_interval(np.ones(3), np.ones(4), rng=np.random.default_rng())
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap_interval(np.ones(3), np.ones(3), resamples=0, rng=np.random.default_rng())
    assert all(math.isnan(v) for v in paired_bootstrap_interval(np.ones(0), np.ones(0), rng=np.random.default_rng()))


def test_compare_runs_pairs_by_question_id_and_splits_groups():
    categories = ["aircraft", "aircraft", "car", "dog", "dog"]
    a = run("A", [True, True, False, True, False], categories, levels=[1, 4, 2, 5, None])
    b = run("B", [True, False, False, False, False], categories, levels=[1, 4, 2, 5, None])
    # B in another order: pairing follows the question ids.
    order = [4, 2, 0, 3, 1]
    b = RunCases(label="B", protocol="karl", question_ids=tuple(b.question_ids[i] for i in order),
                 categories=tuple(categories[i] for i in order), correct=b.correct[order],
                 levels=tuple(b.levels[i] for i in order))
    result = compare_runs(a, b, SEEN, UNSEEN, resamples=200)
    by_name = {g.name: g for g in result.groups}
    assert [g.name for g in result.categories] == ["aircraft", "car", "dog"]
    assert (by_name["aircraft"].acc_a, by_name["aircraft"].acc_b, by_name["aircraft"].a_only) == (1.0, 0.5, 1)
    assert (by_name["seen"].n, by_name["unseen"].difference, by_name["overall"].difference) == (3, 0.5, 0.4)
    assert by_name["high"].n == 2 and by_name["high"].difference == 0.0
    assert by_name["low"].n == 2 and by_name["low"].a_only == 2  # the case with no level is left out
    assert by_name["unseen low"].n == 1 and by_name["seen high"].n == 2
    json.dumps(result.to_json())


def test_compare_runs_refuses_different_cases_or_protocols():
    with pytest.raises(ValueError, match="question_id 'q2' is only in A"):
        compare_runs(run("A", [True] * 3), run("B", [True] * 2), SEEN, UNSEEN)
    with pytest.raises(ValueError, match="scored the same way"):
        compare_runs(run("A", [True]), run("B", [True], protocol="released"), SEEN, UNSEEN)
    with pytest.raises(ValueError, match="'aircraft' in A but 'car' in B"):
        compare_runs(run("A", [True]), run("B", [True], ["car"]), SEEN, UNSEEN)


def _predictions(path, kvg, wrong=()):
    lines = []
    for qid, (_cat, _entity, boxes, *_rest) in kvg.CASES.items():
        x1, y1, x2, y2 = boxes[0]
        text = "no idea" if qid in wrong else f"<answer>({x1},{y1}),({x2},{y2})</answer>"
        lines.append(json.dumps({"question_id": qid, "response": text}) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_compare_folders_and_prediction_files_end_to_end(bench, tmp_path, kvg, capsys):
    good = _predictions(tmp_path / "good.jsonl", kvg)
    worse = _predictions(tmp_path / "worse.jsonl", kvg, wrong={"q1", "q2", "q7"})
    for name, path in (("a", good), ("b", worse)):
        run_eval(bench, tmp_path / name, predictions=path, protocol="released", progress=False)
    out = tmp_path / "cmp"
    code = main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                 "--resamples", "500", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "released protocol" in printed and "McNemar" in printed
    data = json.loads((out / "compare.json").read_text())
    assert data["protocol"] == "released" and data["resamples"] == 500
    assert data["overall"]["a_only"] == 3 and data["overall"]["b_only"] == 0
    assert data["overall"]["mcnemar_p"] == 0.25  # 2 / 2**3
    assert data["overall"]["difference"] == pytest.approx(3 / 11)
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # The prediction files scored here give the same comparison as the folders.
    again = run_compare(good, worse, tmp_path / "cmp2", bench=bench, protocol="released", resamples=500,
                        progress=False)
    assert again.comparison.to_json()["overall"] == data["overall"]


def test_compare_with_knowledge_tables(bench, tmp_path, kvg):
    good = _predictions(tmp_path / "good.jsonl", kvg)
    worse = _predictions(tmp_path / "worse.jsonl", kvg, wrong={"q1", "q3"})
    levels = {name: "mostly correct" if level <= 3 else "mostly incorrect" for name, level in kvg.LEVELS.items()}
    levels["B1"] = "completely incorrect"
    knowledge = kvg.write_knowledge(tmp_path / "k", ["A1", "A2"], levels, levels, levels)
    outcome = run_compare(good, worse, tmp_path / "cmp", bench=bench, knowledge_dir=knowledge, resamples=300,
                          progress=False)
    by_name = {g.name: g for g in outcome.comparison.knowledge}
    # q1 (A1, level 1) is high, q3 (A3, level 4) is low; both right in A only.
    assert (by_name["high"].a_only, by_name["low"].a_only, by_name["high"].b_only) == (1, 1, 0)
    assert by_name["high"].n + by_name["low"].n == 11
    assert "high" in outcome.format()


def test_compare_needs_the_bench_for_prediction_files(tmp_path, kvg):
    good = _predictions(tmp_path / "good.jsonl", kvg)
    with pytest.raises(ValueError, match="--bench"):
        run_compare(good, good, tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()
