"""Knowledge-infused rollouts, pure part: the reference file, the plan of a prompt, the response tokens."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from karl_verl.inject import (
    VISION_TOKENS,
    ReferenceError,
    instance_key,
    is_injected_session,
    load_references,
    plan_prompt,
    response_token_ids,
    vision_tokens,
)
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

REFERENCE = "<think>The Fiat 500 is the small round car.</think><answer>(12,40),(88,97)</answer>"


def test_references_from_jsonl_and_parquet_are_the_same(tmp_path):
    rows = [{"key": 0, "response": REFERENCE}, {"key": "car-7", "response": "other"}]
    jsonl = tmp_path / "refs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    parquet = tmp_path / "refs.parquet"
    pq.write_table(pa.table({"key": ["0", "car-7"], "response": [REFERENCE, "other"]}), parquet)
    assert load_references(str(jsonl)) == load_references(str(parquet)) == {"0": REFERENCE, "car-7": "other"}


@pytest.mark.parametrize(("content", "message"), [
    ('{"key": 1, "response": "a"}\n{"key": 1, "response": "b"}\n', r"line 2: key '1' again \(first at .*line 1\)"),
    ('{"key": 1, "response": ""}\n', r"line 1: 'response' must be a non-empty string"),
    ('{"response": "a"}\n', r"line 1: no 'key'"),
    ('{"key": 1, "response": "a"}\nnot json\n', r"line 2: not JSON"),
    ('[1, 2]\n', r"line 1: expected an object"),
])
def test_a_bad_reference_file_names_the_line(tmp_path, content, message):
    path = tmp_path / "refs.jsonl"
    path.write_text(content)
    with pytest.raises(ReferenceError, match=message):
        load_references(str(path))


def test_missing_file_and_missing_columns(tmp_path):
    with pytest.raises(ReferenceError, match="no such reference file"):
        load_references(str(tmp_path / "none.jsonl"))
    parquet = tmp_path / "refs.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), parquet)
    with pytest.raises(ReferenceError, match=r"missing \['key', 'response'\]"):
        load_references(str(parquet))


def test_instance_key_reads_the_configured_extra_info_field():
    assert instance_key({"index": 3, "entity": "Fiat 500"}, "index") == "3"
    assert instance_key({"index": 3.0}, "index") == "3"
    assert instance_key({"entity": "Fiat 500"}, "entity") == "Fiat 500"
    assert instance_key({"entity": "Fiat 500"}, "index") is None and instance_key(None, "index") is None


def test_plan_injects_only_at_the_configured_levels_and_only_with_a_reference():
    refs = {"3": REFERENCE}
    plan = dict(levels=(4, 5), num_injected=1, references=refs)
    assert plan_prompt(5, "3", **plan) == plan_prompt(4, "3", **plan)
    assert (plan_prompt(5, "3", **plan).sessions, plan_prompt(5, "3", **plan).reference) == (1, REFERENCE)
    for level in (1, 2, 3):
        assert plan_prompt(level, "3", **plan).status == "level" and plan_prompt(level, "3", **plan).sessions == 0
    missing = plan_prompt(5, "4", **plan)
    assert (missing.status, missing.sessions, missing.reference) == ("missing", 0, "")
    assert plan_prompt(5, None, **plan).status == "missing"
    teacher = plan_prompt(4, None, levels=(4, 5), num_injected=2, references=None)
    assert (teacher.status, teacher.sessions, teacher.reference) == ("injected", 2, "")


def test_the_first_sessions_are_the_injected_ones():
    assert [is_injected_session(s, 1) for s in range(4)] == [True, False, False, False]
    assert [is_injected_session(s, 2) for s in range(4)] == [True, True, False, False]
    assert not any(is_injected_session(s, 0) for s in range(4))


def test_response_tokens_decode_back_to_the_reference_and_end_like_a_generated_response():
    tokenizer = build_tiny_tokenizer()
    ids = response_token_ids(tokenizer, REFERENCE, tokenizer.eos_token_id)
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode(ids[:-1]) == REFERENCE
    assert ids.count(tokenizer.eos_token_id) == 1
    # A reference that already ends with the end-of-turn token is not given a second one.
    assert response_token_ids(tokenizer, REFERENCE + "<|im_end|>", tokenizer.eos_token_id) == ids


# ---- vision special tokens in injected text ----


def qwen2_tokenizer():
    """A ``Qwen2Tokenizer`` (the class of Qwen2-VL's and Qwen2.5-VL's tokenizers) built in code: byte-level
    vocabulary, no merges, Qwen's vision special tokens and ``<think>`` as a non-special added token, as in Qwen3."""
    from tokenizers import pre_tokenizers
    from transformers import AddedToken, Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    specials = ["<|im_start|>", "<|im_end|>", *VISION_TOKENS]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", additional_special_tokens=specials)
    tokenizer.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return tokenizer


TOKENIZERS = {"tiny_qwen3vl": build_tiny_tokenizer, "qwen2": qwen2_tokenizer}


@pytest.mark.parametrize("token", VISION_TOKENS)
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_reference_holding_a_vision_token_is_refused_naming_the_file_row_key_and_token(tmp_path, token, suffix):
    bad = f"<think>The car {token} is small.</think><answer>(1,2),(3,4)</answer>"
    path = tmp_path / f"refs{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in ({"key": 0, "response": REFERENCE},
                                                              {"key": "car-7", "response": bad})))
        row = "line 2"
    else:
        pq.write_table(pa.table({"key": ["0", "car-7"], "response": [REFERENCE, bad]}), path)
        row = "row 1"
    with pytest.raises(ReferenceError) as raised:
        load_references(str(path))
    message = str(raised.value)
    assert message.startswith(f"{path} {row}: key 'car-7': 'response' holds {token!r}, a vision special token")
    assert "expected text without any of <|vision_start|>" in message


def test_the_vision_tokens_are_qwens_and_those_the_tokenizer_and_processor_name():
    from types import SimpleNamespace

    from transformers import AddedToken

    assert set(vision_tokens()) == set(VISION_TOKENS)
    assert {"<|image_pad|>", "<|video_pad|>"} <= set(VISION_TOKENS)  # what verl bans from sampling
    tiny = build_tiny_tokenizer()
    assert set(vision_tokens(tiny)) == set(VISION_TOKENS)  # its other special tokens are not vision ones
    other = qwen2_tokenizer()
    other.add_tokens([AddedToken("<image>", special=True), AddedToken("<imagine>", special=False)],
                     special_tokens=True)
    found = vision_tokens(other, SimpleNamespace(image_token="<IMG_CONTEXT>", video_token=None))
    assert "<image>" in found and "<IMG_CONTEXT>" in found
    assert "<imagine>" not in found and "<think>" not in found and "<|im_end|>" not in found


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_vision_token_in_teacher_text_becomes_its_characters_not_its_id(name):
    tokenizer = TOKENIZERS[name]()
    ids_of = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    vision_ids = {i for i in ids_of.values() if i is not None and i != tokenizer.unk_token_id}
    assert len(vision_ids) >= 4  # the tiny tokenizer has no <|vision_pad|>
    text = ("<think>a <|image_pad|> b<|vision_start|><|image_pad|><|vision_end|>c <|video_pad|><|vision_pad|>"
            "</think><answer>(12,40),(88,97)</answer>")
    # Tokenized plainly, the text would carry vision ids: what the escape is there for.
    assert vision_ids <= set(tokenizer.encode(text, add_special_tokens=False))
    ids = response_token_ids(tokenizer, text, tokenizer.eos_token_id)
    assert not vision_ids & set(ids)
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == text
    # Everything else is tokenized as before: the end-of-turn token keeps its id, an added <think> its own.
    assert response_token_ids(tokenizer, text + "<|im_end|>", tokenizer.eos_token_id) == ids
    assert response_token_ids(tokenizer, REFERENCE, None) == tokenizer.encode(REFERENCE, add_special_tokens=False)
    if name == "qwen2":
        assert ids[0] == tokenizer.convert_tokens_to_ids("<think>")
