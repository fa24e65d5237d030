"""iVGR in the karl trainer (karl_verl/integration/features/ivgr.py): stream expansion on a hand-made
prompt batch, and short runs of verl's real fit loop (tests/_support/trainer_harness.py) against a local
rule judge (karl_verl.judge.RuleJudgeServer): paired streams with their own uids, the teacher cache,
the judge's term in the textual rewards, the cache across a resume, and a judge that fails or is late."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from trainer_harness import (
    ALPHA,
    FakeProbeBackend,
    FakeRollout,
    FakeTQ,
    RecordingTracking,
    build_trainer,
    compose_base_config,
    dataset_rows,
    knowledge,
    make_config,
    patched_services,
    policy,
    write_probe_set,
)
from verl.trainer.ppo.v1 import trainer_base  # noqa: F401  (verl first: importing the features first is circular)
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import collate_fn

from karl_verl.config import LOCAL_JUDGE
from karl_verl.integration.features import Ivgr
from karl_verl.integration.features.ivgr import CACHE_FILE, QUESTION_FIELD, expand_streams, render_messages
from karl_verl.integration.tq_fields import padded, row_field
from karl_verl.ivgr import GROUNDED, INSTANCE_FIELD, STREAM_FIELD, TEXTUAL, render_prompt
from karl_verl.judge import RuleJudgeServer
from karl_verl.mastery_state import LEVEL_FIELD
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

WEIGHT = 0.5


@pytest.fixture(scope="module")
def base_config():
    return compose_base_config()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def judge():
    server = RuleJudgeServer().start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- expansion, by hand


def prompt_batch(uids=("u1", "u2")):
    batch_dict = collate_fn(dataset_rows()[:len(uids)])
    batch_dict["uid"] = np.array(list(uids), dtype=object)
    return tu.get_tensordict(batch_dict)


def test_expansion_gives_each_instance_its_grounded_then_its_textual_row():
    batch = prompt_batch()
    expanded = expand_streams(batch)
    assert len(expanded) == 4
    assert list(expanded["uid"]) == ["u1/grounded", "u1/textual", "u2/grounded", "u2/textual"]
    infos = row_field(expanded, "extra_info", 4)
    assert [i[STREAM_FIELD] for i in infos] == [GROUNDED, TEXTUAL, GROUNDED, TEXTUAL]
    assert [i[INSTANCE_FIELD] for i in infos] == ["0", "0", "1", "1"]
    assert [i[QUESTION_FIELD] for i in infos] == ["Find Su-30.", "Find Su-30.", "Find F-16.", "Find F-16."]
    prompts = row_field(expanded, "raw_prompt", 4)
    assert prompts[0] == [{"role": "user", "content": render_prompt(GROUNDED, "Find Su-30.")}]
    assert prompts[3] == [{"role": "user", "content": render_prompt(TEXTUAL, "Find F-16.")}]
    # Every other field is the instance's, in both rows; the input batch is left as it was.
    assert row_field(expanded, "reward_model", 4)[1] == row_field(batch, "reward_model", 2)[0]
    assert list(expanded["index"]) == [0, 0, 1, 1] and expanded["dummy_tensor"].shape == (4, 1)
    assert list(batch["uid"]) == ["u1", "u2"] and row_field(batch, "extra_info", 2)[0] == {"index": 0}


def test_expansion_names_what_a_row_lacks():
    batch = prompt_batch()
    tu.assign_non_tensor_stack(batch, "extra_info", [{"index": 0}, {}])
    with pytest.raises(ValueError, match=r"row 1: no extra_info\['index'\]"):
        expand_streams(batch)


def test_rendering_keeps_image_parts_in_place_and_other_messages():
    image = {"type": "image", "image": "IMG"}
    messages = [{"role": "system", "content": "sys"},
                {"role": "user", "content": [image, {"type": "text", "text": "Find the Su-30."}]}]
    rendered, question = render_messages(messages, TEXTUAL, {TEXTUAL: "Q: {question} Words only."})
    assert question == "Find the Su-30." and rendered[0] is messages[0]
    assert rendered[1]["content"] == [{"type": "text", "text": "Q: "}, image,
                                      {"type": "text", "text": "Find the Su-30."},
                                      {"type": "text", "text": " Words only."}]
    assert messages[1]["content"][0] is image and len(messages[1]["content"]) == 2  # input untouched
    plain, _ = render_messages([{"role": "user", "content": "<image>Find X"}], GROUNDED)
    assert plain[0]["content"] == render_prompt(GROUNDED, "<image>Find X")


# ----------------------------------------------------------------------------- runs


def answer(entity: str, session: int, step: int, *, prompt: dict) -> str:
    """The fake model per stream: the same words, with boxes in the grounded stream only."""
    stream = prompt["extra_info"][STREAM_FIELD]
    box = re.search(r"<answer>(.*)</answer>", policy(entity, session, step))[1]
    where = " at [100,100,300,300]" if stream == GROUNDED else ""
    return f"<think>The {entity}{where} has twin tails and canards.</think><answer>{box}</answer>"


def run(workdir: Path, base_config, tokenizer, judge_url: str, *, total_steps: int = 2, save_freq: int = -1,
        ivgr: dict | None = None):
    """A short fit with iVGR on; returns (trainer, feature, steps: [{rows of the step's trained batch}])."""
    probe_path, image_entity = write_probe_set(workdir / "probe")
    mastery = {"probe_data": probe_path, "probe_images_per_entity": 2, "probe_timeout_s": 2.0}
    config = make_config(base_config, workdir, mastery=mastery, advantage=ALPHA, total_epochs=1, save_freq=save_freq)
    config.karl.ivgr = {"enable": True, "judge_url": judge_url, "judge_model": "rule-judge", "judge_samples": 2,
                        "consistency_weight": WEIGHT, **(ivgr or {})}
    tq = FakeTQ()
    steps: list[dict] = []
    with patched_services(tq):
        trainer = build_trainer(config, tq, tokenizer, backend=FakeProbeBackend(image_entity, knowledge),
                                total_steps=total_steps, seed=7)
        feature = trainer.karl_feature(Ivgr)
        before = feature.before_advantage

        def recording(batch, metrics):
            keys = [k for k, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding")]
            karl = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["rm_scores"])
            before(batch, metrics)
            data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id,
                                   select_fields=["uid", "extra_info", LEVEL_FIELD, "rm_scores"])
            steps.append({"step": trainer.global_steps, "keys": keys, "uid": row_field(data, "uid", len(keys)),
                          "extra_info": row_field(data, "extra_info", len(keys)),
                          "level": row_field(data, LEVEL_FIELD, len(keys)),
                          "karl_reward": padded(karl["rm_scores"]).sum(-1).tolist(),
                          "reward": padded(data["rm_scores"]).sum(-1).tolist(),
                          "judged": {row["key"]: row for row in feature.step_rows},
                          "cache": json.loads(feature.cache.to_json())["entries"]})

        feature.before_advantage = recording
        trainer.fit(FakeRollout(tq, config, tokenizer, answer=answer))
    return trainer, feature, steps


def test_a_run_pairs_the_streams_fills_the_cache_and_adds_the_judge_term(tmp_path, base_config, tokenizer, judge):
    trainer, feature, steps = run(tmp_path, base_config, tokenizer, judge.url)
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        # (i) both streams of every instance, n rollouts each, distinct uids per stream, the same level
        by_instance: dict[str, dict[str, set]] = {}
        levels: dict[str, set] = {}
        for uid, info, level in zip(step["uid"], step["extra_info"], step["level"], strict=True):
            by_instance.setdefault(info[INSTANCE_FIELD], {}).setdefault(info[STREAM_FIELD], set()).add(uid)
            levels.setdefault(info[INSTANCE_FIELD], set()).add(int(level))
        assert len(by_instance) == 2 and len(step["uid"]) == 2 * 2 * 4
        for instance, streams in by_instance.items():
            assert set(streams) == {GROUNDED, TEXTUAL}
            assert all(len(uids) == 1 for uids in streams.values())
            assert streams[GROUNDED] != streams[TEXTUAL]
            assert len(levels[instance]) == 1
        # (ii) the cache holds the step's correct grounded reasoning of each instance that had one
        for instance in by_instance:
            correct = [r for r, i in zip(step["karl_reward"], step["extra_info"], strict=True)
                       if i[INSTANCE_FIELD] == instance and i[STREAM_FIELD] == GROUNDED and r > 0.5]
            if correct:
                assert instance in step["cache"] and "[100,100,300,300]" in step["cache"][instance]["response"]
        # (iii) textual rewards: the KARL reward + weight x judge score, exactly; grounded ones unchanged
        for key, info, karl, reward in zip(step["keys"], step["extra_info"], step["karl_reward"], step["reward"],
                                           strict=True):
            if info[STREAM_FIELD] == GROUNDED:
                assert reward == karl
                continue
            row = step["judged"][key]
            assert row["karl_reward"] == pytest.approx(karl)
            if row["no_reference"]:
                assert reward == karl and info[INSTANCE_FIELD] not in step["cache"]
            else:
                assert row["judge_score"] == 1.0 and row["judge_failures"] == 0  # same words, boxes aside
                assert reward == pytest.approx(karl + WEIGHT * row["judge_score"], abs=1e-6)
    assert any(not row["no_reference"] for step in steps for row in step["judged"].values())
    logged = dict(RecordingTracking.logged)
    assert logged[1]["ivgr/cache_size"] >= 1 and logged[1]["ivgr/judge_failures"] == 0
    for name in ("ivgr/grounded/reward_mean", "ivgr/textual/reward_mean", "ivgr/textual/acc@0.5",
                 "ivgr/cache_coverage", "ivgr/judge_time_s", "ivgr/judge_time_share", "ivgr/no_reference",
                 "ivgr/textual/karl_reward_mean", "ivgr/consistency_term_mean"):
        assert name in logged[2], name
    for step in steps:  # each stream its own groups, every uid its stream's (read back from TransferQueue)
        instances = len({info[INSTANCE_FIELD] for info in step["extra_info"]})
        assert logged[step["step"]]["ivgr/grounded/groups"] == logged[step["step"]]["ivgr/textual/groups"] == instances
        assert logged[step["step"]]["ivgr/uid_mismatch"] == 0
    for step in steps:  # a judge score mean on the steps that judged something, and only there
        scores = [row["judge_score"] for row in step["judged"].values() if row["judge_score"] is not None]
        assert logged[step["step"]].get("ivgr/judge_score_mean") == (pytest.approx(sum(scores) / len(scores))
                                                                      if scores else None)
        assert logged[step["step"]]["ivgr/no_reference"] == sum(r["no_reference"] for r in step["judged"].values())
    assert any(re.fullmatch(r"ivgr/textual/level_\d/reward_mean", name) for name in logged[2])
    assert judge.requests >= 2


def test_judge_url_local_is_a_rule_judge_the_trainer_serves(tmp_path, base_config, tokenizer):
    _, feature, steps = run(tmp_path, base_config, tokenizer, LOCAL_JUDGE)
    try:
        judged = [row for step in steps for row in step["judged"].values() if not row["no_reference"]]
        assert judged and all(row["judge_score"] == 1.0 and row["judge_failures"] == 0 for row in judged)
        assert feature.local_judge is not None and feature.local_judge.requests == 2 * len(judged)
        assert feature.judge.endpoint == f"{feature.local_judge.url}/chat/completions"
    finally:
        feature.local_judge.stop()  # at the end of a real run, the process's exit stops it (atexit)


def test_the_cache_is_saved_with_each_checkpoint_and_restored_on_resume(tmp_path, base_config, tokenizer, judge):
    _, feature, _ = run(tmp_path, base_config, tokenizer, judge.url, total_steps=2, save_freq=1)
    saved = tmp_path / "ckpt" / "global_step_2" / CACHE_FILE
    assert saved.is_file() and (tmp_path / "ckpt" / "global_step_1" / CACHE_FILE).is_file()
    assert len(feature.cache) >= 1
    # A resumed run (total_steps reached: it restores and stops) holds the cache of the checkpoint.
    resumed, again, steps = run(tmp_path, base_config, tokenizer, judge.url, total_steps=2, save_freq=1)
    assert resumed.global_steps >= 2 and steps == []
    assert again.cache.to_json() == feature.cache.to_json() == saved.read_text()


def test_a_resume_without_cache_file_starts_empty(tmp_path, base_config, tokenizer, judge, caplog):
    trainer, feature, _ = run(tmp_path, base_config, tokenizer, judge.url, total_steps=1)
    feature.load_state(str(tmp_path / "nowhere"))
    assert len(feature.cache) == 0
    assert any(CACHE_FILE in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failure", ["garbage", "late"])
def test_a_failing_judge_is_survived_with_the_karl_reward(tmp_path, base_config, tokenizer, failure):
    server = RuleJudgeServer(mode="garbage" if failure == "garbage" else "ok",
                             delay_s=5.0 if failure == "late" else 0.0).start()
    try:
        budget = {"judge_budget_s": 0.5, "judge_timeout_s": 0.3, "judge_retries": 0}
        _, feature, steps = run(tmp_path, base_config, tokenizer, server.url, ivgr=budget)
    finally:
        server.stop()
    judged = [row for step in steps for row in step["judged"].values() if not row["no_reference"]]
    assert judged, "some textual rollout had a reference"
    assert all(row["judge_score"] is None and row["judge_failures"] == 2 for row in judged)
    for step in steps:
        assert step["reward"] == step["karl_reward"]
    logged = dict(RecordingTracking.logged)
    assert sum(logged[s]["ivgr/judge_failures"] for s in logged) == 2 * len(judged)
    assert all("ivgr/judge_score_mean" not in logged[s] for s in logged)
    assert all(logged[s]["ivgr/judge_time_s"] < 3.0 for s in logged)
