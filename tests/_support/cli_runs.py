"""Run a karl-verl command (``python -m karl_verl ...``) from a test so that it cannot outlive the test.

The commands start ``main_ppo`` in a session of its own (karl_verl/dryrun/launch.py), and kill that
session when they are interrupted. ``subprocess.run`` kills only the command itself when its timeout
or pytest-timeout fires, leaving the training run orphaned and using both cores for the tests after
it (seen: an experiment run still training 15 minutes after its test timed out). Here the command
gets SIGINT first, so its own cleanup stops the run, then SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from typing import Any

#: Seconds the command has to stop its run after SIGINT before it is killed.
GRACE_S = 60.0


def run_command(command: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)``, interrupting the
    command (SIGINT, then SIGKILL after :data:`GRACE_S`) when it times out or the test is stopped."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=GRACE_S)
        except BaseException:
            process.kill()
            process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
