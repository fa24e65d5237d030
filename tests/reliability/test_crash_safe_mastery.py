"""Crash-safe mastery state (issue 6.2): a killed writer never leaves a partial or mixed table.

Writer processes save table A, B, A, B... (or B, A, B...) in a tight loop (forked by ``_helpers/writer_server.py``,
a separate interpreter); the test kills each with SIGKILL after a random delay, many times. After
every kill the file loads and equals A or B. All the while a reader in another process
(``_helpers/load_loop.py``) loads the file in a loop, as reward workers and the evaluator do while
the trainer swaps the table: it must never see an error or a table other than A or B.

Killed writers may leave their hidden temporary file (``.NAME.<random>.tmp``) behind: it is never
read (loaders open the exact name) and goes with the checkpoint folder; the test checks that these
are the only leftovers, at most one per kill.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from crash_fixtures import loader, pair
from reliability_kit import profile_name, record

from karl_verl.mastery import MasteryTable

HELPERS = Path(__file__).parent / "_helpers"

#: Kills per run; the ``long`` profile multiplies them.
KILLS = {"table": 60, "state": 25}


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPERS / script), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_line(proc: subprocess.Popen, expected: str) -> str:
    line = proc.stdout.readline()
    if not line.startswith(expected):
        proc.kill()
        raise AssertionError(f"helper said {line!r}, expected {expected!r}: {proc.stderr.read()[-2000:]}")
    return line.strip()


def _ask(proc: subprocess.Popen, command: str) -> None:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()


def _wait_for_new_temp(folder: Path, known: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(name.endswith(".tmp") and name not in known for name in os.listdir(folder)):
            return


def _wait_for_new_inode(path: Path, inode: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.stat(path).st_ino != inode:
                return
        except FileNotFoundError:  # never expected: the rename is atomic; keep polling to fail below
            pass
    raise AssertionError(f"no writer's save replaced {path} within {timeout:.0f} s")


@pytest.mark.parametrize("kind", ["table", "state"])
def test_sigkill_at_random_moments_never_leaves_a_partial_file(tmp_path, kind):
    rng = random.Random(f"crash-{kind}")
    kills = KILLS[kind] * (5 if profile_name() == "long" else 1)
    a, b = pair(kind)
    load = loader(kind)
    a_json, b_json = a.to_json(), b.to_json()
    path = tmp_path / "mastery.json"
    b.save(path)

    server = _spawn("writer_server.py", str(path), kind)
    save_s, encode_s = (float(v) for v in _read_line(server, "ready").split()[1:])
    stop = tmp_path / "stop"
    reader = _spawn("load_loop.py", str(path), kind, str(stop))
    _read_line(reader, "ready")
    seen: Counter[str] = Counter()
    leftovers: list[Path] = []
    mid_write = 0
    live = None  # a writer spawned and not yet reaped: killed in `finally` if the test fails meanwhile
    try:
        for i in range(kills):
            # Odd kills alternate the table a writer saves first, so that both tables become current
            # even on a loaded machine where a writer rarely finishes two saves before its kill.
            first = (i // 2) % 2
            before = os.stat(path).st_ino
            _ask(server, f"spawn {first}")
            pid = live = int(_read_line(server, ""))
            if i % 2:
                # After the first save landed (a rename gives the name a new inode), anywhere in the
                # next two: before, inside and between writes.
                _wait_for_new_inode(path, before, timeout=60.0)
                time.sleep(rng.uniform(0.0, 2 * save_s))
            else:
                # Most of a save is JSON encoding, before the temporary file exists, so uniform delays
                # rarely land inside the file write: wait for a new temporary file to appear instead.
                _wait_for_new_temp(tmp_path, {p.name for p in leftovers}, timeout=encode_s + 3 * save_s)
            os.kill(pid, signal.SIGKILL)
            _ask(server, "reap")
            _read_line(server, "reaped")
            live = None
            got = load(path).to_json()
            assert got in (a_json, b_json), "the file after a kill is neither table A nor table B"
            seen["A" if got == a_json else "B"] += 1
            now = sorted(p for p in tmp_path.iterdir() if p.name not in (path.name, stop.name))
            mid_write += len(now) > len(leftovers)
            leftovers = now
    finally:
        if live is not None:
            os.kill(live, signal.SIGKILL)
        stop.touch()
        out, _ = reader.communicate(timeout=60)
        server.communicate(timeout=30)
    stats = json.loads(out.strip().splitlines()[-1])

    # Both tables were current after some kill: the writers made progress, kills hit live writes.
    assert seen["A"] and seen["B"], seen
    assert all(re.fullmatch(r"\.mastery\.json\..+\.tmp", p.name) for p in leftovers), leftovers
    assert len(leftovers) <= kills
    assert stats["errors"] == 0, stats["first_error"]
    assert stats["mismatches"] == 0
    # The table was really swapped under the reader, and every load was a whole table.
    assert stats["saw_a"] > 0 and stats["saw_b"] > 0, stats
    assert stats["saw_a"] + stats["saw_b"] == stats["loads"]
    record("kills", kills)
    record("kills_mid_write", mid_write)
    record("reader_loads", stats["loads"])


def test_a_failing_write_keeps_the_previous_table_and_cleans_up(tmp_path, monkeypatch):
    """Disk full half-way through a save: the old table stays, and no temporary file is left."""
    a, b = pair("table")
    path = a.save(tmp_path / "mastery.json")

    def half_then_fail(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        b.save(path)
    monkeypatch.undo()
    assert MasteryTable.load(path) == a
    assert [p.name for p in tmp_path.iterdir()] == ["mastery.json"]


def test_leftover_temp_files_are_never_read(tmp_path):
    """A killed writer's partial temp file beside the table affects neither loading nor saving."""
    a, b = pair("table")
    path = a.save(tmp_path / "mastery.json")
    text = json.dumps(b.to_json())
    (tmp_path / ".mastery.json.abc123.tmp").write_text(text[: len(text) // 3], encoding="utf-8")
    assert MasteryTable.load(path) == a
    b.save(path)
    assert MasteryTable.load(path) == b


def test_reward_rereads_a_table_swapped_with_the_same_size_and_mtime(tmp_path):
    from karl_verl.reward import compute_score

    # Same byte size: level 2 "mostly correct" with score 0.455, level 4 "mostly incorrect" with 0.1.
    a = MasteryTable.from_scores({"Su-30": 0.455})
    b = MasteryTable.from_scores({"Su-30": 0.1})
    path = a.save(tmp_path / "mastery.json")
    stat = path.stat()
    gt = "<|object_ref_start|>Su-30<|object_ref_end|>(1,1),(9,9)"
    assert compute_score("kvg", "x", gt, mastery_path=str(path))["knowledge_level"] == 2
    b.save(path)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same timestamp tick as the first save
    assert compute_score("kvg", "x", gt, mastery_path=str(path))["knowledge_level"] == 4
