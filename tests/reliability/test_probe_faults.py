"""Probe faults (issue 6.3): a refresh that fails is abandoned cleanly and training goes on.

Faults are injected in the probe backend (the rollout servers' stand-in): an exception, a hang
past ``karl.mastery.probe_timeout_s`` (with a working and with a failing cancel), a worker that
answers fewer questions than asked, malformed answers (NaN, the wrong number of options, a
question with every letter at -inf), and a ``close()`` that raises. For each: the refresh is
recorded as failed, the previous table stays in force (the levels sent with the next prompts
prove it), ``karl/refresh/failed`` and a warning say so, and verl's ``fit`` runs to its last step.
"""

from __future__ import annotations

import random

import pytest
from reliability_kit import profile_name, record
from trainer_harness import (
    FAULTS,
    PROBED,
    FakeProbeBackend,
    FakeTQ,
    build_trainer,
    compose_base_config,
    knowledge,
    make_config,
    patched_services,
    run_training,
    write_probe_set,
)

from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer


@pytest.fixture(scope="module")
def base_config():
    return compose_base_config()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def expected_level(entity: str, last_ok_step: int) -> int:
    """Level of ``entity`` under the table probed at ``last_ok_step`` (the fake's accuracy is 0 or 1)."""
    if entity not in PROBED:
        return 5  # not in the table: the default level
    return 1 if entity in knowledge(last_ok_step - 1) else 5


def test_every_fault_during_fit_keeps_the_previous_table_and_training_goes_on(tmp_path, base_config, tokenizer):
    # A refresh before every step from step 2 on; one fault of each kind, good refreshes between.
    fault_steps = dict(zip([2, 3, 4, 6, 7, 9, 10, 11], FAULTS, strict=True))
    outcome = run_training(tmp_path, mastery={"refresh_every_steps": 1}, epochs=3, faults=fault_steps,
                           base_config=base_config, tokenizer=tokenizer, probe_timeout_s=0.75)

    assert outcome.global_steps == 13  # verl's fit ran all 12 steps (4 per epoch)
    assert sorted(outcome.injected) == sorted(fault_steps.items())
    history = outcome.state["history"]
    assert [(r["step"], r["status"]) for r in history] == [(1, "ok")] + [
        (step, "failed" if step in fault_steps else "ok") for step in range(2, 13)]
    for entry in history:
        assert (entry["error"] is None) == (entry["status"] == "ok")

    # The table in force at each step is the last good one: the levels the prompts carried say so.
    last_ok = 1
    for step in range(1, 13):
        if step > 1 and step not in fault_steps:
            last_ok = step
        sent = {(s["entity"], s["level"]) for s in outcome.scored if s["step"] == step}
        assert sent and all(level == expected_level(entity, last_ok) for entity, level in sent), (step, sent)
        for s in outcome.scored:
            assert s["level"] == s["sent_level"]  # the reward saw the level the trainer sent

    # A metric at each refresh, and a warning for each failure.
    failures = 0
    for step in range(2, 13):
        metrics = outcome.karl_metrics[step]
        failures += step in fault_steps
        assert metrics["karl/refresh/failed"] == float(step in fault_steps), step
        assert metrics["karl/refresh/failures_total"] == failures
    failed_warnings = [w for w in outcome.warnings if "training goes on with the previous table" in w]
    assert len(failed_warnings) == len(fault_steps)
    # The history names each cause.
    cause = {"exception": "ConnectionError: rollout server 3 went away", "hang": "ProbeTimeout",
             "cancel_raises": "cancel failed too", "short": "expected shape (8, 4), got (7, 4)", "nan": "no NaN",
             "wrong_width": "got (8, 3)", "all_inf": "every letter is -inf", "close_raises": "could not close"}
    errors = {r["step"]: r["error"] for r in history if r["status"] == "failed"}
    for step, fault in fault_steps.items():
        assert cause[fault] in errors[step], (fault, errors[step])
    record("faults", len(fault_steps))


def test_random_fault_sequences_never_disturb_the_table_in_force(tmp_path, base_config, tokenizer):
    """Many refreshes with faults drawn at random: after each, the table is the last good probe's."""
    rng = random.Random(6)
    refreshes = 40 * (5 if profile_name() == "long" else 1)
    kinds = [*FAULTS, None, None, None]
    faults = {step: kind for step in range(2, refreshes + 2) if (kind := rng.choice(kinds)) is not None}
    probe_path, image_entity = write_probe_set(tmp_path / "probe")
    # Short enough for many hangs, long enough for a good probe (8 questions) on a loaded CI machine.
    mastery = {"probe_data": probe_path, "probe_images_per_entity": 2, "probe_timeout_s": 0.4}
    config = make_config(base_config, tmp_path, mastery=mastery, total_epochs=1)
    tq = FakeTQ()
    backend = FakeProbeBackend(image_entity, knowledge, faults=faults)
    with patched_services(tq):
        trainer = build_trainer(config, tq, tokenizer, backend=backend)
        trainer.global_steps = 1
        trainer.on_train_begin()
        trainer.karl_consume_metrics()
        last_ok, failures = 1, 0
        for step in range(2, refreshes + 2):
            trainer.global_steps = step
            before = trainer.karl_state.table.to_json()
            result = trainer.karl_refresh("step")
            metrics = trainer.karl_consume_metrics()
            if step in faults:
                failures += 1
                assert result.status == "failed" and trainer.karl_state.table.to_json() == before, step
            else:
                assert result.status == "ok", (step, result.error)
                last_ok = step
            assert metrics["karl/refresh/failed"] == float(step in faults)
            assert metrics["karl/refresh/failures_total"] == failures
            for entity in (*PROBED, "Tu-160"):
                level = trainer.karl_level({}, {"ground_truth": f"<|object_ref_start|>{entity}<|object_ref_end|>"})[0]
                assert level == expected_level(entity, last_ok), (step, entity)
        backend.release.set()
    assert len(trainer.karl_state.history) == refreshes + 1
    record("faults", len(faults))


def test_an_abandoned_probe_that_finishes_late_is_ignored(tmp_path, base_config, tokenizer):
    """A hung probe whose cancel fails keeps running after the refresh gave up; its late answer is dropped."""
    import time

    probe_path, image_entity = write_probe_set(tmp_path / "probe")
    mastery = {"probe_data": probe_path, "probe_images_per_entity": 2, "probe_timeout_s": 0.5}
    config = make_config(base_config, tmp_path, mastery=mastery, total_epochs=1)
    tq = FakeTQ()
    backend = FakeProbeBackend(image_entity, knowledge, faults={5: "cancel_raises"})
    with patched_services(tq):
        trainer = build_trainer(config, tq, tokenizer, backend=backend)
        trainer.global_steps = 1
        trainer.on_train_begin()
        before = trainer.karl_state.table.to_json()
        trainer.global_steps = 5
        result = trainer.karl_refresh("step")
        assert result.status == "failed" and "cancel failed too" in result.error
        backend.release.set()  # the hung call now completes, in its abandoned thread
        deadline = time.monotonic() + 10
        while backend.completed < 2 and time.monotonic() < deadline:  # train begin, then the late one
            time.sleep(0.01)
        assert backend.completed == 2
        time.sleep(0.1)  # time for the abandoned thread to hand its result to no one
        assert trainer.karl_state.table.to_json() == before  # its result was not installed
        backend.faults.clear()
        trainer.global_steps = 6
        assert trainer.karl_refresh("step").status == "ok"  # and the next refresh works
        assert trainer.karl_state.table.level_of("MiG-29") == 1
    record("faults")
