"""``data compose``: layouts, exact box remapping (checked on the pixels), k, determinism, probe set."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from karl_verl.cli import main
from karl_verl.data.compose import (
    LAYOUTS,
    PROBE_COLUMNS,
    ComposeConfig,
    Placement,
    compose_dataset,
    parse_k_distribution,
    plan_layout,
    remap_box,
)


def _colour_bbox(image_bytes: bytes, colour: tuple[int, int, int], tolerance: int = 40) -> tuple[int, ...] | None:
    """Pixel bounding box (exclusive end) of the pixels within ``tolerance`` of ``colour``."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB")).astype(int)
    mask = (np.abs(pixels - np.array(colour)).max(axis=2) <= tolerance)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_boxes_land_on_the_drawn_rectangles(layout, single_entity_set, tmp_path, palette):
    config = ComposeConfig(num_images=4, layouts=(layout,), tile_size=80, queries_per_image=0, seed=3,
                           image_format="png")
    summary = compose_dataset([single_entity_set.annotations], tmp_path / "out", config, progress=False)
    rows = pq.read_table(tmp_path / "out" / "grounding.parquet").to_pylist()
    assert summary.per_layout == {layout: 4}
    assert len(rows) == summary.rows == sum(k * n for k, n in summary.per_k.items())
    for row in rows:
        extra = row["extra_info"]
        width, height = extra["image_width"], extra["image_height"]
        image = row["images"][0]["bytes"]
        found = _colour_bbox(image, palette[extra["entity"]])
        [grid_box] = extra["boxes"]
        expected = (grid_box[0] * width / 1000, grid_box[1] * height / 1000,
                    grid_box[2] * width / 1000, grid_box[3] * height / 1000)
        # Resampling softens each edge by at most a pixel; the 0-1000 grid adds under half a pixel here.
        assert found == pytest.approx(expected, abs=1.5), (layout, extra["entity"])
        assert extra["layout"] == layout
        assert extra["entity"] in extra["entities"] and len(set(extra["entities"])) == extra["num_entities"]


def test_whole_image_box_when_a_source_has_none(tmp_path, make_image, jsonl, palette):
    records = []
    for i, entity in enumerate(["Fiat 500", "Mini Cooper", "Tesla Model 3"]):
        (tmp_path / f"{i}.png").write_bytes(make_image((40 + 10 * i, 30), None, palette[entity]))
        records.append({"image": f"{i}.png", "entity": entity, "category": "car"})
    path = jsonl(tmp_path / "food_like.jsonl", records)
    config = ComposeConfig(num_images=3, layouts=("horizontal",), tile_size=60, queries_per_image=0,
                           k_weights={3: 1}, image_format="png")
    summary = compose_dataset([path], tmp_path / "out", config, progress=False)
    # said in the summary: a misnamed box column would look exactly like this
    assert summary.whole_image_sources == 3 and "3 of 3 source images had no box" in summary.format()
    for row in pq.read_table(tmp_path / "out" / "grounding.parquet").to_pylist():
        extra = row["extra_info"]
        found = _colour_bbox(row["images"][0]["bytes"], palette[extra["entity"]])
        x1, y1, x2, y2 = extra["boxes"][0]
        assert (y1, y2) == (0, 1000)
        assert found == pytest.approx((x1 * extra["image_width"] / 1000, 0, x2 * extra["image_width"] / 1000,
                                       extra["image_height"]), abs=1.0)


def test_k_entities_distinct_and_from_one_category(single_entity_set, tmp_path):
    config = ComposeConfig(num_images=30, k_weights=parse_k_distribution("2:1,3:1,4:1"), seed=1)
    summary = compose_dataset([single_entity_set.annotations], tmp_path / "out", config, progress=False)
    rows = pq.read_table(tmp_path / "out" / "grounding.parquet").to_pylist()
    assert set(summary.per_k) <= {2, 3, 4} and sum(summary.per_k.values()) == 30
    assert summary.whole_image_sources == 0 and "had no box" not in summary.format()
    # car has 3 entities: never k = 4 there, and the summary says so.
    assert all(r["extra_info"]["num_entities"] <= 3 for r in rows if r["extra_info"]["category"] == "car")
    assert summary.max_k == 4 and summary.k_out_of_reach.get("car") == 3
    assert "warning: k up to 4 was asked for" in summary.format() and "car (3)" in summary.format()
    assert len(rows) == 30  # one query per composite by default
    for row in rows:
        extra = row["extra_info"]
        assert len(extra["entities"]) == len(set(extra["entities"])) == extra["num_entities"]
        assert row["data_source"] == f"kvg/{extra['category']}"
        assert extra["composite_id"] in range(30)
    assert [r["extra_info"]["index"] for r in rows] == list(range(30))


def test_k_distribution_is_followed(single_entity_set, tmp_path):
    config = ComposeConfig(num_images=200, k_weights={2: 3, 3: 1}, seed=5, tile_size=32)
    summary = compose_dataset([single_entity_set.annotations], tmp_path / "out", config, progress=False)
    assert set(summary.per_k) == {2, 3}
    assert 0.65 < summary.per_k[2] / 200 < 0.85  # 3:1 -> 0.75
    assert summary.k_out_of_reach == {} and "warning" not in summary.format()


def test_same_seed_same_output(single_entity_set, tmp_path):
    config = ComposeConfig(num_images=6, seed=11, tile_size=48)
    tables = []
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        config = ComposeConfig(num_images=6, seed=seed, tile_size=48)
        compose_dataset([single_entity_set.annotations], tmp_path / name, config, progress=False)
        tables.append((pq.read_table(tmp_path / name / "grounding.parquet"),
                       pq.read_table(tmp_path / name / "probe.parquet")))
    assert tables[0][0].equals(tables[1][0]) and tables[0][1].equals(tables[1][1])
    assert not tables[0][0].equals(tables[2][0])


def test_probe_set_matches_the_grounding_set(single_entity_set, tmp_path):
    config = ComposeConfig(num_images=10, seed=2, tile_size=32, probe_images_per_entity=1)
    summary = compose_dataset([single_entity_set.annotations], tmp_path / "out", config, progress=False)
    grounding = pq.read_table(tmp_path / "out" / "grounding.parquet").column("extra_info").to_pylist()
    probe = pq.read_table(tmp_path / "out" / "probe.parquet")
    assert tuple(probe.column_names) == PROBE_COLUMNS
    probe_rows = probe.to_pylist()
    shown = {(g["category"], e) for g in grounding for e in g["entities"]}
    assert {(p["category"], p["entity"]) for p in probe_rows} == shown
    assert len(probe_rows) == summary.probe_rows == len(shown)  # one image per entity asked
    sources = {r["id"]: r for r in single_entity_set.records}
    for row in probe_rows:
        source = sources[row["source_id"]]
        assert source["entity"] == row["entity"]
        assert row["image"]["bytes"] == (single_entity_set.root / source["image"]).read_bytes()
        shared = {e for g in grounding if row["entity"] in g["entities"] for e in g["entities"]} - {row["entity"]}
        assert set(row["co_entities"]) == shared


def test_the_probe_reads_the_probe_set(single_entity_set, tmp_path):
    from karl_verl.probe.questions import build_questions, load_probe_set

    compose_dataset([single_entity_set.annotations], tmp_path / "out",
                    ComposeConfig(num_images=20, seed=0, tile_size=32, k_weights={2: 1}), progress=False)
    items = load_probe_set(tmp_path / "out" / "probe.parquet")
    assert all(item.image_id in {r["id"] for r in single_entity_set.records} for item in items)
    questions = build_questions(items, on_small_category="global")
    assert {q.entity for q in questions} == {item.entity for item in items}
    for question in questions:
        item = next(i for i in items if i.entity == question.entity)
        # Entities shown beside it in a composite are its first distractors.
        assert set(item.entities_in_image) & set(question.options) or not item.entities_in_image


@pytest.mark.parametrize("seed", range(40))
def test_random_placement_never_overlaps_and_stays_on_canvas(seed):
    rng = random.Random(seed)
    sizes = [(rng.randint(20, 200), rng.randint(20, 200)) for _ in range(rng.randint(2, 6))]
    (width, height), placements = plan_layout(sizes, "random", 64, rng)
    for i, a in enumerate(placements):
        assert 0 <= a.x and a.x + a.width <= width and 0 <= a.y and a.y + a.height <= height
        for b in placements[i + 1:]:
            assert a.x + a.width <= b.x or b.x + b.width <= a.x or a.y + a.height <= b.y or b.y + b.height <= a.y


def test_grid_and_strip_geometry():
    rng = random.Random(0)
    canvas, placements = plan_layout([(100, 50)] * 5, "grid", 40, rng)
    assert canvas == (120, 80)  # 3 columns, 2 rows of 40-pixel cells
    assert placements[4] == Placement(40 + 0, 40 + 10, 40, 20)
    canvas, placements = plan_layout([(100, 50), (50, 100)], "horizontal", 40, rng)
    assert canvas == (100, 40) and placements[1] == Placement(80, 0, 20, 40)
    canvas, placements = plan_layout([(100, 50), (50, 100)], "vertical", 40, rng)
    assert canvas == (40, 100) and placements[1] == Placement(0, 20, 40, 80)
    assert remap_box((0, 0, 50, 100), (50, 100), placements[1]) == (0, 20, 40, 100)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k_weights": {7: 1}}, r"\[2, 6\]"),
    ({"k_weights": {2: 0}}, "not all 0"),
    ({"layouts": ("spiral",)}, "layouts"),
    ({"num_images": 0}, "num_images"),
    ({"image_format": "gif"}, "image_format"),
])
def test_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ComposeConfig(**kwargs)


def test_too_few_entities_is_an_error(single_entity_set, tmp_path):
    with pytest.raises(ValueError, match="at least 5 different entities"):
        compose_dataset([single_entity_set.annotations], tmp_path / "out", ComposeConfig(k_weights={5: 1}),
                        progress=False)
    assert not (tmp_path / "out" / "grounding.parquet").exists()


def test_cli_compose(single_entity_set, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "compose", str(single_entity_set.annotations), "--out", str(out), "--num-images", "5",
                 "--k-dist", "2:1", "--layouts", "grid,random", "--tile-size", "32", "--seed", "4",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wrote 5 composites" in text and "k: 2 5" in text
    assert pq.read_table(out / "grounding.parquet").num_rows == 5
    assert main(["data", "compose", str(single_entity_set.annotations), "--out", str(out), "--k-dist", "9:1",
                 "--no-progress"]) == 2
    assert "k distribution" in capsys.readouterr().err
