"""KVG-Bench scoring and run comparison speed, on a synthetic 1,336-case benchmark.

* Scoring: every case read, boxed, IoU'd and aggregated (per category, seen / unseen / overall,
  high / low knowledge) under each protocol, from responses already in memory (image decoding
  and file reading excluded). Target: well under 1 s for either protocol.
* Comparison: two runs paired case by case, 10,000 paired bootstrap resamples and McNemar's exact
  test for every group (10 categories, 3 aggregates, 6 knowledge groups). Target: well under 5 s.

Responses mix what models write: well-formed answers, multi-line answers, JSON fences, prose in
parentheses, decimals, 0-1 relative boxes and misses, each with a few hundred characters of
reasoning.

    python benchmarks/bench_eval.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import time_side_by_side  # noqa: E402

NUM_CASES = 1336
REASONING = ("The image shows several similar objects. The one on the {side} has the distinguishing features "
             "recalled for this entity (shape, markings, proportions), while the others differ in {detail}. ")


def _response(rng: random.Random, box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = (v + rng.randint(-30, 30) for v in box)
    think = "<think>" + REASONING.format(side=rng.choice(["left", "right", "top"]),
                                         detail=rng.choice(["colour", "size", "texture"])) * rng.randint(1, 4)
    forms = [
        f"{think}</think><answer>({x1},{y1}),({x2},{y2})</answer>",
        f"{think}</think>\n<answer>\n({x1},{y1}),({x2},{y2})\n</answer>",
        f'{think}</think><answer>```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "x"}}]\n```</answer>',
        f"{think}So the answer is ({x1},{y1}),({x2},{y2})</think><answer>(the left one) ({x1}, {y1}), ({x2}, {y2})"
        "</answer>",
        f"{think}</think><answer>({x1 / 1000:.3f},{y1 / 1000:.3f}),({x2 / 1000:.3f},{y2 / 1000:.3f})</answer>",
        f"{think}</think><answer>[{x1}, {y1}, {x2}, {y2}]</answer>",
        f"{think}</think><answer>I cannot tell.</answer>",
    ]
    return rng.choice(forms)


def synthetic_bench(seed: int = 0):
    """Cases, responses and knowledge tables of a benchmark shaped like KVG-Bench (10 categories)."""
    from karl_verl.evaluation.bench import BenchCase
    from karl_verl.evaluation.knowledge import KnowledgeTables
    from karl_verl.evaluation.paper import SEEN_CATEGORIES, UNSEEN_CATEGORIES

    rng = random.Random(seed)
    categories = [*SEEN_CATEGORIES, *UNSEEN_CATEGORIES]
    entities = [f"entity {i}" for i in range(882)]
    cases, responses = [], {}
    for index in range(NUM_CASES):
        x1, y1 = rng.randint(0, 600), rng.randint(0, 600)
        box = (x1, y1, x1 + rng.randint(50, 390), y1 + rng.randint(50, 390))
        qid = f"q{index}"
        cases.append(BenchCase(question_id=qid, row=index + 1, question="Find", image=b"", width=1000, height=1000,
                               category=categories[index % len(categories)], entity=rng.choice(entities),
                               boxes=(tuple(float(v) for v in box),)))
        responses[qid] = _response(rng, box)
    levels = {entity: rng.randint(1, 5) for entity in entities}
    knowledge = KnowledgeTables(train_entities=frozenset(entities[::2]), directory=Path("synthetic"),
                                tables={"train": levels, "trainood": levels, "testood": levels})
    return cases, responses, knowledge


def bench_scoring(repeats: int = 5) -> dict[str, float]:
    from karl_verl.evaluation.bench import evaluate
    from karl_verl.evaluation.paper import SEEN_CATEGORIES, UNSEEN_CATEGORIES

    cases, responses, knowledge = synthetic_bench()

    def score(protocol: str):
        return evaluate(cases, responses, seen_categories=SEEN_CATEGORIES, unseen_categories=UNSEEN_CATEGORIES,
                        protocol=protocol, knowledge=knowledge)

    times = time_side_by_side({protocol: (lambda p=protocol: score(p)) for protocol in ("karl", "released")},
                              repeats=repeats)
    for protocol, seconds in times.items():
        accuracy = score(protocol)[0].overall.acc
        print(f"score {NUM_CASES} cases, {protocol:<8} protocol: {seconds * 1000:7.1f} ms "
              f"(Acc@0.5 {100 * accuracy:.2f}%; target well under 1 s)")
    print(f"released / karl scoring time: {times['released'] / times['karl']:.2f}x")
    return {"eval_score_s_karl": times["karl"], "eval_score_s_released": times["released"]}


def bench_compare(repeats: int = 3, resamples: int = 10_000) -> dict[str, float]:
    from karl_verl.evaluation.compare import RunCases, compare_runs
    from karl_verl.evaluation.paper import SEEN_CATEGORIES, UNSEEN_CATEGORIES

    rng = np.random.default_rng(0)
    categories = tuple(rng.choice([*SEEN_CATEGORIES, *UNSEEN_CATEGORIES], NUM_CASES))
    levels = tuple(int(v) for v in rng.integers(1, 6, NUM_CASES))
    a = rng.random(NUM_CASES) < 0.684
    b = np.where(rng.random(NUM_CASES) < 0.8, a, rng.random(NUM_CASES) < 0.669)
    ids = tuple(f"q{i}" for i in range(NUM_CASES))
    run_a = RunCases("A", "released", ids, categories, a, levels)
    run_b = RunCases("B", "released", ids, categories, b, levels)

    def compare():
        return compare_runs(run_a, run_b, SEEN_CATEGORIES, UNSEEN_CATEGORIES, resamples=resamples)

    seconds = time_side_by_side({"compare": compare}, repeats=repeats)["compare"]
    groups = len(compare().groups)
    print(f"compare {NUM_CASES} paired cases, {groups} groups x {resamples} resamples: {seconds:.2f} s "
          f"(target well under 5 s)")
    return {"eval_compare_s": seconds}


def main(repeats: int = 5) -> dict[str, float]:
    figures = bench_scoring(repeats)
    figures.update(bench_compare(max(1, repeats // 2)))
    return figures


if __name__ == "__main__":
    main()
