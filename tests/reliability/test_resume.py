"""Resume equivalence (issue 6.4): stop after a refresh, resume from the checkpoint, get the same run.

verl's real ``fit`` with the ``karl`` trainer on CPU (``tests/_support/trainer_harness.py``: fakes only
for the GPU workers, the rollout servers and TransferQueue). A run is stopped right after a mastery
refresh (verl checkpoints at its last step), then resumed by a new trainer from that checkpoint, as
``trainer.resume_mode=auto`` does; it must end with the same mastery table, the same refresh
history (failed refreshes included), the same online posterior, and it must have given the same
per-sample levels (and rewards, and per-level metrics) at every step as an uninterrupted run on the
same data. One variant resumes in a fresh interpreter with another ``PYTHONHASHSEED``.

Also here: a damaged mastery state in a checkpoint is refused with an error naming the file,
never silently replaced by a fresh table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_kit import record
from trainer_harness import RunOutcome, compose_base_config, run_training

from karl_verl.integration.trainer import STATE_FILE
from karl_verl.mastery import MasteryError
from karl_verl.mastery_state import STATE_FORMAT, MasteryState
from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

HELPERS = Path(__file__).parent / "_helpers"

#: (mastery settings, step to stop at, probe faults, resume in a fresh interpreter). Steps per epoch: 4.
CASES = {
    # The paper's schedule plus refreshes: probe each epoch (steps 5, 9); stop right after step 5's.
    "probe-each-epoch": ({"refresh_every_epochs": 1}, 5, {}, False),
    # Probe + online posterior every 2 steps, a failed refresh before the stop; resume elsewhere.
    "blend-every-2-steps": ({"source": "blend", "refresh_every_steps": 2, "online_min_evidence": 2}, 7,
                            {3: "exception"}, True),
    # The online estimate only (probed once at train begin), refreshed every 3 steps.
    "online-every-3-steps": ({"source": "online", "refresh_every_steps": 3, "online_min_evidence": 2}, 4, {}, False),
}


@pytest.fixture(scope="module")
def base_config():
    return compose_base_config()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _resume_in_fresh_interpreter(workdir: Path, **kwargs) -> RunOutcome:
    out = workdir / "outcome.json"
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    arguments = json.dumps({**kwargs, "faults": {str(k): v for k, v in kwargs.get("faults", {}).items()}})
    done = subprocess.run([sys.executable, str(HELPERS / "resume_run.py"), str(workdir), str(out), arguments],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return RunOutcome.from_json(json.loads(out.read_text(encoding="utf-8")))


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, base_config, tokenizer, case):
    mastery, stop, faults, fresh = CASES[case]
    epochs = 3
    common = {"mastery": mastery, "epochs": epochs, "faults": faults}
    whole = run_training(tmp_path / "whole", **common, base_config=base_config, tokenizer=tokenizer)

    first = run_training(tmp_path / "split", **common, total_steps=stop, save_freq=stop, base_config=base_config,
                         tokenizer=tokenizer)
    assert first.global_steps == stop + 1
    assert (tmp_path / "split" / "ckpt" / f"global_step_{stop}" / STATE_FILE).is_file()
    if fresh:
        second = _resume_in_fresh_interpreter(tmp_path / "split", **common)
    else:
        second = run_training(tmp_path / "split", **common, base_config=base_config, tokenizer=tokenizer)
    assert second.resumed_from == f"global_step_{stop}"

    # The run did what the case says: it refreshed before the stop, and (for the blend case) failed once.
    history = whole.state["history"]
    assert any(r["step"] <= stop and r["trigger"] != "train_begin" for r in history)
    assert [r["step"] for r in history if r["status"] == "failed"] == sorted(faults)

    assert second.global_steps == whole.global_steps == 4 * epochs + 1
    assert second.state == whole.state  # table, base table, history, online posterior, unknown entities
    assert first.scored + second.scored == whole.scored  # same samples, same levels, same rewards, per step
    assert {**first.karl_metrics, **second.karl_metrics} == whole.karl_metrics
    assert second.final_levels == whole.final_levels
    # Levels really changed during the run, so "the same" is not trivially true.
    assert len({(s["entity"], s["level"]) for s in whole.scored}) > len({s["entity"] for s in whole.scored})
    record("resumes")


# ---------------------------------------------------------------------------------------------
# Damaged state in a checkpoint: refused, naming the file (never silently replaced by a fresh table)


def _state_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "ckpt" / "global_step_4" / STATE_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize("text", [
    "",
    '{"format": "karl-verl/mastery-state-v1", "table": {"format": "karl-verl/mastery-v1", "entit',
    '{"format": "something else"}',
    json.dumps({"format": STATE_FORMAT, "table": {"Su-30": {"knowledge_category": "very good"}}}),
    json.dumps({"format": STATE_FORMAT, "history": "not a list"}),
    "[" * 100_000,
])
def test_damaged_state_is_refused_naming_the_file(tmp_path, text):
    path = _state_file(tmp_path, text)
    with pytest.raises(MasteryError, match=STATE_FILE):
        MasteryState.load(path)
    record("bad_inputs")


def test_binary_state_file_is_refused_naming_the_file(tmp_path):
    path = _state_file(tmp_path, b"\x80\x04\x95 binary, e.g. a pickle")
    with pytest.raises(MasteryError, match=STATE_FILE):
        MasteryState.load(path)
    record("bad_inputs")


@pytest.mark.parametrize("value", [[["a"]], 5, [1, "a"]])
def test_state_with_malformed_unknown_entities_is_refused(tmp_path, value):
    path = _state_file(tmp_path, json.dumps({"format": STATE_FORMAT, "unknown_entities": value}))
    with pytest.raises(MasteryError, match=STATE_FILE):
        MasteryState.load(path).save(tmp_path / "again.json")


@pytest.mark.parametrize("counts", [{"Su-30": {}}, {"Su-30": [10**400, 1]}])
def test_state_with_malformed_online_counts_is_refused(tmp_path, counts):
    path = _state_file(tmp_path, json.dumps({"format": STATE_FORMAT, "online": {"counts": counts}}))
    with pytest.raises(MasteryError, match=STATE_FILE):
        MasteryState.load(path)
