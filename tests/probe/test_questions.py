"""Probe set loading and question building (pure, CPU)."""

from __future__ import annotations

import ast
import base64
from collections import Counter
from pathlib import Path

import pytest

from karl_verl.probe.questions import (
    LETTERS,
    ProbeError,
    ProbeItem,
    build_questions,
    format_prompt,
    load_probe_set,
    probe_items_from_records,
)

ENTITIES = {
    "aircraft": ["Airbus A320", "Boeing 747", "Cessna 172", "Sukhoi Su-30"],
    "car": ["Audi A4", "BMW M3", "Fiat 500", "Tesla Model 3", "Volvo XC90"],
}


def _items(entities=ENTITIES, per=3, composite=()) -> list[ProbeItem]:
    return [
        ProbeItem(name, category, b"img", f"{name}-{k}", tuple(composite))
        for category, names in entities.items()
        for name in names
        for k in range(per)
    ]


# --- loading ------------------------------------------------------------------------------------


def test_load_parquet_and_jsonl_agree(tmp_path, probe_parquet, probe_kit):
    from_parquet = load_probe_set(probe_parquet)
    rows = probe_kit.rows()
    for row in rows:  # JSON holds bytes as base64 text
        row["image"] = {"bytes": base64.b64encode(row["image"]["bytes"]).decode()}
    from_jsonl = load_probe_set(probe_kit.write_jsonl(tmp_path / "probe.jsonl", rows))
    assert from_parquet == from_jsonl
    assert len(from_parquet) == 18 and from_parquet[0].entity == "Airbus A320"
    assert from_parquet[0].image == probe_kit.png_bytes(1) and from_parquet[0].image_id == "aircraft-1-0"


def test_relative_image_paths_resolve_against_the_probe_file(tmp_path, probe_kit):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(probe_kit.png_bytes(1))
    path = probe_kit.write_jsonl(tmp_path / "p.jsonl", [
        {"entity": "X", "category": "c", "image": "imgs/a.png"},
        {"entity": "Y", "category": "c", "image": {"path": "imgs/a.png"}, "entities_in_image": ["X", "Y"]},
    ])
    items = load_probe_set(path)
    assert items[0].image == str((tmp_path / "imgs" / "a.png").resolve()) == items[1].image
    assert items[0].image_id == "row1" and items[1].entities_in_image == ("X", "Y")


def _png_base64() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG = _png_base64()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"category": "c", "image": "x"}, "row 2, field 'entity'"),
        ({"entity": " ", "category": "c", "image": "x"}, "row 2, field 'entity'"),
        ({"entity": "e", "image": {"bytes": PNG}}, "row 2, field 'category'"),
        ({"entity": "e", "category": "c", "image": {"bytes": "aGk="}}, "row 2, field 'image': not a readable image"),
        ({"entity": "e", "category": "c"}, "row 2, field 'image'"),
        ({"entity": "e", "category": "c", "image": "missing.png"}, "row 2, field 'image': image file not found"),
        ({"entity": "e", "category": "c", "image": {"bytes": "%%%"}}, "row 2, field 'image': 'bytes' is text"),
        ({"entity": "e", "category": "c", "image": {"other": 1}}, "row 2, field 'image'"),
        ({"entity": "e", "category": "c", "image": {"bytes": PNG}, "entities_in_image": "e"},
         "row 2, field 'entities_in_image'"),
        ({"entity": "e", "category": "c", "image": {"bytes": PNG}, "image_id": ""}, "row 2, field 'image_id'"),
    ],
)
def test_row_errors_name_file_row_and_field(tmp_path, probe_kit, row, message):
    good = {"entity": "ok", "category": "c", "image": {"bytes": PNG}}
    path = probe_kit.write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ProbeError, match=message) as info:
        load_probe_set(path)
    assert str(path) in str(info.value)


def test_file_level_errors(tmp_path, probe_kit):
    with pytest.raises(ProbeError, match="not found"):
        load_probe_set(tmp_path / "nope.parquet")
    (tmp_path / "p.csv").write_text("x")
    with pytest.raises(ProbeError, match="unknown probe set format"):
        load_probe_set(tmp_path / "p.csv")
    (tmp_path / "p.jsonl").write_text('{"entity": "e"}\n{broken\n')
    with pytest.raises(ProbeError, match=r"p.jsonl: line 2: invalid JSON"):
        load_probe_set(tmp_path / "p.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ProbeError, match="no rows"):
        load_probe_set(tmp_path / "e.jsonl")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(ProbeError, match="cannot read parquet"):
        load_probe_set(tmp_path / "b.parquet")
    probe_kit.write_parquet(tmp_path / "n.parquet", [{"entity": "e", "category": None, "image": b"x"}])
    with pytest.raises(ProbeError, match="row 1, field 'category'"):
        load_probe_set(tmp_path / "n.parquet")


# --- questions ----------------------------------------------------------------------------------


def test_prompt_template():
    prompt = format_prompt("car", ["a", "b", "c", "d"])
    assert prompt.startswith("<image>What is the car in the image?\nA. a\nB. b\n")
    assert prompt.endswith("D. d\nAnswer with the letter only.") and prompt.count("<image>") == 1
    with pytest.raises(ProbeError, match="exactly 4 options"):
        format_prompt("car", ["a", "b", "c"])


def test_questions_are_well_formed():
    questions = build_questions(_items(per=3), seed=1)
    assert len(questions) == 27 and len({q.question_id for q in questions}) == 27
    for q in questions:
        assert len(q.options) == 4 and len(set(q.options)) == 4
        assert q.options[LETTERS.index(q.answer_letter)] == q.entity
        assert all(option in ENTITIES[q.category] for option in q.options)  # same-category distractors
        assert q.prompt == format_prompt(q.category, q.options)


def test_per_entity_cap_and_determinism():
    items = _items(per=7)
    questions = build_questions(items, per_entity=5, seed=3)
    assert Counter(q.entity for q in questions) == {e: 5 for names in ENTITIES.values() for e in names}
    assert build_questions(items, per_entity=5, seed=3) == questions
    assert build_questions(items, per_entity=5, seed=4) != questions
    assert len(build_questions(items, per_entity=50)) == 63


@pytest.mark.parametrize("per", [1, 3, 4, 6, 9])
def test_answer_letters_are_balanced_per_entity_and_overall(per):
    questions = build_questions(_items(per=per), seed=per)
    overall = Counter(q.answer_letter for q in questions)
    assert max(overall.values()) - min(overall.get(letter, 0) for letter in LETTERS) <= 1
    for entity in {q.entity for q in questions}:
        counts = Counter(q.answer_letter for q in questions if q.entity == entity)
        assert max(counts.values()) - min(counts.get(letter, 0) for letter in LETTERS) <= 1


def test_answer_letter_sequence_is_shuffled():
    letters = "".join(q.answer_letter for q in build_questions(_items(per=12), seed=0) if q.entity == "BMW M3")
    assert letters not in ("ABCD" * 3, "BCDA" * 3, "CDAB" * 3, "DABC" * 3)


def test_composite_image_entities_come_first():
    items = _items(per=1) + [
        ProbeItem("Audi A4", "car", b"c", "composite-1", ("Audi A4", "Boeing 747", "Fiat 500", "Cessna 172")),
    ]
    questions = [q for q in build_questions(items, seed=0) if q.question_id == "composite-1::Audi A4"]
    assert len(questions) == 1
    assert set(questions[0].options) == {"Audi A4", "Boeing 747", "Fiat 500", "Cessna 172"}
    many = [ProbeItem("Audi A4", "car", b"c", "c2", ("BMW M3", "Fiat 500", "Volvo XC90", "Tesla Model 3", "Audi A4"))]
    for q in build_questions(_items(per=1) + many, seed=5):
        if q.question_id == "c2::Audi A4":
            assert set(q.options) - {"Audi A4"} <= {"BMW M3", "Fiat 500", "Volvo XC90", "Tesla Model 3"}


def test_small_category_is_an_error_by_default():
    entities = {**ENTITIES, "dog": ["Beagle", "Pug"]}
    with pytest.raises(ProbeError, match=r"'dog' has 2: \['Beagle', 'Pug'\].*on_small_category='global'"):
        build_questions(_items(entities))


def test_small_category_global_fallback_keeps_four_options():
    entities = {**ENTITIES, "dog": ["Beagle", "Pug"]}
    questions = build_questions(_items(entities), on_small_category="global", seed=2)
    dogs = [q for q in questions if q.category == "dog"]
    assert dogs and all(len(set(q.options)) == 4 for q in dogs)
    for q in dogs:
        assert {"Beagle", "Pug"} <= set(q.options)  # the same category first
    assert all(set(q.options) <= set(ENTITIES[q.category]) for q in questions if q.category != "dog")


def test_other_build_errors():
    with pytest.raises(ProbeError, match="at least 4"):
        build_questions(_items({"c": ["a", "b", "c"]}), on_small_category="global")
    with pytest.raises(ProbeError, match="two categories"):
        build_questions(_items() + [ProbeItem("BMW M3", "aircraft", b"x", "i")])
    with pytest.raises(ProbeError, match="on_small_category"):
        build_questions(_items(), on_small_category="drop")
    with pytest.raises(ProbeError, match="per_entity"):
        build_questions(_items(), per_entity=0)


def test_duplicate_image_ids_get_unique_question_ids():
    items = _items(per=1) + [ProbeItem("BMW M3", "car", b"y", "BMW M3-0")]
    ids = [q.question_id for q in build_questions(items)]
    assert len(ids) == len(set(ids)) and "BMW M3-0::BMW M3#2" in ids


def test_records_error_names_memory_source():
    with pytest.raises(ProbeError, match="<memory>: row 1"):
        probe_items_from_records([["not", "a", "dict"]])


@pytest.mark.parametrize("module", ["questions", "scoring", "runner"])
def test_probe_modules_import_no_heavy_frameworks(module):
    source = Path(__file__).parents[2] / "karl_verl" / "probe" / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "verl", "ray", "transformers", "vllm"}


def test_reads_the_probe_set_written_by_data_compose(tmp_path, probe_kit):
    # Column names of karl_verl.data.compose.PROBE_COLUMNS (extra columns are ignored).
    rows = [
        {"entity": e, "category": "car", "image": {"bytes": probe_kit.png_bytes(i)}, "image_width": 40,
         "image_height": 36, "box": [0, 0, 1000, 1000], "source_id": f"src-{i}", "co_entities": ["BMW M3"],
         "split": "train"}
        for i, e in enumerate(["Audi A4", "Fiat 500"])
    ]
    items = load_probe_set(probe_kit.write_parquet(tmp_path / "probe.parquet", rows))
    assert [(i.image_id, i.entities_in_image) for i in items] == [("src-0", ("BMW M3",)), ("src-1", ("BMW M3",))]
    rows[0]["co_entities"] = "BMW M3"
    with pytest.raises(ProbeError, match="row 1, field 'co_entities'"):
        probe_items_from_records(rows)


def test_thin_entities_counts_questions_per_entity():
    from karl_verl.probe.questions import thin_entities

    questions = build_questions(_items(), per_entity=50)
    counts = {}
    for question in questions:
        counts[question.entity] = counts.get(question.entity, 0) + 1
    assert thin_entities(questions, minimum=10**6) == dict(sorted(counts.items(), key=lambda kv: (kv[1], kv[0])))
    assert thin_entities(questions, minimum=1) == {}


def test_small_category_error_carries_the_categories():
    from karl_verl.probe.questions import SmallCategoryError

    with pytest.raises(SmallCategoryError) as raised:
        build_questions(_items({"dog": ["Beagle", "Pug"], "car": ["a", "b", "c", "d"]}))
    assert raised.value.categories == {"dog": ["Beagle", "Pug"]}
    assert "pass --flag" in raised.value.explain("--flag")
