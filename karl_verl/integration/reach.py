"""Whether an OpenAI-compatible endpoint answers from every node of a Ray cluster.

verl places agent-loop workers round-robin over all nodes (``agent_loop.py``), and karl-verl's
injection agent loop calls the teacher (``karl.inject.teacher_url``) from inside them: a teacher
that only the head node can reach makes every other node's injected rollouts fall back to sampling,
seen only in ``karl/inject/fallbacks``. So the stop-before-Ray check and ``karl-verl dryrun`` ask the
endpoint's model list from each alive node of the cluster the run will join (a zero-CPU Ray task
pinned to the node), and name the nodes that get no answer.

What runs where: :func:`nodes_without_reply` starts a short child process (``python -m
karl_verl.integration.reach``) that connects to the cluster as its own Ray driver and disconnects,
so the launching process never holds a Ray connection before verl's own ``ray.init``. Runs
wherever a Ray cluster is up, CPU or GPU; tested on CPU with two ``ray start`` nodes on one machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

#: Seconds a model-list request may take, from this machine or from a node (judge and teacher checks).
MODELS_CHECK_TIMEOUT_S = 5.0


def models_unreachable(url: str, timeout_s: float = MODELS_CHECK_TIMEOUT_S) -> str | None:
    """Why ``GET <url>/models`` (an OpenAI-compatible API base) gives no model list within ``timeout_s``, or None."""
    import urllib.error
    import urllib.request

    models = f"{url.rstrip('/').removesuffix('/chat/completions')}/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(models, method="GET"), timeout=timeout_s) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as err:
        return f"GET {models} answered HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"GET {models} failed ({getattr(err, 'reason', err)})"
    if not isinstance(reply, dict) or not isinstance(reply.get("data"), list):
        return f"GET {models} is no OpenAI model list: {reply!r:.120}"
    return None


def nodes_without_reply(url: str, address: str, *, timeout_s: float = MODELS_CHECK_TIMEOUT_S,
                        env: dict[str, str] | None = None) -> dict[str, str]:
    """Node -> why, for each alive node of the Ray cluster at ``address`` from which ``url`` does not answer.

    A node is named ``<ip> (node <first 12 hex digits of its id>)``, ``, head`` added for the head node.
    When the cluster itself cannot be reached or listed, the one entry ``"ray cluster <address>"`` says why.
    """
    if why := _no_listener(address):
        return {f"ray cluster {address}": why}
    command = [sys.executable, "-m", "karl_verl.integration.reach", "--address", address, "--url", url,
               "--timeout", str(timeout_s)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60 + 2 * timeout_s, env=env,
                                check=False)
    except subprocess.TimeoutExpired:
        return {f"ray cluster {address}": f"no answer from the node check within {60 + 2 * timeout_s:g} s"}
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {f"ray cluster {address}": f"cannot list its nodes ({tail[:300]})"}
    return {node: why for node, why in json.loads(lines[-1]).items() if why is not None}


def _no_listener(address: str) -> str | None:
    """Why nothing accepts a connection at a ``host:port`` address (None: something does, or not host:port).

    ``ray.init`` keeps retrying an address nobody serves for minutes; a closed port is told at once.
    """
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None  # "auto" and the like: ray.init finds the cluster itself
    try:
        with socket.create_connection((host, int(port)), timeout=5.0):
            return None
    except OSError as err:
        return f"cannot list its nodes: nothing answers at {address} ({err})"


def _check_nodes(url: str, address: str, timeout_s: float) -> dict[str, str | None]:
    """In the child: node -> why (None: answered), one pinned task per alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        ask = ray.remote(num_cpus=0, max_retries=0)(models_unreachable)
        pending: dict[str, Any] = {}
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            head = ", head" if "node:__internal_head__" in (node.get("Resources") or {}) else ""
            label = f"{node.get('NodeManagerAddress', '?')} (node {str(node['NodeID'])[:12]}{head})"
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            pending[label] = ask.options(scheduling_strategy=strategy).remote(url, timeout_s)
        out: dict[str, str | None] = {}
        for label, ref in pending.items():
            try:
                out[label] = ray.get(ref, timeout=60 + timeout_s)
            except Exception as err:  # a node that cannot run the task cannot run agent-loop workers either
                out[label] = f"the check task did not run there ({type(err).__name__}: {str(err)[:200]})"
        return out
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask an OpenAI-compatible endpoint's model list from every Ray node")
    parser.add_argument("--address", required=True, help="the Ray cluster (host:port, or auto)")
    parser.add_argument("--url", required=True, help="the API base, e.g. http://teacher:8000/v1")
    parser.add_argument("--timeout", type=float, default=MODELS_CHECK_TIMEOUT_S)
    args = parser.parse_args(argv)
    print(json.dumps(_check_nodes(args.url, args.address, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
