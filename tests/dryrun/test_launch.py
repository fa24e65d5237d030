"""The dry run's child-process runner (karl_verl/dryrun/launch.py): metrics reading, sessions, cleanup.

``run_main_ppo`` always starts verl's ``main_ppo``; here its command is swapped for a small Python
script that logs steps the way verl's file logger does and leaves a straggler behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from karl_verl.dryrun import launch
from karl_verl.dryrun.launch import (
    RunResult,
    kill_session,
    main_ppo_command,
    read_step_metrics,
    run_main_ppo,
    sft_trainer_command,
)


def _alive(pid: int) -> bool:
    """Running (a zombie has ended: it only waits for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_read_step_metrics_keeps_whole_records_and_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_step_metrics(path) == []  # not written yet
    lines = [
        json.dumps({"step": 1, "data": {"actor/pg_loss": 0.5}}),
        json.dumps([1, 2]),  # not a record
        json.dumps({"step": 2}),  # no data
        json.dumps({"step": 2, "data": {"actor/pg_loss": 0.25}}),
        '{"step": 3, "data": {"actor/pg_lo',  # the writer was killed mid-line
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    assert read_step_metrics(path) == [
        {"step": 1, "data": {"actor/pg_loss": 0.5}},
        {"step": 2, "data": {"actor/pg_loss": 0.25}},
    ]


def test_run_result_ok_and_log_tail(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)), encoding="utf-8")
    result = RunResult(returncode=0, seconds=1.0, metrics_path=tmp_path / "m.jsonl", log_path=log)
    assert result.ok
    assert result.log_tail(3) == "line 47\nline 48\nline 49"
    assert not RunResult(returncode=1, seconds=1.0, metrics_path=log, log_path=log).ok
    assert not RunResult(returncode=0, seconds=1.0, metrics_path=log, log_path=log, timed_out=True).ok
    assert RunResult(returncode=0, seconds=0, metrics_path=log, log_path=tmp_path / "missing.log").log_tail() == ""


def test_main_ppo_command_runs_verls_entry_point_with_the_recipe():
    assert main_ppo_command("karl_kvg_cpu", ["trainer.total_epochs=2"]) == [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "+recipe=karl_kvg_cpu",
        "trainer.total_epochs=2",
    ]


def test_sft_trainer_command_runs_verls_sft_entry_point_with_the_recipe():
    assert sft_trainer_command("karl_cot_sft_cpu", ["trainer.total_epochs=3"]) == [
        sys.executable, "-m", "verl.trainer.sft_trainer", "+recipe=karl_cot_sft_cpu", "trainer.total_epochs=3"]


def _session_tree() -> subprocess.Popen:
    """A shell leading its own session, with two background children."""
    process = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    assert _wait_until(lambda: len(launch._session_pids(process.pid)) == 3)
    return process


def test_kill_session_ends_the_whole_session_and_nothing_else():
    outsider = subprocess.Popen(["sleep", "60"])  # this test's own session
    tree = _session_tree()
    try:
        members = launch._session_pids(tree.pid)
        assert tree.pid in members and outsider.pid not in members
        assert kill_session(tree.pid) == 3
        assert tree.wait(timeout=10) == -9
        assert _wait_until(lambda: not any(_alive(pid) for pid in members))
        assert _alive(outsider.pid) and _alive(os.getpid())
        assert kill_session(tree.pid) == len(launch._session_pids(tree.pid))  # only what is left, if anything
    finally:
        outsider.kill()
        outsider.wait()
        kill_session(tree.pid)


FAKE_MAIN_PPO = textwrap.dedent("""
    import json, os, subprocess, sys, time
    steps, hang = int(sys.argv[1]), sys.argv[2] == "hang"
    # A straggler in the run's session, as Ray's daemons outlive their driver.
    straggler = subprocess.Popen(["sleep", "60"])
    open(sys.argv[3], "w").write(str(straggler.pid))
    print("fake main_ppo starting", flush=True)
    path = os.environ["VERL_FILE_LOGGER_PATH"]
    for step in range(1, steps + 1):
        with open(path, "a") as log:
            log.write(json.dumps({"step": step, "data": {"actor/pg_loss": step / 10}}) + "\\n")
        time.sleep(0.2)
    if hang:
        time.sleep(60)
""")


@pytest.fixture
def fake_main_ppo(tmp_path, monkeypatch):
    script = tmp_path / "fake_main_ppo.py"
    script.write_text(FAKE_MAIN_PPO, encoding="utf-8")
    straggler_file = tmp_path / "straggler.pid"

    def command(recipe, overrides):
        return [sys.executable, str(script), *overrides, str(straggler_file)]

    monkeypatch.setattr(launch, "main_ppo_command", command)
    return lambda: int(straggler_file.read_text())


def test_run_main_ppo_reports_steps_and_kills_stragglers(tmp_path, fake_main_ppo):
    metrics = tmp_path / "out" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"step": 99, "data": {}}) + "\n", encoding="utf-8")  # a previous run's
    seen = []
    result = run_main_ppo(
        "karl_kvg_cpu",
        ["3", "exit"],
        metrics_path=metrics,
        log_path=tmp_path / "logs" / "run.log",
        timeout_s=60,
        on_step=seen.append,
    )
    assert result.ok and result.returncode == 0 and result.killed_after_step is None
    assert [record["step"] for record in result.steps] == [1, 2, 3]
    assert seen == [1, 2, 3]  # each step once, in order
    assert "fake main_ppo starting" in result.log_tail()
    assert result.peak_memory_bytes > 0
    assert _wait_until(lambda: not _alive(fake_main_ppo()))  # the straggler did not outlive the run


def test_run_main_ppo_kills_the_session_after_the_given_step(tmp_path, fake_main_ppo):
    seen = []
    result = run_main_ppo(
        "karl_kvg_cpu",
        ["2", "hang"],
        metrics_path=tmp_path / "metrics.jsonl",
        log_path=tmp_path / "run.log",
        timeout_s=60,
        kill_after_step=2,
        on_step=seen.append,
    )
    assert result.killed_after_step == 2 and result.returncode == -9 and not result.ok
    assert [record["step"] for record in result.steps] == [1, 2] and seen == [1, 2]
    assert result.seconds < 60
    assert _wait_until(lambda: not _alive(fake_main_ppo()))


def test_run_main_ppo_times_out(tmp_path, fake_main_ppo):
    result = run_main_ppo(
        "karl_kvg_cpu",
        ["1", "hang"],
        metrics_path=tmp_path / "metrics.jsonl",
        log_path=tmp_path / "run.log",
        timeout_s=1.5,
    )
    assert result.timed_out and not result.ok and result.returncode == -9
    assert result.seconds < 30
    assert _wait_until(lambda: not _alive(fake_main_ppo()))


LEAKER = textwrap.dedent("""
    import sys, time
    from multiprocessing import resource_tracker, shared_memory
    segment = shared_memory.SharedMemory(create=True, size=4096)
    resource_tracker.unregister(segment._name, "shared_memory")  # leaked for good, as a killed worker's is
    print(segment.name, flush=True)
    time.sleep(float(sys.argv[1]))
    sys.exit(0)
""")


def test_a_runs_shared_memory_is_removed_and_nobody_elses(tmp_path):
    """vLLM leaves /dev/shm buffers behind even on a clean exit; the launcher removes what the run's
    processes held (seen while they ran) and leaves a file this process made alone."""
    from multiprocessing import shared_memory

    ours = shared_memory.SharedMemory(create=True, size=4096)
    try:
        result = launch.run_verl_child([sys.executable, "-c", LEAKER, "3"], metrics_path=tmp_path / "m.jsonl",
                                       log_path=tmp_path / "run.log", timeout_s=60)
        name = result.log_tail().strip().splitlines()[0].lstrip("/")
        leaked = f"{launch.SHARED_MEMORY_DIR}/{name}"
        assert result.ok and result.shared_memory_removed == [leaked]
        assert not os.path.exists(leaked)
        assert os.path.exists(f"{launch.SHARED_MEMORY_DIR}/{ours.name.lstrip('/')}")
    finally:
        ours.close()
        ours.unlink()


def test_shared_memory_files_reads_maps_and_open_files_of_the_given_processes(tmp_path):
    from multiprocessing import shared_memory

    segment = shared_memory.SharedMemory(create=True, size=4096)
    try:
        path = f"{launch.SHARED_MEMORY_DIR}/{segment.name.lstrip('/')}"
        assert path in launch.shared_memory_files([os.getpid()])
        assert path not in launch.shared_memory_files([])
        other = tmp_path / "not-shared"
        other.write_text("x")
        assert launch.remove_shared_memory({str(other / "missing")}) == []
    finally:
        segment.close()
        segment.unlink()
