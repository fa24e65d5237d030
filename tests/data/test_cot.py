"""``karl-verl data cot``: rationales from a teacher (an OpenAI-compatible endpoint or a local model)."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from karl_verl.cli import main
from karl_verl.data.cot import (
    TEACHER_TEMPLATE,
    CotSettings,
    builtin_rationale,
    check_template,
    generate_cot,
    iter_instances,
    journal_path,
    judge_reply,
    read_template,
)
from karl_verl.data.schema import DataError
from karl_verl.data.sft import convert_sharegpt
from karl_verl.data.teacher import ChatCompletionsTeacher, TeacherError

REPO = Path(__file__).resolve().parents[2]


def image_key(image) -> str:
    from PIL import Image

    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


@pytest.fixture
def grounding(builtin_cot):
    return builtin_cot.parent / "composed" / "grounding.parquet"


@pytest.fixture
def instances(grounding):
    return list(iter_instances(grounding))


def box_text(box) -> str:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return f"({x1},{y1}),({x2},{y2})"


def scripted_teacher(instances, plan, delay_s=0.0, wait_for_company=False):
    """An endpoint answer function: instance ``row`` gets the replies of ``plan[row]`` in turn (default: right).

    ``wait_for_company``: the first reply waits (up to 20 s) for a second request to arrive, so that a
    client that sends requests concurrently is seen doing so however slow the machine is.
    """
    by_image = {image_key(i.images[0]): i for i in instances}
    asked = Counter()
    lock = threading.Lock()
    company = threading.Event()

    def reply(kind, instance):
        x1, y1, x2, y2 = instance.boxes[0]
        right = f"<think>The {instance.entity} has its own shape.</think><answer>{box_text(instance.boxes[0])}</answer>"
        return {
            "right": "\n" + right + "\nDone.",
            "format": f"The {instance.entity} is here: {box_text(instance.boxes[0])}",
            "no_box": f"<think>{instance.entity}</think><answer>the left one</answer>",
            "low_iou": f"<think>guess</think><answer>{box_text((x2, y2, x2 + 50, y2 + 50))}</answer>",
        }[kind]

    def respond(text, images, body):
        instance = by_image[image_key(images[0])]
        assert f"Which one is the {instance.entity}?" in text  # the built-in teacher template
        with lock:
            attempt = asked[instance.row]
            asked[instance.row] += 1
            first = sum(asked.values()) == 1
            if not first:
                company.set()
        if wait_for_company and first:
            company.wait(timeout=20)
        time.sleep(delay_s)
        kinds = plan.get(instance.row, ["right"])
        return [reply(kinds[min(attempt, len(kinds) - 1)], instance)] * body["n"]

    respond.asked = asked
    return respond


def test_judge_reply_reasons():
    target = [(100.0, 100.0, 300.0, 300.0)]
    assert judge_reply("<think>a</think><answer>(100,100),(300,300)</answer>", target).kept
    assert judge_reply("<think>a</think><answer>(100,100),(300,300)</answer>", target, threshold=1.0).kept
    assert judge_reply("(100,100),(300,300)", target).reason == "format"
    assert judge_reply("<think>a</think><answer>[100, 100, 300, 300]</answer>", target).reason == "no_box"
    low = judge_reply("<think>a</think><answer>(200,200),(400,400)</answer>", target)
    assert low.reason == "low_iou" and 0.14 < low.iou < 0.15
    assert judge_reply("<think>a</think><answer>(0.1,0.1),(0.3,0.3)</answer>", target).kept  # the reward's x1000


def test_templates(tmp_path):
    assert check_template(TEACHER_TEMPLATE) == TEACHER_TEMPLATE
    shipped = (REPO / "docs" / "cot_teacher_template.txt").read_text(encoding="utf-8")
    assert shipped.strip("\n") == TEACHER_TEMPLATE  # the documented default is the one in use
    with pytest.raises(ValueError, match=r"unknown fields \['box'\]"):
        check_template("Find {entity} at {box}")
    with pytest.raises(ValueError, match="must name the entity"):
        check_template("Find it")
    (tmp_path / "t.txt").write_text("Point at the {entity} among {candidates}.\n", encoding="utf-8")
    assert read_template(tmp_path / "t.txt") == "Point at the {entity} among {candidates}."


def test_endpoint_teacher_keeps_right_rationales_and_counts_rejections(grounding, instances, chat_server, tmp_path):
    plan = {1: ["format", "right"], 2: ["low_iou", "no_box", "right"], 3: ["low_iou"]}
    respond = scripted_teacher(instances, plan, delay_s=0.05, wait_for_company=True)
    server = chat_server(respond)
    server.fail_next = 2  # the first two requests meet a busy server: retried with backoff
    teacher = ChatCompletionsTeacher(server.url, api_key="secret", backoff_s=0.01)
    out = tmp_path / "cot.json"
    summary = generate_cot(grounding, out, teacher, concurrency=3, teacher_name="tiny-teacher", progress=False)

    assert summary.pending == 0 and server.failed == 2
    assert 2 <= server.max_in_flight <= 3  # concurrent, and bounded
    assert respond.asked == Counter({1: 2, 2: 3, 3: 4, **{i.row: 1 for i in instances if i.row > 3}})
    assert sum(summary.rejected.values()) == 1 and sum(summary.kept.values()) == len(instances) - 1
    reasons = Counter()
    for counter in summary.reasons.values():
        reasons.update(counter)
    assert reasons == Counter({"low_iou": 5, "format": 1, "no_box": 1})
    lines = summary.format().splitlines()
    assert lines[0].startswith(f"kept {len(instances) - 1} of {len(instances)} instances")
    assert f"({sum(respond.asked.values())} teacher replies)" in lines[0]
    rejected_category = instances[2].category
    assert any(line.startswith(f"  {rejected_category}: kept ") and "rejected replies:" in line for line in lines)

    body = server.requests[-1]
    assert body["model"] == "tiny-teacher" and body["n"] == 1 and body["authorization"] == "Bearer secret"
    assert body["max_tokens"] == 1024 and body["temperature"] == 0.7

    records = json.loads(out.read_text(encoding="utf-8"))
    assert [r["karl"]["index"] for r in records] == [i.index for i in instances if i.row != 3]
    first = records[0]
    instance = instances[0]
    assert first["messages"][0] == instance.prompt[0]  # the stage-2 prompt, not the teacher's
    assert first["messages"][1]["content"].startswith("<think>") and first["messages"][1]["content"].endswith(
        "</answer>")  # stripped, cut after </answer>
    assert (out.parent / first["images"][0]).read_bytes() == instance.images[0]
    assert first["karl"]["tries"] == 2 and first["karl"]["iou"] == 1.0

    converted = convert_sharegpt([out], tmp_path / "sft.parquet", progress=False)  # step 1 reads it as is
    assert converted.rows == len(records) and not converted.skipped


class Interrupted(BaseException):
    """A kill in the middle of a run (BaseException, as KeyboardInterrupt is)."""


class CountingTeacher:
    def __init__(self, inner, stop_after=None):
        self.inner, self.stop_after, self.calls = inner, stop_after, []

    def generate(self, requests, sampling):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise Interrupted()
        self.calls.append(image_key(requests[0].images[0]))
        return self.inner.generate(requests, sampling)


def test_an_interrupted_run_resumes_without_redoing_or_losing_instances(grounding, instances, chat_server, tmp_path):
    server = chat_server(scripted_teacher(instances, {2: ["format", "format", "right"]}))
    out = tmp_path / "cot.jsonl"
    first = CountingTeacher(ChatCompletionsTeacher(server.url), stop_after=4)
    with pytest.raises(Interrupted):
        generate_cot(grounding, out, first, concurrency=1, progress=False)
    journal = journal_path(out)
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    done = [entry["index"] for entry in entries]
    assert 1 <= len(done) < len(instances)
    # The output was rewritten from the journal on the way out: what is finished is already usable.
    assert [r["karl"]["index"] for r in map(json.loads, out.read_text().splitlines())] == [
        entry["index"] for entry in entries if entry["kept"]]
    with open(journal, "ab") as handle:  # a torn last line, as a kill mid-write leaves it
        handle.write(b'{"index": 99, "kept": tr')

    second = CountingTeacher(ChatCompletionsTeacher(server.url))
    summary = generate_cot(grounding, out, second, concurrency=1, progress=False)
    key_of = {image_key(i.images[0]): i.index for i in instances}
    assert not {key_of[key] for key in second.calls} & set(done)  # finished instances are not asked again
    assert summary.resumed == len(done) and summary.pending == 0
    indices = [json.loads(line)["index"] for line in journal.read_text().splitlines()[1:]]
    assert sorted(indices) == sorted(i.index for i in instances)  # each exactly once
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["karl"]["index"] for r in records] == [i.index for i in instances]


def test_a_killed_command_restarts_where_it_stopped(grounding, instances, chat_server, tmp_path):
    respond = scripted_teacher(instances, {}, delay_s=1.0)
    server = chat_server(respond)
    out = tmp_path / "cot.json"
    command = [sys.executable, "-m", "karl_verl", "data", "cot", str(grounding), "--teacher", server.url,
               "--out", str(out), "--concurrency", "1", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = journal_path(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    done = {json.loads(line)["index"] for line in journal.read_text().splitlines()[1:] if line.endswith("}")}
    assert 2 <= len(done) < len(instances)
    asked_before = Counter(respond.asked)

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"kept {len(instances)} of {len(instances)} instances" in result.stdout
    asked_after = respond.asked - asked_before
    assert not {i.row for i in instances if i.index in done} & set(asked_after)
    assert sorted(r["karl"]["index"] for r in json.loads(out.read_text())) == sorted(i.index for i in instances)


def test_resuming_with_other_settings_is_refused(grounding, instances, chat_server, tmp_path):
    server = chat_server(scripted_teacher(instances, {}))
    out = tmp_path / "cot.json"
    generate_cot(grounding, out, ChatCompletionsTeacher(server.url), progress=False)
    with pytest.raises(DataError, match="'tries'.*other settings"):
        generate_cot(grounding, out, ChatCompletionsTeacher(server.url), settings=CotSettings(tries=2),
                     progress=False)


def test_teacher_errors_leave_instances_for_the_next_run(grounding, instances, chat_server, tmp_path, capsys):
    server = chat_server(scripted_teacher(instances, {}))
    out = tmp_path / "cot.json"
    status = main(["data", "cot", str(grounding), "--teacher", server.url, "--teacher-model", "no-such-model",
                   "--out", str(out), "--no-progress"])
    assert status == 1
    printed = capsys.readouterr().out
    assert f"{len(instances)} instances not finished" in printed and "HTTP 404" in printed
    assert len(server.requests) == len(instances)  # a 404 is not retried
    assert json.loads(out.read_text()) == []
    assert main(["data", "cot", str(grounding), "--teacher", server.url, "--out", str(out), "--no-progress"]) == 0
    assert len(json.loads(out.read_text())) == len(instances)


def test_unreachable_endpoint_gives_up_after_retries():
    teacher = ChatCompletionsTeacher("http://127.0.0.1:9/v1/chat/completions", model="m", retries=2, backoff_s=0.01)
    assert teacher.endpoint == "http://127.0.0.1:9/v1/chat/completions"
    from karl_verl.backends.base import GenerationRequest, SamplingSettings

    with pytest.raises(TeacherError, match=r"cannot reach .* \(gave up after 3 attempts\)"):
        teacher.generate([GenerationRequest(messages=[{"role": "user", "content": "hi"}])], SamplingSettings())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def test_endpoint_answering_from_the_tiny_model(grounding, instances, chat_server, tiny_checkpoint, tmp_path):
    """The whole protocol with a real model behind it: images decoded by the server, the model's text scored."""
    from karl_verl.backends.base import GenerationRequest, SamplingSettings
    from karl_verl.backends.hf import HFBackend

    backend = HFBackend.from_pretrained(tiny_checkpoint, device="cpu", progress=False)
    lock = threading.Lock()

    def respond(text, images, body):
        request = GenerationRequest(messages=[{"role": "user", "content": "<image>" * len(images) + text}],
                                    images=images)
        sampling = SamplingSettings(temperature=body["temperature"], top_p=body["top_p"], n=body["n"],
                                    max_new_tokens=min(body["max_tokens"], 12), seed=body["seed"])
        with lock:  # one generate at a time, as one model replica serves
            return backend.generate([request], sampling)[0]

    server = chat_server(respond, model="tiny")
    summary = generate_cot(grounding, tmp_path / "cot.json", ChatCompletionsTeacher(server.url),
                           settings=CotSettings(tries=2), concurrency=2, progress=False)
    assert summary.pending == 0 and len(server.requests) == 2 * len(instances)
    # A random model does not write the KARL format: every reply is rejected, none is an error.
    assert sum(summary.rejected.values()) == len(instances)
    assert sum(sum(c.values()) for c in summary.reasons.values()) == 2 * len(instances)


def test_local_tiny_model_teacher(grounding, instances, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cot.json"
    status = main(["data", "cot", str(grounding), "--teacher", str(tiny_checkpoint), "--out", str(out), "--tries",
                   "1", "--max-new-tokens", "8", "--device", "cpu", "--no-progress"])
    assert status == 0
    assert f"kept 0 of {len(instances)} instances" in capsys.readouterr().out
    entries = [json.loads(line) for line in journal_path(out).read_text().splitlines()[1:]]
    assert len(entries) == len(instances) and all(e["tries"] == 1 and e["reasons"] for e in entries)


def test_builtin_set_is_valid_sft_data(builtin_cot, grounding, instances, tmp_path, fetch_image_calls, sft_dataset):
    records = json.loads(builtin_cot.read_text(encoding="utf-8"))
    assert len(records) == len(instances)
    for record, instance in zip(records, instances, strict=True):
        assert record["messages"][-1]["content"] == builtin_rationale(instance)
        assert judge_reply(record["messages"][-1]["content"], instance.boxes).iou == 1.0
    summary = convert_sharegpt([builtin_cot], tmp_path / "sft.parquet", progress=False)
    assert summary.rows == len(instances)
    assert pq.read_table(tmp_path / "sft.parquet").num_rows == len(instances)
    dataset, tokenizer = sft_dataset(tmp_path / "sft.parquet")  # what the stage-1 trainer reads
    item = dataset[0]
    assert tokenizer.decode(item["input_ids"][item["loss_mask"].bool()]).startswith(f"<think>The {instances[0].entity}")
