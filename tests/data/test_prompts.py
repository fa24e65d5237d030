"""Prompt and ground-truth templates: the text the reward and the evaluator read back."""

from __future__ import annotations

import pytest

from karl_verl.boxes import answer_span, entity_of, read_box, read_box_reference
from karl_verl.data import prompts


def test_query_and_suffix_are_the_papers():
    text = prompts.grounding_prompt(prompts.grounding_query("Sukhoi Su-30"))
    assert text == (
        "<image>Find and give the bounding box of <|object_ref_start|>Sukhoi Su-30<|object_ref_end|>  "
        "Output the thinking process in <think> </think> and final answer (bounding box) in <answer> </answer> tags."
    )


@pytest.mark.parametrize(("query", "num_images", "expected_prefix"), [
    ("Find X", 1, "<image>Find X"),
    ("<image>Find X", 1, "<image>Find X"),  # the benchmark's question may carry its placeholder
    ("Find X", 2, "<image><image>Find X"),
])
def test_placeholders_match_the_image_count(query, num_images, expected_prefix):
    text = prompts.grounding_prompt(query, num_images, style="plain")
    assert text == expected_prefix
    assert text.count(prompts.IMAGE_PLACEHOLDER) == num_images


def test_too_many_placeholders_and_unknown_style_are_errors():
    with pytest.raises(ValueError, match="placeholders"):
        prompts.grounding_prompt("<image><image>Find X", 1)
    with pytest.raises(ValueError, match="prompt style"):
        prompts.grounding_prompt("Find X", style="chatty")


def test_json_style_is_qwen3_vl_request():
    text = prompts.grounding_prompt("Find X", style="json")
    assert text == "<image>Find X, output its bbox coordinates using JSON format."


def test_ground_truth_reads_back_with_the_reward_readers():
    truth = prompts.ground_truth("Fiat 500", (12, 40, 300, 520))
    assert entity_of(truth) == "Fiat 500"
    assert read_box_reference(truth) == (12.0, 40.0, 300.0, 520.0)
    assert read_box(truth, "qwen3_vl") == (12.0, 40.0, 300.0, 520.0)
    assert answer_span(truth) is None


def test_chat_messages_and_data_source():
    assert prompts.chat_messages("<image>hi") == [{"role": "user", "content": "<image>hi"}]
    assert prompts.data_source("bird") == "kvg/bird"
