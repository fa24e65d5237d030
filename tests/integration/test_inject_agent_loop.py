"""Agent loop ``karl_inject_agent``: which sessions get the external response, its tokens, the teacher source.

The loop runs as verl's agent-loop worker runs it (one instance per session, the prompt's fields as
keywords) on verl's real single-turn code; a fake stands in for the rollout server, and a local
HTTP server (standard library, shut down after each test) for the teacher endpoint.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from karl_verl.dryrun.pipeline import compose_recipe
from karl_verl.integration import inject_agent_loop
from karl_verl.integration.inject_agent_loop import STATUS_KEY, KarlInjectAgentLoop
from karl_verl.integration.inject_loss import INJECTED_FIELD
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

REFERENCE = "<think>The Fiat 500 is the small round car.</think><answer>(12,40),(88,97)</answer>"
SAMPLED = "<think>no idea</think><answer>(0,0),(5,5)</answer>"
PROMPT = [{"role": "user", "content": "Find the Fiat 500."}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


class PolicyServer:
    """The rollout server: every call is a sample (and is counted)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    async def generate(self, **request):
        self.calls += 1
        ids = self.tokenizer.encode(SAMPLED, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids) if request["sampling_params"]["logprobs"]
                           else None)


def run_group(tokenizer, overrides, n=4, sessions=1, reference=REFERENCE, logprobs=False):
    """The n sessions of one prompt, as verl's AgentLoopWorkerTQ runs them; returns (outputs, server)."""
    config = compose_recipe("karl_kvg_cpu", ["actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent",
                                             *overrides])
    server = PolicyServer(tokenizer)

    async def main():
        outputs = []
        for session_id in range(n):
            loop = KarlInjectAgentLoop(trainer_config=DictConfigWrap(config), server_manager=server,
                                       tokenizer=tokenizer, processor=None, dataset_cls=RLHFDataset,
                                       data_config=DictConfigWrap(config.data))
            outputs.append(await loop.run({"temperature": 1.0, "top_p": 1.0, "logprobs": logprobs},
                                          raw_prompt=PROMPT, session_id=session_id, uid="u",
                                          karl_inject_sessions=sessions, karl_reference=reference))
        return outputs

    return asyncio.run(main()), server


FILE = ["karl.inject.enable=true", "karl.inject.responses_path=/refs.jsonl"]


def test_registered_in_verl():
    assert inject_agent_loop.is_registered()
    assert _agent_loop_registry["karl_inject_agent"]["_target_"].endswith("KarlInjectAgentLoop")


def test_the_first_session_gets_the_reference_tokens_and_the_others_are_sampled(tokenizer):
    outputs, server = run_group(tokenizer, FILE)
    assert server.calls == 3  # the injected session never reached the rollout server
    rows = [output.as_dict() for output in outputs]
    assert [int(row[INJECTED_FIELD]) for row in rows] == [1, 0, 0, 0]
    injected = outputs[0].response_ids
    assert injected[-1] == tokenizer.eos_token_id and tokenizer.decode(injected[:-1]) == REFERENCE
    assert all(tokenizer.decode(o.response_ids[:-1]) == SAMPLED for o in outputs[1:])
    assert outputs[0].extra_fields[STATUS_KEY] == "injected" and STATUS_KEY not in outputs[1].extra_fields
    assert outputs[0].response_mask == [1] * len(injected)
    # Same prompt tokens as the sampled sessions, and the same fields for TransferQueue.
    assert outputs[0].prompt_ids == outputs[1].prompt_ids and rows[0].keys() == rows[1].keys()


def test_two_injected_sessions_and_rollout_log_probs_on_every_row(tokenizer):
    outputs, server = run_group(tokenizer, FILE, sessions=2, logprobs=True)
    assert server.calls == 2
    assert [int(o.as_dict()[INJECTED_FIELD]) for o in outputs] == [1, 1, 0, 0]
    # A row with rollout log-probs needs them on every row: an external token's behaviour probability is 1.
    assert outputs[0].response_logprobs == [0.0] * len(outputs[0].response_ids)
    assert all("rollout_log_probs" in o.as_dict() for o in outputs)


def test_a_prompt_without_a_plan_is_sampled_in_every_session(tokenizer):
    outputs, server = run_group(tokenizer, FILE, sessions=0, reference="")
    assert server.calls == 4 and all(int(o.as_dict()[INJECTED_FIELD]) == 0 for o in outputs)


def test_a_reference_longer_than_the_response_budget_is_cut_like_a_sample(tokenizer):
    outputs, _ = run_group(tokenizer, [*FILE, "data.max_response_length=8"])
    assert len(outputs[0].response_ids) == 8
    assert outputs[0].response_ids == tokenizer.encode(REFERENCE, add_special_tokens=False)[:8]


#: A teacher reply that writes vision special tokens out (a model may, e.g. quoting its own prompt).
VISION_REPLY = "<think>The car <|vision_start|><|image_pad|><|vision_end|> is red.</think><answer>(1,2),(3,4)</answer>"


class Teacher(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint; ``behaviour`` says how it answers."""

    behaviour = "answer"
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append((self.path, body))
        if self.behaviour == "slow":
            time.sleep(1.5)
        if self.behaviour == "refuse":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "no such model"}')
            return
        content = VISION_REPLY if self.behaviour == "vision" else REFERENCE
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())
        except BrokenPipeError:  # the slow case: the client gave up already
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher():
    Teacher.behaviour, Teacher.bodies = "answer", []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(5)


def teacher_overrides(url, timeout=5):
    return ["karl.inject.enable=true", "karl.inject.source=teacher", f"karl.inject.teacher_url={url}",
            "karl.inject.teacher_model=big-teacher", "karl.inject.teacher_retries=0",
            f"karl.inject.teacher_timeout_s={timeout}", "karl.inject.teacher_max_tokens=77"]


def test_the_teacher_is_asked_with_the_prompt_and_its_answer_is_injected(tokenizer, teacher):
    outputs, server = run_group(tokenizer, teacher_overrides(teacher), reference="")
    assert server.calls == 3
    assert tokenizer.decode(outputs[0].response_ids[:-1]) == REFERENCE
    assert int(outputs[0].as_dict()[INJECTED_FIELD]) == 1
    assert len(Teacher.bodies) == 1  # only the injected session asked
    path, body = Teacher.bodies[0]
    assert path == "/v1/chat/completions" and body["model"] == "big-teacher" and body["max_tokens"] == 77
    assert body["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Find the Fiat 500."}]}]


@pytest.mark.parametrize("behaviour", ["refuse", "slow"])
def test_a_failed_or_late_teacher_falls_back_to_a_sample(tokenizer, teacher, behaviour):
    Teacher.behaviour = behaviour
    started = time.monotonic()
    outputs, server = run_group(tokenizer, teacher_overrides(teacher, timeout=0.5), reference="")
    assert server.calls == 4  # the planned session was sampled
    assert int(outputs[0].as_dict()[INJECTED_FIELD]) == 0
    assert outputs[0].extra_fields[STATUS_KEY] == "fallback"
    assert tokenizer.decode(outputs[0].response_ids[:-1]) == SAMPLED
    assert time.monotonic() - started < 30


def test_a_teachers_vision_tokens_are_injected_as_text_not_as_image_tokens(tokenizer, teacher):
    """An image token in a response has no image behind it and fails the actor's forward: the teacher's
    text is still injected, with those tokens spelt out in characters."""
    Teacher.behaviour = "vision"
    # Spelt out, each token is a dozen of the tiny tokenizer's: room for the whole reply.
    outputs, server = run_group(tokenizer, [*teacher_overrides(teacher), "data.max_response_length=512"],
                                reference="")
    assert server.calls == 3 and int(outputs[0].as_dict()[INJECTED_FIELD]) == 1
    assert outputs[0].extra_fields[STATUS_KEY] == "injected"
    vision_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")}
    assert vision_ids <= set(tokenizer.encode(VISION_REPLY, add_special_tokens=False))
    assert not vision_ids & set(outputs[0].response_ids)
    assert tokenizer.decode(outputs[0].response_ids[:-1]) == VISION_REPLY
