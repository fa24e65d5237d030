"""The teacher asked from every node of a Ray cluster (karl_verl/integration/reach.py), on two real Ray nodes.

Both nodes run on this machine (tests/_support/ray_nodes.py); the second one's processes get an HTTP
proxy that nothing serves (``http_proxy`` with ``no_proxy`` empty, which urllib honours for local
addresses too): a node whose network cannot reach the teacher, as a worker node behind another
firewall would be. The head node reaches it. About 30 s on 2 cores.
"""

import re
import socket

import pytest
from omegaconf import OmegaConf
from ray_nodes import TwoNodes

from karl_verl.config import InjectConfig
from karl_verl.integration.preflight import teacher_problems
from karl_verl.integration.reach import nodes_without_reply
from karl_verl.judge import RuleJudgeServer

pytestmark = pytest.mark.slow


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: nothing listens there


def test_a_teacher_one_node_cannot_reach_is_refused_naming_that_node():
    proxy = f"http://127.0.0.1:{_dead_port()}"
    blocked = {"http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}
    cluster = TwoNodes(second_node_env=blocked)
    try:
        with RuleJudgeServer() as teacher:
            env = {**cluster.env}
            missing = nodes_without_reply(teacher.url, cluster.address, timeout_s=3.0, env=env)
            # one node of two: the second, named by its address and id; the head answered
            [(node, why)] = missing.items()
            assert re.fullmatch(r"\S+ \(node [0-9a-f]{12}\)", node), node
            assert why.startswith(f"GET {teacher.url}/models failed"), why

            inject = InjectConfig(enable=True, source="teacher", teacher_url=teacher.url, teacher_model="t")
            config = OmegaConf.create({"ray_kwargs": {"ray_init": {"address": cluster.address}}})
            [problem] = teacher_problems(config, inject, environ={})
            assert problem.startswith(f"karl.inject.teacher_url: the teacher does not answer from {node}: GET ")
        # the control: with the teacher stopped, the head node fails too (so the head's pass above was real)
        both = nodes_without_reply(teacher.url, cluster.address, timeout_s=3.0, env=env)
        assert len(both) == 2 and [n for n in both if n.endswith(", head)")] and node in both
    finally:
        cluster.stop()


def test_a_cluster_that_cannot_be_joined_is_named():
    [(where, why)] = nodes_without_reply("http://127.0.0.1:9/v1", f"127.0.0.1:{_dead_port()}", timeout_s=1.0).items()
    assert where.startswith("ray cluster 127.0.0.1:") and why.startswith("cannot list its nodes: nothing answers")
