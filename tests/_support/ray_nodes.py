"""Two Ray nodes on one machine (``ray start``), for tests of runs and checks that span nodes."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from karl_verl.cpu import environment

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TwoNodes:
    """A Ray head and a second node on 127.0.0.1 (``ray start``), stopped by :meth:`stop`."""

    def __init__(self, second_node_env: dict[str, str] | None = None) -> None:
        """``second_node_env``: variables of the second node's processes only (its raylet and workers)."""
        # Short: Ray's unix sockets live under it (a socket path has about 100 characters at most).
        self.temp_dir = tempfile.mkdtemp(prefix="kr2n", dir="/tmp")
        self.address = f"127.0.0.1:{_free_port()}"
        self.env = {**os.environ, **environment(), "RAY_AUTH_MODE": "disabled"}
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=8", "--num-gpus=1", "--disable-usage-stats"]
        try:
            self._ray("start", "--head", f"--port={self.address.split(':')[1]}", f"--temp-dir={self.temp_dir}",
                      "--include-dashboard=false", *common)
            self._ray("start", f"--address={self.address}", *common, env={**self.env, **(second_node_env or {})})
        except BaseException:
            self.stop()
            raise

    def _ray(self, *args: str, env: dict[str, str] | None = None) -> None:
        result = subprocess.run([RAY, *args], env=env or self.env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def actors(self) -> dict[str, set[str]]:
        """Actor class name -> the node ids it ran on (Ray's actor table, dead actors included)."""
        script = ("import json, ray\nfrom ray._private import state\n"
                  f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
                  "print(json.dumps([[a.get('ActorClassName'), a['Address']['NodeID']]\n"
                  "                  for a in state.actors().values()]))")
        result = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        placed: dict[str, set[str]] = defaultdict(set)
        for name, node in json.loads(result.stdout.strip().splitlines()[-1]):
            placed[name].add(node)
        return placed

    def stop(self) -> None:
        # Only this cluster's processes: each carries its session folder, under our temp dir, on its command line.
        subprocess.run(["pkill", "-f", self.temp_dir], check=False)
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
