"""The transformers rollout server and its per-worker adapter (karl_verl/cpu/rollout.py), in process."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from karl_verl.cpu import rollout
from karl_verl.cpu.rollout import (
    VISION_PLACEHOLDER_TOKENS,
    RolloutServerAsleep,
    TransformersRolloutServer,
    TransformersServerAdapter,
    derived_seed,
    prompt_logprob_entries,
)
from karl_verl.testing.tiny_qwen3vl import load_tiny_processor, save_tiny_checkpoint

RESPONSE_LENGTH = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny Qwen3-VL checkpoints with different weights (seed 0 and seed 1)."""
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_checkpoint(root / "seed0", seed=0), save_tiny_checkpoint(root / "seed1", seed=1)


@pytest.fixture(scope="module")
def reference_models(checkpoints):
    from transformers import Qwen3VLForConditionalGeneration

    return tuple(Qwen3VLForConditionalGeneration.from_pretrained(path).eval() for path in checkpoints)


@pytest.fixture
def make_server(checkpoints):
    def make(**kwargs):
        options = {
            "replica_rank": 0,
            "response_length": RESPONSE_LENGTH,
            "prompt_length": 64,
            "max_model_len": None,
            "seed": 0,
            **kwargs,
        }
        return TransformersRolloutServer(str(checkpoints[0]), **options)

    return make


@pytest.fixture
def server(make_server):
    return make_server()


def _prompt(server, text: str = "What is the aircraft in the image?") -> list[int]:
    messages = [{"role": "user", "content": text}]
    return server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def _placeholder_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in VISION_PLACEHOLDER_TOKENS]


def _greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, **inputs) -> list[int]:
    """transformers' own greedy decoding, with the placeholders suppressed and eos ignored."""
    input_ids = inputs.pop("input_ids", torch.tensor([prompt_ids]))
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=_placeholder_ids(tokenizer),
            **inputs,
        )
    return output[0, input_ids.shape[1] :].tolist()


def _ask(server, prompt_ids, **params):
    return server._generate(list(prompt_ids), params, None, {})


GREEDY = {"temperature": 0.0, "ignore_eos": True}


# ---------------------------------------------------------------------------- pure functions


def test_derived_seed_is_fixed_by_its_inputs_and_changes_with_each():
    prompt = [5, 6, 7]
    seed = derived_seed(0, "initial", prompt, 0)
    assert seed == derived_seed(0, "initial", list(prompt), 0)
    others = {
        derived_seed(1, "initial", prompt, 0),
        derived_seed(0, "sync1@step1", prompt, 0),
        derived_seed(0, "initial", [5, 6, 8], 0),
        derived_seed(0, "initial", prompt, 1),
    }
    assert seed not in others and len(others) == 4
    assert all(0 <= s < 2**47 for s in others | {seed})
    # Prompt boundaries matter: [1, 23] and [12, 3] are different prompts.
    assert derived_seed(0, "v", [1, 23], 0) != derived_seed(0, "v", [12, 3], 0)


def test_prompt_logprob_entries_top_k_layout():
    logprobs = torch.log_softmax(
        torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 1.0, 2.0], [0.5, 0.1, 0.2, 0.3]]), dim=-1
    )
    ids, values = prompt_logprob_entries(logprobs, [2, 3, 1], top_k=2)
    assert ids == [[1, 2], [0, 3], [0, 0]]
    assert values[0] == pytest.approx([logprobs[0, 1].item(), logprobs[0, 2].item()])
    assert values[1] == pytest.approx([logprobs[1, 0].item(), logprobs[1, 3].item()])
    assert values[2] == [0.0, 0.0]


def test_prompt_logprob_entries_actual_tokens_with_k_0():
    logprobs = torch.log_softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    prompt = [4, 0, 5, 2]
    ids, values = prompt_logprob_entries(logprobs, prompt, top_k=0)
    assert ids == [[0], [5], [2], [0]]
    assert [v for (v,) in values[:3]] == pytest.approx(
        [logprobs[0, 0].item(), logprobs[1, 5].item(), logprobs[2, 2].item()]
    )
    assert values[3] == [0.0]


# ---------------------------------------------------------------------------- generation


def test_greedy_is_deterministic_and_equals_transformers_greedy(server, reference_models):
    prompt = _prompt(server)
    first = _ask(server, prompt, max_tokens=12, **GREEDY)
    assert first.stop_reason == "completed" and len(first.token_ids) == 12
    assert _ask(server, prompt, max_tokens=12, **GREEDY).token_ids == first.token_ids
    assert first.token_ids == _greedy(reference_models[0], server.tokenizer, prompt, 12)
    assert first.token_ids != _greedy(reference_models[1], server.tokenizer, prompt, 12)


def test_greedy_with_an_image_equals_transformers_greedy(server, reference_models, checkpoints):
    from PIL import Image

    processor = load_tiny_processor(checkpoints[0])
    image = Image.new("RGB", (64, 96), (30, 140, 220))
    image.paste((240, 240, 20), (10, 10, 40, 50))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the bird."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    served = server._generate(prompt, {"max_tokens": 8, "logprobs": True, **GREEDY}, [image], {})
    reference = {key: value for key, value in inputs.items() if key != "attention_mask"}
    assert served.token_ids == _greedy(reference_models[0], server.tokenizer, prompt, 8, **reference)
    # The picture matters: the same tokens with other pixels give other logits.
    other = server._generate(
        prompt, {"max_tokens": 8, "logprobs": True, **GREEDY}, [Image.new("RGB", (64, 96), (0, 0, 0))], {}
    )
    assert other.token_ids != served.token_ids or other.log_probs != served.log_probs


def test_max_tokens_and_the_model_length_bound_the_response(make_server):
    server = make_server(max_model_len=None)
    prompt = _prompt(server)
    assert len(_ask(server, prompt, max_tokens=5, **GREEDY).token_ids) == 5
    assert len(_ask(server, prompt, max_tokens=5, temperature=1.0).token_ids) <= 5
    # Without max_tokens: the configured response length.
    assert len(_ask(server, prompt, **GREEDY).token_ids) == RESPONSE_LENGTH
    tight = make_server(max_model_len=len(prompt) + 3)
    assert len(_ask(tight, prompt, max_tokens=50, **GREEDY).token_ids) == 3
    with pytest.raises(ValueError, match="max_model_len"):
        _ask(make_server(max_model_len=len(prompt)), prompt, max_tokens=1)


def test_a_given_seed_reproduces_and_different_seeds_differ(server):
    prompt = _prompt(server)
    sample = {"temperature": 1.0, "max_tokens": 10, "ignore_eos": True}
    first = _ask(server, prompt, seed=7, **sample).token_ids
    assert _ask(server, prompt, seed=7, **sample).token_ids == first
    assert _ask(server, prompt, seed=8, **sample).token_ids != first
    # The server's own RNG use does not touch the caller's global generator.
    state = torch.get_rng_state()
    _ask(server, prompt, **sample)
    assert torch.equal(torch.get_rng_state(), state)


def _unseeded_session(server, prompts) -> list[list[int]]:
    sample = {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True}
    answers = [
        _ask(server, prompts[0], **sample).token_ids,
        _ask(server, prompts[0], **sample).token_ids,
        _ask(server, prompts[1], **sample).token_ids,
    ]
    weights = {name: p.detach().clone() for name, p in server.model.named_parameters()}
    server._update_weights(weights, 1)  # same values, new weight version: the repeat counts start again
    answers.append(_ask(server, prompts[0], **sample).token_ids)
    return answers


def test_unseeded_requests_are_reproducible_across_a_fresh_server(make_server):
    server = make_server()
    prompts = [_prompt(server), _prompt(server, "Find the car.")]
    answers = _unseeded_session(server, prompts)
    # The same prompt asked twice gets two derived seeds (the repeat count), so two samples.
    assert answers[0] != answers[1]
    assert answers[3] != answers[0]  # after a sync the weight version enters the seed
    # A resumed run's fresh server answers the same sequence of requests identically.
    assert _unseeded_session(make_server(), prompts) == answers
    assert _unseeded_session(make_server(seed=1), prompts) != answers  # the rollout seed matters


def test_logprobs_are_log_softmax_of_the_processed_scores(server, reference_models):
    prompt = _prompt(server)
    for temperature in (1.0, 0.7):
        output = _ask(server, prompt, temperature=temperature, max_tokens=6, seed=3, logprobs=True)
        assert len(output.log_probs) == len(output.token_ids) == 6  # (no eos drawn with this seed)
        sequence = torch.tensor([prompt + output.token_ids])
        with torch.no_grad():
            logits = reference_models[0](input_ids=sequence).logits[0, len(prompt) - 1 : -1].float()
        processed = logits / temperature
        processed[:, _placeholder_ids(server.tokenizer)] = -float("inf")
        expected = torch.log_softmax(processed, dim=-1).gather(-1, torch.tensor(output.token_ids)[:, None])[:, 0]
        assert output.log_probs == pytest.approx(expected.tolist(), abs=1e-4)
    assert _ask(server, prompt, max_tokens=3, logprobs=False).log_probs is None
    assert _ask(server, prompt, max_tokens=3).log_probs is None


def test_raw_logprobs_mode_reads_the_unprocessed_logits(make_server, reference_models):
    server = make_server(logprobs_mode="raw_logprobs")
    prompt = _prompt(server)
    output = _ask(server, prompt, temperature=0.7, max_tokens=4, seed=3, logprobs=True)
    with torch.no_grad():
        logits = reference_models[0](input_ids=torch.tensor([prompt + output.token_ids])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)
    assert output.log_probs == pytest.approx(
        expected.gather(-1, torch.tensor(output.token_ids)[:, None])[:, 0].tolist(), abs=1e-4
    )
    with pytest.raises(ValueError, match="logprobs_mode"):
        make_server(logprobs_mode="processed_logits")


@pytest.mark.parametrize("top_k", [0, 3])
def test_prompt_logprobs_in_verls_layout(server, reference_models, top_k):
    prompt = _prompt(server)
    output = _ask(server, prompt, max_tokens=2, prompt_logprobs=top_k, **GREEDY)
    assert len(output.token_ids) == 2  # the response is generated as well
    ids, values = output.extra_fields["prompt_ids"], output.extra_fields["prompt_logprobs"]
    assert len(ids) == len(values) == len(prompt)
    width = max(top_k, 1)
    assert ids[-1] == [0] * width and values[-1] == [0.0] * width
    with torch.no_grad():
        logprobs = torch.log_softmax(reference_models[0](input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    for j in range(len(prompt) - 1):
        assert len(ids[j]) == len(values[j]) == width
        if top_k == 0:
            assert ids[j] == [prompt[j + 1]]
            assert values[j][0] == pytest.approx(logprobs[j, prompt[j + 1]].item(), abs=1e-4)
        else:
            assert values[j] == sorted(values[j], reverse=True)
            top = torch.topk(logprobs[j], top_k)
            assert set(ids[j]) == set(top.indices.tolist())
            assert values[j] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert values[j] == pytest.approx(logprobs[j, ids[j]].tolist(), abs=1e-4)


def _make_tokens_dominant(model, token_ids: list[int]) -> None:
    """Rewrite the model so that ``token_ids`` share by far the highest logit at every text position.

    Hidden dimension 0 of the residual stream is pinned to a large positive value (every embedding
    row sets it, no layer writes to it); the final norm keeps only that dimension and the output
    layer reads it for the chosen tokens alone.
    """
    language_model = model.model.language_model
    with torch.no_grad():
        language_model.embed_tokens.weight[:, 0] = 100.0
        for layer in language_model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        language_model.norm.weight.zero_()
        language_model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_ids, 0] = 1000.0


def test_vision_placeholders_are_never_sampled(server):
    placeholders = _placeholder_ids(server.tokenizer)
    assert sorted(server.suppressed_token_ids) == sorted(placeholders) and len(placeholders) == 4
    _make_tokens_dominant(server.model, placeholders)
    prompt = _prompt(server)
    # Unconstrained, this model writes nothing but placeholders ...
    with torch.no_grad():
        free = server.model.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=True,
            max_new_tokens=8,
            min_new_tokens=8,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert set(free) <= set(placeholders) and len(free) == 8
    # ... yet the server samples around them, greedy and at temperature 1.
    for params in (GREEDY, {"temperature": 1.0, "ignore_eos": True, "seed": 1}):
        tokens = _ask(server, prompt, max_tokens=20, **params).token_ids
        assert len(tokens) == 20 and not set(tokens) & set(placeholders)


def test_eos_ends_the_response_unless_ignored(server):
    eos = server.tokenizer.eos_token_id
    assert eos in server.eos_token_ids
    _make_tokens_dominant(server.model, [eos])
    prompt = _prompt(server)
    assert _ask(server, prompt, max_tokens=6, temperature=0.0).token_ids == [eos]
    assert len(_ask(server, prompt, max_tokens=6, temperature=0.0, ignore_eos=True).token_ids) == 6


def test_videos_are_refused(server):
    with pytest.raises(ValueError, match="videos"):
        asyncio.run(server.generate("r1", _prompt(server), {"max_tokens": 2}, video_data=[object()]))


# ---------------------------------------------------------------------------- sleep, wake-up, weight sync


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sleep_refuses_generation_until_woken_and_synced(server):
    prompt = _prompt(server)
    before = _ask(server, prompt, max_tokens=8, **GREEDY).token_ids
    weights = _parameters(server.model)
    buffers = {name: b.clone() for name, b in server.model.named_buffers()}
    assert any(name.endswith("inv_freq") for name in buffers)
    asyncio.run(server.sleep())
    with pytest.raises(RolloutServerAsleep):
        _ask(server, prompt, max_tokens=2)
    with pytest.raises(RolloutServerAsleep, match="woken up"):
        server._update_weights(weights, 1)  # weights sent before the wake-up
    asyncio.run(server.wake_up(["kv_cache"]))
    with pytest.raises(RolloutServerAsleep):  # the weights are still released
        _ask(server, prompt, max_tokens=2)
    asyncio.run(server.wake_up(["weights"]))
    with pytest.raises(RolloutServerAsleep, match="synced: False"):  # allocated, but not filled
        _ask(server, prompt, max_tokens=2)
    stats = asyncio.run(server.stats())
    assert stats["weights_loaded"] and not stats["weights_synced"] and stats["kv_cache_ready"]
    result = server._update_weights(weights, 3)
    assert result == {"tensors": len(weights), "weight_version": "sync1@step3"}
    # Buffers are not part of a sync: rotary tables survive the sleep as they were.
    for name, buffer in server.model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    output = _ask(server, prompt, max_tokens=8, **GREEDY)
    assert output.token_ids == before
    assert output.extra_fields == {"global_steps": 3, "weight_version": "sync1@step3"}


def test_kv_cache_release_gates_generation(server):
    prompt = _prompt(server)
    asyncio.run(server.release_kv_cache())
    with pytest.raises(RolloutServerAsleep):
        _ask(server, prompt, max_tokens=2)
    asyncio.run(server.resume_kv_cache())
    assert len(_ask(server, prompt, max_tokens=2, **GREEDY).token_ids) == 2


def test_after_a_step_the_server_generates_with_the_new_weights(server, reference_models):
    prompt = _prompt(server)
    old = _ask(server, prompt, max_tokens=10, **GREEDY).token_ids
    asyncio.run(server.sleep())
    asyncio.run(server.wake_up())
    asyncio.run(server.update_weights(_parameters(reference_models[1]), global_steps=1))
    new = _ask(server, prompt, max_tokens=10, **GREEDY).token_ids
    assert new == _greedy(reference_models[1], server.tokenizer, prompt, 10)
    assert new != old
    expected_sum = float(sum(p.double().sum() for p in reference_models[1].parameters()))
    assert asyncio.run(server.first_parameter_sum()) == pytest.approx(expected_sum, rel=1e-9)
    assert asyncio.run(server.stats())["syncs"] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.update({"model.no_such.weight": torch.zeros(2)}), "model.no_such.weight"),
        (lambda w: w.update({"lm_head.weight": torch.zeros(3, 64)}), r"lm_head.weight has shape \(3, 64\)"),
        (lambda w: w.pop("model.language_model.norm.weight"), "model.language_model.norm.weight"),
    ],
)
def test_a_bad_sync_names_the_tensor_and_keeps_the_served_weights(server, reference_models, change, message):
    prompt = _prompt(server)
    before = _ask(server, prompt, max_tokens=6, **GREEDY).token_ids
    weights = _parameters(reference_models[1])
    change(weights)
    with pytest.raises(ValueError, match=message):
        server._update_weights(weights, 1)
    # Nothing of the failed sync was applied: the server still serves its previous weights.
    assert _ask(server, prompt, max_tokens=6, **GREEDY).token_ids == before
    assert asyncio.run(server.stats())["syncs"] == 0


def test_abort_returns_aborted_until_generation_resumes(server):
    prompt = _prompt(server)
    asyncio.run(server.abort_all_requests())
    output = asyncio.run(server.generate("r1", prompt, {"max_tokens": 3, **GREEDY}))
    assert output.stop_reason == "aborted" and output.token_ids == []
    asyncio.run(server.resume_generation())
    output = asyncio.run(server.generate("r2", prompt, {"max_tokens": 3, **GREEDY}))
    assert output.stop_reason == "completed" and len(output.token_ids) == 3
    assert asyncio.run(server.stats())["requests"] == 1


def _image_prompt(checkpoints, colour=(240, 240, 20)):
    from PIL import Image

    processor = load_tiny_processor(checkpoints[0])
    image = Image.new("RGB", (64, 96), (30, 140, 220))
    image.paste(colour, (10, 10, 40, 50))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the bird."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist(), image


async def _concurrently(server, requests):
    return await asyncio.gather(*[server.generate(f"r{i}", prompt, params, image_data=images)
                                  for i, (prompt, params, images) in enumerate(requests)])


@pytest.mark.parametrize("with_image", [False, True])
def test_twins_share_one_batch_and_each_answers_as_if_alone(server, checkpoints, with_image):
    """A prompt's n samples arrive together and run as one batch; each row samples from its own
    seed, so every answer equals the same request answered alone."""
    if with_image:
        prompt, image = _image_prompt(checkpoints)
        images = [image]
    else:
        prompt, images = _prompt(server), None
    sample = {"temperature": 1.0, "max_tokens": 10, "ignore_eos": True, "logprobs": True}
    before = asyncio.run(server.stats())
    batched = asyncio.run(_concurrently(server, [(prompt, {**sample, "seed": s}, images) for s in range(5)]))
    after = asyncio.run(server.stats())
    assert after["requests"] - before["requests"] == 5 and after["batches"] - before["batches"] == 1
    assert len({tuple(output.token_ids) for output in batched}) > 1  # five seeds, not one sample copied
    for seed, output in enumerate(batched):
        alone = server._generate(prompt, {**sample, "seed": seed}, images, {})
        assert output.token_ids == alone.token_ids
        assert output.log_probs == pytest.approx(alone.log_probs, abs=1e-4)


def test_requests_that_differ_in_prompt_image_or_settings_are_not_batched(server, checkpoints):
    prompt, image = _image_prompt(checkpoints)
    _, other_image = _image_prompt(checkpoints, colour=(0, 0, 0))
    sample = {"temperature": 1.0, "max_tokens": 4, "seed": 1}
    requests = [
        (prompt, sample, [image]),
        (prompt, sample, [image]),  # the only twin of the first
        (prompt, sample, [other_image]),
        (prompt, {**sample, "temperature": 0.5}, [image]),
        (_prompt(server), sample, None),
    ]
    before = asyncio.run(server.stats())
    outputs = asyncio.run(_concurrently(server, requests))
    after = asyncio.run(server.stats())
    assert after["batches"] - before["batches"] == 4
    assert outputs[0].token_ids == outputs[1].token_ids  # same seed, same batch, same answer


def test_unseeded_twins_in_one_batch_draw_different_samples(server):
    prompt = _prompt(server)
    sample = {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True}
    outputs = asyncio.run(_concurrently(server, [(prompt, sample, None)] * 4))
    assert len({tuple(output.token_ids) for output in outputs}) == 4


def test_abort_answers_queued_requests_with_aborted(server):
    prompt = _prompt(server)

    async def scenario():
        tasks = [asyncio.ensure_future(server.generate(f"r{i}", prompt, {"max_tokens": 3, **GREEDY}))
                 for i in range(3)]
        await asyncio.sleep(0)  # queued, waiting for their twins
        aborted = await server.abort_all_requests()
        return aborted, await asyncio.gather(*tasks)

    requests_before = asyncio.run(server.stats())["requests"]
    aborted, outputs = asyncio.run(scenario())
    assert aborted["aborted_count"] == 3
    assert [output.stop_reason for output in outputs] == ["aborted"] * 3
    assert asyncio.run(server.stats())["requests"] == requests_before


def test_a_failing_batch_fails_each_of_its_requests(server):
    prompt = _prompt(server)
    asyncio.run(server.sleep())
    with pytest.raises(RolloutServerAsleep):
        asyncio.run(_concurrently(server, [(prompt, {"max_tokens": 3, **GREEDY}, None)] * 2))


# ---------------------------------------------------------------------------- the per-worker adapter


class _FakeRemoteMethod:
    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def remote(self, *args):
        self.calls.append((self.name, args))

        async def answer():
            return {"ok": True}

        return answer()


class _FakeServerHandle:
    """Records what the adapter sends to its server actor."""

    def __init__(self) -> None:
        self.calls: list = []
        self.update_weights = _FakeRemoteMethod(self.calls, "update_weights")
        self.wake_up = _FakeRemoteMethod(self.calls, "wake_up")
        self.sleep = _FakeRemoteMethod(self.calls, "sleep")


class _ShardedTensor:
    """What verl's weight generator yields for an FSDP2 parameter: gathering it is a collective."""

    gathered: list[str] = []

    def __init__(self, name: str, full: torch.Tensor) -> None:
        self.name, self.full = name, full

    def full_tensor(self) -> torch.Tensor:
        _ShardedTensor.gathered.append(self.name)
        return self.full


@pytest.fixture
def fake_actors(monkeypatch):
    handles: dict[str, _FakeServerHandle] = {}

    def get_actor(name):
        return handles.setdefault(name, _FakeServerHandle())

    monkeypatch.setattr(rollout.ray, "get_actor", get_actor)
    _ShardedTensor.gathered = []
    return handles


def _adapter(monkeypatch, rank: int) -> TransformersServerAdapter:
    monkeypatch.setenv("RANK", str(rank))
    config = types.SimpleNamespace(tensor_model_parallel_size=2, data_parallel_size=1, pipeline_model_parallel_size=1)
    return TransformersServerAdapter(config, types.SimpleNamespace(path="unused"), device_mesh=None)


def _weights(consumed: list[str]):
    full = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(4)}
    for name, tensor in full.items():
        consumed.append(name)
        yield name, (_ShardedTensor(name, tensor) if name == "a.weight" else tensor)


def test_adapter_on_a_non_leader_rank_drains_without_sending(monkeypatch, fake_actors):
    adapter = _adapter(monkeypatch, rank=3)  # replica 1, second rank of two
    assert adapter.replica_rank == 1 and not adapter.is_leader
    consumed: list[str] = []
    asyncio.run(adapter.update_weights(_weights(consumed), global_steps=2))
    assert consumed == ["a.weight", "b.bias"]  # the whole generator was drained
    assert _ShardedTensor.gathered == ["a.weight"]  # and the sharded tensor gathered (a collective)
    asyncio.run(adapter.resume(["weights"]))
    asyncio.run(adapter.release())
    assert all(not handle.calls for handle in fake_actors.values())


def test_adapter_on_the_leader_sends_full_tensors_to_its_replicas_server(monkeypatch, fake_actors):
    adapter = _adapter(monkeypatch, rank=2)  # replica 1, first rank
    assert adapter.replica_rank == 1 and adapter.is_leader
    consumed: list[str] = []
    asyncio.run(adapter.update_weights(_weights(consumed), global_steps=2))
    assert list(fake_actors) == [rollout.server_actor_name(1)]
    ((name, (state, global_steps)),) = fake_actors[rollout.server_actor_name(1)].calls
    assert name == "update_weights" and global_steps == 2
    assert list(state) == ["a.weight", "b.bias"]
    assert torch.equal(state["a.weight"], torch.arange(6.0).reshape(2, 3)) and torch.equal(
        state["b.bias"], torch.ones(4)
    )
    asyncio.run(adapter.resume(["weights", "kv_cache"]))
    asyncio.run(adapter.release())
    assert [call[0] for call in fake_actors[rollout.server_actor_name(1)].calls] == [
        "update_weights",
        "wake_up",
        "sleep",
    ]
    assert fake_actors[rollout.server_actor_name(1)].calls[1][1] == (["weights", "kv_cache"],)


def test_adapter_sends_copies_not_views_of_the_trainers_tensors(monkeypatch, fake_actors):
    adapter = _adapter(monkeypatch, rank=0)
    source = torch.zeros(3)
    asyncio.run(adapter.update_weights(iter([("w", source)])))
    ((_, (state, _)),) = fake_actors[rollout.server_actor_name(0)].calls
    source += 1  # the optimizer's next step must not reach what was sent
    assert state["w"].tolist() == [0.0, 0.0, 0.0]


def test_adapter_refuses_other_wire_formats(monkeypatch, fake_actors):
    with pytest.raises(ValueError, match="delta_flush"):
        asyncio.run(_adapter(monkeypatch, rank=0).update_weights(iter([]), wire_format="delta_flush"))


def test_rollout_is_registered_with_verl():
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    rollout.register()  # idempotent
    assert rollout.is_registered()
    assert _ROLLOUT_REGISTRY[("transformers", "async")] == "karl_verl.cpu.rollout.TransformersServerAdapter"
    assert RolloutReplicaRegistry.get("transformers") is rollout.TransformersReplica


def test_allowed_token_ids_pick_the_most_likely_allowed_token(server, reference_models):
    """vLLM's allowed_token_ids (what the probe's choice mode sends): greedy over those tokens only."""
    prompt = _prompt(server)
    letters = [server.tokenizer.encode(letter, add_special_tokens=False)[0] for letter in "ABCD"]
    with torch.no_grad():
        logits = reference_models[0](input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = letters[int(torch.argmax(logits[letters]))]
    answer = _ask(server, prompt, max_tokens=1, temperature=0.0, allowed_token_ids=letters)
    assert answer.token_ids == [expected]
    # sampled too: never outside the allowed set
    for seed in range(8):
        sampled = _ask(server, prompt, max_tokens=3, temperature=1.0, seed=seed, allowed_token_ids=letters[1:3])
        assert set(sampled.token_ids) <= set(letters[1:3])
