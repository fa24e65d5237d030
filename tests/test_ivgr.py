"""iVGR, pure part: stream pairing, the judge's rubric, the teacher cache, the consistency reward, templates, config."""

import doctest
import json
import math
import re

import pytest

import karl_verl.ivgr as ivgr
from karl_verl.config import ConfigError, IvgrConfig
from karl_verl.ivgr import (
    GROUNDED,
    TEXTUAL,
    TeacherCache,
    consistency_metrics,
    consistency_reward,
    extract_reasoning,
    judge_messages,
    load_templates,
    pair_streams,
    parse_judge_prompt,
    render_prompt,
    rubric_score,
    stream_uid,
)

GOOD = "<think>The car at [120,340,410,560] has round headlights: the Fiat 500.</think><answer>(12,40),(88,97)</answer>"
BETTER = "<think>The small car at [100,300,400,560] is the Fiat 500.</think><answer>(10,40),(88,97)</answer>"


def test_the_doctests_run():
    result = doctest.testmod(ivgr)
    assert result.attempted > 0 and result.failed == 0


# --- pairing ---------------------------------------------------------------------------------------------------

def test_pairing_puts_each_instances_grounded_row_before_its_textual_row():
    rows = [{"prompt": "p0", "extra_info": {"index": 0, "entity": "Fiat"}},
            {"prompt": "p1", "extra_info": {"index": 7.0}}]
    paired = pair_streams(rows)
    assert [(r["prompt"], r["extra_info"]["ivgr_stream"], r["extra_info"]["ivgr_instance"]) for r in paired] == [
        ("p0", GROUNDED, "0"), ("p0", TEXTUAL, "0"), ("p1", GROUNDED, "7"), ("p1", TEXTUAL, "7")]
    assert paired[0]["extra_info"]["entity"] == "Fiat"
    # Copies: the input rows and the two streams' extra_info are apart.
    assert "ivgr_stream" not in rows[0]["extra_info"]
    assert paired[0]["extra_info"] is not paired[1]["extra_info"]


def test_pairing_uses_the_configured_key_field():
    paired = pair_streams([{"extra_info": {"uid": "car-7"}}], key_field="uid")
    assert {r["extra_info"]["ivgr_instance"] for r in paired} == {"car-7"}


@pytest.mark.parametrize("bad", [{"extra_info": {"other": 1}}, {"extra_info": {"index": None}}, {"extra_info": None},
                                 {"prompt": "no extra_info"}, "not a row"])
def test_a_row_without_a_key_is_refused_naming_the_row_and_the_key(bad):
    with pytest.raises(ValueError, match=r"row 1: no extra_info\['index'\]"):
        pair_streams([{"extra_info": {"index": 0}}, bad])


def test_stream_uids_differ_per_stream_and_per_instance():
    uids = {stream_uid(instance, stream) for instance in ("a", "b") for stream in (GROUNDED, TEXTUAL)}
    assert len(uids) == 4
    with pytest.raises(ValueError, match="stream"):
        stream_uid("a", "visual")


# --- reasoning and the judge's rubric ----------------------------------------------------------------------------

@pytest.mark.parametrize(("response", "reasoning"), [
    ("<think> a [1,2,3,4] b </think><answer>(1,2),(3,4)</answer>", "a [1,2,3,4] b"),
    ("<think>first</think> <think>second</think><answer>x</answer>", "first"),
    ("opened by the chat template</think><answer>x</answer>", "opened by the chat template"),
    ("no tags before the answer <answer>x</answer>", "no tags before the answer"),
    ("<think>truncated, never closed", ""),
    ("no tags at all", ""),
    ("", ""),
    (None, ""),
])
def test_extract_reasoning(response, reasoning):
    assert extract_reasoning(response) == reasoning


@pytest.mark.parametrize(("reply", "score"), [
    ("1.0", 1.0), ("1", 1.0), ("0.7", 0.7), (" 0.3\n", 0.3), ("0", 0.0), ("0.0", 0.0), ("0.70", 0.7),
    ("Score: 0.7", 0.7), ("score:1.0", 1.0), ("SCORE = 0.3", 0.3), ("**0.7**", 0.7), ('"1.0"', 1.0), ("0.7.", 0.7),
    ("0.5", None), ("0.75", None), ("2", None), ("-0.3", None), ("", None), ("   ", None), ("great", None),
    ("0.7 or 0.3", None), ("0.7 0.3", None), ("The score is 0.7", None), ("0.7 because it misses details", None),
    ("1e0", None), (None, None),
])
def test_rubric_score_table(reply, score):
    assert rubric_score(reply) == score


def test_judge_messages_hold_the_rubric_and_the_three_texts_in_findable_places():
    messages = judge_messages("The car at [1,2,3,4] is the Fiat.", "The round car is the Fiat.", "Find the Fiat 500")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert all(grade in messages[0]["content"] for grade in ("0.0", "0.3", "0.7", "1.0"))
    assert "correct" in messages[0]["content"]
    assert parse_judge_prompt(messages[1]["content"]) == (
        "Find the Fiat 500", "The car at [1,2,3,4] is the Fiat.", "The round car is the Fiat.")
    assert parse_judge_prompt("just some text") is None


# --- teacher cache -------------------------------------------------------------------------------------------------

def test_the_cache_takes_only_correct_rollouts_at_or_above_tau():
    cache = TeacherCache(tau=0.3)
    assert not cache.offer("k", GOOD, correct=False, iou=0.9)
    assert not cache.offer("k", GOOD, correct=True, iou=0.29)
    assert not cache.offer("k", GOOD, correct=True, iou=math.nan)
    assert not cache.offer("k", "<answer>(1,2),(3,4)</answer>", correct=True, iou=0.9)  # no reasoning to compare
    assert len(cache) == 0 and cache.reference("k") is None
    assert cache.offer("k", GOOD, correct=True, iou=0.3, step=1)
    assert cache.reference("k") == "The car at [120,340,410,560] has round headlights: the Fiat 500."


def test_the_cache_keeps_the_best_and_the_older_on_a_tie():
    cache = TeacherCache()
    assert cache.offer("k", GOOD, correct=True, iou=0.6, step=1)
    assert not cache.offer("k", BETTER, correct=True, iou=0.6, step=2)  # tie: the older stays
    assert not cache.offer("k", BETTER, correct=True, iou=0.5, step=3)
    assert cache.entry("k").step == 1
    assert cache.offer("k", BETTER, correct=True, iou=0.8, step=4)
    assert cache.entry("k").step == 4 and "small car" in cache.reference("k")
    assert cache.offer(7, GOOD, correct=True, iou=0.5) and 7 in cache and "7" in cache
    assert len(cache) == 2


def test_coverage_counts_distinct_keys():
    cache = TeacherCache()
    cache.offer("a", GOOD, correct=True, iou=0.9)
    assert cache.coverage(["a", "a", "b"]) == 0.5
    assert cache.coverage([]) == 0.0


def test_the_cache_survives_save_and_load(tmp_path):
    cache = TeacherCache(tau=0.4)
    cache.offer("a", GOOD, correct=True, iou=0.9, step=3)
    cache.offer("b", BETTER, correct=True, iou=0.45)
    path = tmp_path / "sub" / "ivgr_cache.json"
    cache.save(path)
    loaded = TeacherCache.load(path)
    assert loaded.tau == 0.4 and loaded.to_json() == cache.to_json()
    assert loaded.entry("a") == cache.entry("a")
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left over
    stricter = TeacherCache.load(path, tau=0.5)  # entries below a raised tau no longer qualify
    assert "a" in stricter and "b" not in stricter


@pytest.mark.parametrize(("text", "message"), [
    ("not json", r"not JSON"),
    ("[1]", r"expected an object with 'version'"),
    ('{"version": 2, "tau": 0.3, "entries": {}}', r"version 2, expected 1"),
    ('{"version": 1, "tau": "x", "entries": {}}', r"'tau': expected a finite number"),
    ('{"version": 1, "tau": 0.3, "entries": {"k7": {"response": "r", "correct": true, "iou": "high"}}}',
     r"entry 'k7': 'iou': expected a finite number"),
    ('{"version": 1, "tau": 0.3, "entries": {"k7": {"response": 3, "correct": true, "iou": 0.5}}}',
     r"entry 'k7': 'response'"),
    ('{"version": 1, "tau": 0.3, "entries": {"k7": {"response": "r", "correct": 1, "iou": 0.5}}}',
     r"entry 'k7': 'correct'"),
    ('{"version": 1, "tau": 0.3, "entries": {"k7": {"response": "r", "correct": true, "iou": 0.5, "step": 1.5}}}',
     r"entry 'k7': 'step'"),
    ('{"version": 1, "tau": 0.3, "entries": {"k7": "r"}}', r"entry 'k7': expected an object"),
])
def test_a_malformed_cache_file_names_the_file_and_the_entry(tmp_path, text, message):
    path = tmp_path / "cache.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + message):
        TeacherCache.load(path)


def test_a_missing_cache_file_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.json: cannot read"):
        TeacherCache.load(tmp_path / "nope.json")


# --- consistency reward ----------------------------------------------------------------------------------------------

def test_no_reference_leaves_the_reward_alone():
    assert consistency_reward(0.8, None, 0.5) == (0.8, {"judge_score": None, "judge_failures": 0, "no_reference": True})


def test_all_judge_failures_leave_the_reward_alone():
    reward, info = consistency_reward(0.8, [None, None, None, None], 0.5)
    assert reward == 0.8 and info == {"judge_score": None, "judge_failures": 4, "no_reference": False}


def test_mixed_judge_scores_average_the_valid_ones():
    reward, info = consistency_reward(0.8, [1.0, None, 0.7, 0.7], 0.5)
    assert info["judge_score"] == pytest.approx(0.8) and info["judge_failures"] == 1
    assert reward == pytest.approx(0.8 + 0.5 * 0.8)
    assert consistency_reward(-0.4, [0.0, 0.0], 0.5)[0] == -0.4


def test_consistency_metrics():
    infos = [consistency_reward(0.0, s, 1.0)[1] for s in (None, [1.0, None], [0.3, 0.3], [None])]
    metrics = consistency_metrics(infos)
    assert metrics["ivgr/textual_rollouts"] == 4 and metrics["ivgr/no_reference_rate"] == 0.25
    assert metrics["ivgr/judge_failures"] == 2 and metrics["ivgr/judged_rate"] == 0.5
    assert metrics["ivgr/judge_score_mean"] == pytest.approx(0.65)
    assert "ivgr/judge_score_mean" not in consistency_metrics([])


# --- templates --------------------------------------------------------------------------------------------------------

def test_default_templates_ask_for_boxes_in_the_grounded_stream_only():
    grounded, textual = render_prompt(GROUNDED, "Find the Fiat 500"), render_prompt(TEXTUAL, "Find the Fiat 500")
    assert grounded.startswith("Find the Fiat 500") and textual.startswith("Find the Fiat 500")
    assert "[x1,y1,x2,y2]" in grounded and "[x1,y1,x2,y2]" not in textual
    assert all("<think>" in t and "<answer>" in t for t in (grounded, textual))
    with pytest.raises(ValueError, match="stream"):
        render_prompt("visual", "q")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_templates_from_a_file_override_the_defaults(tmp_path, suffix):
    path = tmp_path / f"templates{suffix}"
    templates = {"textual": "Q: {question} -- reason in words, JSON braces {\"a\": 1} kept."}
    path.write_text(json.dumps(templates))  # JSON is YAML too
    loaded = load_templates(path)
    assert loaded == templates
    assert render_prompt(TEXTUAL, "Find X", loaded) == 'Q: Find X -- reason in words, JSON braces {"a": 1} kept.'
    assert render_prompt(GROUNDED, "Find X", loaded) == render_prompt(GROUNDED, "Find X")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("t.yaml", "grounded: [1, 2]\n", r"key 'grounded': expected a non-empty string"),
    ("t.yaml", "textual: 'no placeholder'\n", r"key 'textual': the template has no \{question\} placeholder"),
    ("t.yaml", "visual: '{question}'\n", r"key 'visual': unknown stream"),
    ("t.yaml", "- a list\n", r"expected a mapping"),
    ("t.yaml", "grounded: [unclosed\n", r"not valid YAML"),
    ("t.json", "{not json", r"not valid JSON"),
])
def test_a_bad_template_file_names_the_file_and_the_key(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + message):
        load_templates(path)
    with pytest.raises(ValueError, match=r"missing\.yaml: cannot read"):
        load_templates(tmp_path / "missing.yaml")


# --- config -----------------------------------------------------------------------------------------------------------

def test_ivgr_config_defaults_and_mapping():
    config = IvgrConfig()
    assert not config.enable and config.consistency_weight == 0.5 and config.tau == 0.3
    assert (config.judge_samples, config.judge_temperature, config.judge_max_tokens) == (4, 0.5, 8)
    on = IvgrConfig.from_mapping({"enable": True, "judge_url": "http://127.0.0.1:8000/v1", "judge_samples": 2.0})
    assert on.enable and on.judge_samples == 2 and isinstance(on.judge_samples, int)
    assert IvgrConfig.from_mapping({"enable": True, "judge_url": "local"}).judge_url == "local"


@pytest.mark.parametrize(("values", "message"), [
    ({"enable": True}, r"karl\.ivgr\.judge_url: needed with karl\.ivgr\.enable=true"),
    ({"judge_url": "127.0.0.1:8000/v1"}, r"karl\.ivgr\.judge_url: expected an http:// or https:// URL or 'local'"),
    ({"tau": 1.5}, r"karl\.ivgr\.tau: expected a number in \[0\.0, 1\.0\]"),
    ({"consistency_weight": -1}, r"karl\.ivgr\.consistency_weight: expected a number in \[0\.0, inf\]"),
    ({"judge_samples": 0}, r"karl\.ivgr\.judge_samples: expected an integer >= 1"),
    ({"judge_budget_s": 0}, r"karl\.ivgr\.judge_budget_s: expected a number in \(0\.0, inf\]"),
    ({"enable": "yes"}, r"karl\.ivgr\.enable: expected true or false"),
    ({"key_field": ""}, r"karl\.ivgr\.key_field: expected a non-empty string"),
    ({"judge_sample": 4}, r"karl\.ivgr\.judge_sample: unknown key; did you mean karl\.ivgr\.judge_samples\?"),
])
def test_a_bad_ivgr_value_names_its_key(values, message):
    with pytest.raises(ConfigError, match=message):
        IvgrConfig.from_mapping(values)
