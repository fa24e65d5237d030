"""The synthetic KVG world: seeded, a knowledge gap by construction, exact boxes, files our readers take."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from karl_verl.boxes import entity_of, read_box_reference
from karl_verl.probe.questions import build_questions, load_probe_set
from karl_verl.world import PROBE_FILE, WorldConfig, _cell_box, build_world, colour_name, load_world

SMALL = WorldConfig(train_images=48, val_images=32, warmup_images=24, warmup_probe_per_entity=4,
                    probe_images_per_entity=4, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(SMALL, tmp_path_factory.mktemp("world"))


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(world, tmp_path):
    again = build_world(SMALL, tmp_path / "again")
    assert _digest(again.folder) == _digest(world.folder)
    other = build_world(WorldConfig(**{**vars(SMALL), "seed": 4}), tmp_path / "other")
    assert _digest(other.folder)["train.parquet"] != _digest(world.folder)["train.parquet"]


def test_entities_names_categories_and_knowledge_split(world):
    names = [e.name for e in world.entities]
    assert len(names) == len(set(names)) == SMALL.categories * SMALL.entities_per_category
    per_category = Counter(e.category for e in world.entities if e.known)
    assert set(per_category.values()) == {SMALL.known_per_category}
    assert len(per_category) == SMALL.categories
    for category in per_category:  # look-alikes: one shape per category, distinct colours and homes
        members = [e for e in world.entities if e.category == category]
        assert len({e.shape for e in members}) == 1
        assert len({e.colour for e in members}) == len(members)
        assert len({e.home_cell for e in members}) == len(members)
    config, entities = load_world(world.folder)
    assert config == SMALL and entities == world.entities


def _rows(path):
    return pq.read_table(path).to_pylist()


def _drawn_box(png: bytes, box_0_1000, size: int) -> tuple[int, int, int, int]:
    """Pixel bounding box of non-background pixels inside the stated box's cell."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    grey = (np.abs(pixels[..., 0] - pixels[..., 1]) < 3) & (np.abs(pixels[..., 1] - pixels[..., 2]) < 3)
    x1, y1, x2, y2 = (round(v * size / 1000) for v in box_0_1000)
    cell = SMALL.cell_size
    cx, cy = (x1 // cell) * cell, (y1 // cell) * cell
    ys, xs = np.nonzero(~grey[cy:cy + cell, cx:cx + cell])
    return cx + xs.min(), cy + ys.min(), cx + xs.max() + 1, cy + ys.max() + 1


def test_rows_are_kvg_rows_with_exact_boxes(world):
    for split in ("train", "val"):
        rows = _rows(world.files[split])
        assert len(rows) == getattr(SMALL, f"{split}_images")
        for row in rows:
            truth = row["reward_model"]["ground_truth"]
            info = row["extra_info"]
            assert entity_of(truth) == info["entity"] and info["entity"] in info["entities"]
            assert list(read_box_reference(truth)) == [float(v) for v in info["boxes"][0]]
            assert SMALL.objects_per_image[0] <= info["num_entities"] <= SMALL.objects_per_image[1]
            assert row["prompt"][0]["content"].startswith("<image>Find and give the bounding box of")
            drawn = _drawn_box(row["images"][0]["bytes"], info["boxes"][0], SMALL.canvas_size)
            stated = tuple(round(v * SMALL.canvas_size / 1000) for v in info["boxes"][0])
            assert max(abs(a - b) for a, b in zip(drawn, stated, strict=True)) <= 1, (drawn, stated)
    truths = [row["reward_model"]["ground_truth"] for row in _rows(world.files["val"])]
    assert len(truths) == len(set(truths))  # validations are paired case by case on this


def test_every_entity_is_a_target_and_mostly_at_home(tmp_path):
    world = build_world(WorldConfig(train_images=400, val_images=8, warmup_images=8, seed=1), tmp_path)
    home = {e.name: e.home_cell for e in world.entities}
    rows = _rows(world.files["train"])
    assert {row["extra_info"]["entity"] for row in rows} == set(home)
    at_home = []
    for row in rows:
        x1, y1 = row["extra_info"]["boxes"][0][:2]
        cell = int(y1 >= 500) * 2 + int(x1 >= 500)
        at_home.append(cell == home[row["extra_info"]["entity"]])
    # The query is placed first, so it is home with probability home_bias (0.8): 4 binomial sd.
    assert abs(np.mean(at_home) - 0.8) < 4 * np.sqrt(0.8 * 0.2 / len(rows))


def test_warmup_shows_and_names_known_entities_only(world):
    known = set(world.known)
    records = [json.loads(line) for line in world.files["warmup"].read_text().splitlines()]
    kinds = Counter(r["kind"] for r in records)
    assert kinds["grounding"] == SMALL.warmup_images
    assert kinds["probe"] == SMALL.warmup_probe_per_entity * len(known)
    for record in records:
        assert record["entity"] in known
        assert (world.folder / "images" / record["image"]).is_file()
        if record["kind"] == "grounding":
            assert set(record["entities"]) <= known
            assert record["target"].startswith("<think>I see it.</think><answer>(")
        else:
            assert record["target"] in "ABCD" and len(record["target"]) == 1
            assert f"{record['target']}. {record['entity']}\n" in record["prompt"]


def test_probe_set_gives_four_choice_questions_over_all_entities(world):
    items = load_probe_set(world.folder / PROBE_FILE)
    assert Counter(i.entity for i in items) == {e.name: SMALL.probe_images_per_entity for e in world.entities}
    questions = build_questions(items, per_entity=SMALL.probe_images_per_entity, seed=0)
    category = {e.name: e.category for e in world.entities}
    for question in questions:
        assert len(set(question.options)) == 4
        assert {category[o] for o in question.options} == {question.category}


@pytest.mark.parametrize(("field", "value"), [
    ("entities_per_category", 3), ("known_per_category", 4), ("objects_per_image", (1, 3)),
    ("home_bias", 1.5), ("categories", 0), ("margin_range", (8, 20)),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WorldConfig(**{field: value})


def test_unreadable_world_file_names_the_file(tmp_path):
    (tmp_path / "world.json").write_text("{")
    with pytest.raises(ValueError, match="world.json"):
        load_world(tmp_path)


def test_warmup_answers_give_the_objects_cell_and_clear_the_reward_threshold(world, tmp_path):
    """warmup_boxes="cell": each answer is the middle-margin box of the cell the object stands in,
    the same digits for every drawing in a cell, and every drawn box in it scores IoU >= 0.84."""
    import re

    from karl_verl.boxes import box_iou
    from karl_verl.world import cell_answer_box

    answers = {}
    for record in map(json.loads, world.files["warmup"].read_text().splitlines()):
        if record["kind"] == "grounding":
            numbers = [int(v) for v in re.findall(r"\d+", record["target"].split("<answer>")[1])]
            answers[tuple(numbers)] = answers.get(tuple(numbers), 0) + 1
    assert 1 < len(answers) <= SMALL.grid ** 2
    assert all(answer == cell_answer_box(SMALL, answer) for answer in answers)
    rng = random.Random(0)
    scale = 1000 / SMALL.canvas_size
    for cell in range(SMALL.grid ** 2):
        for _ in range(50):
            drawn = tuple(round(v * scale) for v in _cell_box(SMALL, cell, rng))
            answer = cell_answer_box(SMALL, drawn)
            assert box_iou(answer, drawn) >= 0.84
    exact = build_world(replace(SMALL, warmup_boxes="exact"), tmp_path / "exact")
    targets = {json.loads(line)["target"] for line in exact.files["warmup"].read_text().splitlines()}
    assert len(targets) > 4 * SMALL.grid ** 2  # the drawn boxes: many margins per cell


def test_partly_known_entities_are_shown_less_and_unknown_ones_never(tmp_path):
    config = replace(SMALL, categories=2, entities_per_category=4, known_per_category=1, partial_per_category=2,
                     partial_exposure=0.25, warmup_images=400, warmup_probe_per_entity=8)
    world = build_world(config, tmp_path / "partial")
    assert len(world.known) == 2 and len(world.partial) == 4 and len(world.unknown) == 2
    assert not set(world.known) & set(world.partial)
    assert "2 known to the warm-up, 4 partly known, 2 unknown" in world.format()
    records = [json.loads(line) for line in world.files["warmup"].read_text().splitlines()]
    shown_in_images = {name for r in records if r["kind"] == "grounding" for name in r["entities"]}
    assert shown_in_images == set(world.known) | set(world.partial)  # unknown looks are never shown
    queries = Counter(r["entity"] for r in records if r["kind"] == "grounding")
    per_known = np.mean([queries[name] for name in world.known])
    per_partial = np.mean([queries[name] for name in world.partial])
    # Expected ratio 0.25 (400 draws: a known entity about 133 times, a partial one about 33).
    assert 0.15 < per_partial / per_known < 0.35
    questions = Counter(r["entity"] for r in records if r["kind"] == "probe")
    assert {questions[name] for name in world.known} == {8} and {questions[name] for name in world.partial} == {2}
    rows = pq.read_table(world.files["train"]).to_pylist()
    assert {r["extra_info"]["entity"] for r in rows if r["extra_info"]["partial"]} == set(world.partial)
    with pytest.raises(ValueError, match="partial_per_category: expected 0..3"):
        replace(config, partial_per_category=4)
    with pytest.raises(ValueError, match="partial_exposure: expected a share in"):
        replace(config, partial_exposure=0.0)


def test_stream_warmup_renders_both_streams_and_leaves_the_world_as_it_was(world):
    from karl_verl.boxes import answer_span
    from karl_verl.ivgr import GROUNDED, TEXTUAL, extract_reasoning, render_prompt
    from karl_verl.judge import rule_score
    from karl_verl.world import STREAM_WARMUP_FILE, write_stream_warmup

    before = _digest(world.folder)
    templates = {TEXTUAL: "{question} Words only."}
    path = write_stream_warmup(world, templates)
    assert path == world.folder / STREAM_WARMUP_FILE == world.files["warmup_ivgr"]
    after = _digest(world.folder)
    assert {name: digest for name, digest in after.items() if name != STREAM_WARMUP_FILE} == before
    plain = [json.loads(line) for line in world.files["warmup"].read_text().splitlines()]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    grounding = [r for r in plain if r["kind"] == "grounding"]
    assert records[:len(plain)] == plain and len(records) == len(plain) + 2 * len(grounding)
    colours = {e.name: e.colour for e in world.entities}
    streamed = records[len(plain):]
    for source, grounded, textual in zip(grounding, streamed[::2], streamed[1::2], strict=True):
        assert (grounded["stream"], textual["stream"]) == (GROUNDED, TEXTUAL)
        assert grounded["prompt"] == render_prompt(GROUNDED, source["prompt"])
        assert textual["prompt"] == source["prompt"] + " Words only."
        # The plain example's answer, after a reasoning that names the entity; only the grounded one writes the box.
        answer = answer_span(source["target"])
        assert answer_span(grounded["target"]) == answer_span(textual["target"]) == answer
        box = "[" + answer.replace("(", "").replace(")", "") + "]"
        reasoning, words = extract_reasoning(grounded["target"]), extract_reasoning(textual["target"])
        assert reasoning.startswith(source["entity"] + " is the ") and box in reasoning
        assert not any(c.isdigit() for c in words) and words.rstrip(".") == reasoning.split(" [")[0]
        assert rule_score(reasoning, words) == 1.0 and colour_name(colours[source["entity"]]) in words
    only = [json.loads(line) for line in write_stream_warmup(world, include_plain=False).read_text().splitlines()]
    assert len(only) == 2 * len(grounding) and all("stream" in r for r in only)
