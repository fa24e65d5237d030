"""A constructed KVG-Bench case set whose figures are computed by hand in the tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest


def png(size: tuple[int, int] = (280, 280), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def answer(entity: str, *boxes: tuple[int, int, int, int]) -> str:
    marks = "".join(f"<|box_start|>({b[0]},{b[1]}),({b[2]},{b[3]})<|box_end|>" for b in boxes)
    return f"<|object_ref_start|>{entity}<|object_ref_end|>{marks}"


def think(answer_text: str) -> str:
    return f"<think>looking</think><answer>{answer_text}</answer>"


SQUARE = (0, 0, 100, 100)

#: question id -> (category, entity, ground-truth boxes, response or None for a missing prediction,
#: IoU, correct, parsed); every IoU below is worked out by hand in the comment beside it.
CASES: dict[str, tuple] = {
    "q1": ("aircraft", "A1", [SQUARE], think("(0,0),(100,100)"), 1.0, True, True),  # identical
    "q2": ("aircraft", "A2", [SQUARE], think("(0,0),(100,50)"), 0.5, True, True),  # 5000/10000: tie, inclusive
    "q3": ("aircraft", "A3", [SQUARE], think("(0,0),(100,49)"), 0.49, False, True),  # 4900/10000
    "q4": ("car", "C1", [SQUARE, (500, 500, 600, 600)], think("(500,500),(600,600)"), 1.0, True, True),  # best GT
    "q5": ("car", "C2", [(0, 0, 200, 200)], None, 0.0, False, False),  # no prediction
    "q6": ("bird", "B1", [SQUARE], "I cannot tell which bird this is.", 0.0, False, False),  # unparseable
    "q7": ("dog", "D1", [(100, 100, 300, 300)], think("(200,100),(400,300)"), 1 / 3, False, True),  # 2e4 / 6e4
    # No answer tags: the whole text is read; a JSON bbox_2d in a fence, 0-1000.
    "q8": ("dog", "D2", [(0, 0, 1000, 1000)], '```json\n[{"bbox_2d": [0, 0, 500, 1000], "label": "dog"}]\n```',
           0.5, True, True),
    # A box outside the answer span is ignored; the one inside misses.
    "q9": ("flower", "F1", [SQUARE], "(0,0),(100,100) <answer>(200,200),(300,300)</answer>", 0.0, False, True),
    "q10": ("landmark", "L1", [SQUARE], think("[0, 0, 100, 100]"), 1.0, True, True),
    "q11": ("landmark", "L2", [SQUARE], think("(0, 0), (100, 100)"), 1.0, True, True),
}

#: Mastery levels of the entities; B1 is left out of the table on purpose.
LEVELS = {"A1": 1, "A2": 2, "A3": 4, "C1": 5, "C2": 3, "D1": 4, "D2": 2, "F1": 5, "L1": 1, "L2": 4}


def write_bench(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_knowledge(folder: Path, train_entities, train: dict, trainood: dict, testood: dict) -> Path:
    """The released knowledge folder: the training-entity list and three tables of level names."""
    from karl_verl.evaluation.knowledge import TABLE_FILES, TRAIN_ENTITIES_FILE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAIN_ENTITIES_FILE).write_text(json.dumps([{"entity_name": e} for e in train_entities]))
    for key, table in (("train", train), ("trainood", trainood), ("testood", testood)):
        (folder / TABLE_FILES[key]).write_text(
            json.dumps({e: {"knowledge_category": name, "acc": 0.5} for e, name in table.items()}))
    return folder


def bench_rows() -> list[dict]:
    return [
        {"question_id": qid, "question": f"Find and give the bounding box of <|object_ref_start|>{entity}"
                                         "<|object_ref_end|>",
         "image": {"bytes": png(), "path": None}, "answer": answer(entity, *boxes), "category": category}
        for qid, (category, entity, boxes, *_rest) in CASES.items()
    ]


@pytest.fixture
def bench(tmp_path) -> Path:
    return write_bench(tmp_path / "bench.parquet", bench_rows())


@pytest.fixture
def predictions(tmp_path) -> Path:
    lines = [{"question_id": qid, "response": case[3]} for qid, case in CASES.items() if case[3] is not None]
    lines.append({"question_id": "not-in-bench", "response": "(1,1),(2,2)"})
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def mastery(tmp_path) -> Path:
    from karl_verl.mastery import LEVEL_NAMES

    path = tmp_path / "mastery.json"
    path.write_text(json.dumps({e: {"knowledge_category": LEVEL_NAMES[k - 1]} for e, k in LEVELS.items()}),
                    encoding="utf-8")
    return path


@pytest.fixture
def kvg():
    """Helpers for tests (conftest modules are not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(CASES=CASES, LEVELS=LEVELS, png=png, answer=answer, think=think,
                                 write_bench=write_bench, bench_rows=bench_rows,
                                 write_knowledge=write_knowledge)
