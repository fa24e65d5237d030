"""The iVGR judge: the HTTP client against a local rule judge server (scores, failures, budget, concurrency)."""

import doctest
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import karl_verl.judge as judge_module
from karl_verl.config import IvgrConfig
from karl_verl.judge import JudgeClient, RuleJudgeServer, failure_kind, rule_score

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Find and give the bounding box of the Fiat 500"
REFERENCE = "The red car on the left [120,340,410,560] has round headlights and a chrome grille, so it is the Fiat 500."
SAME = "The red car on the left has round headlights and a chrome grille, so it is the Fiat 500."
MISSING = "The red car on the left has round headlights, so it is the Fiat 500."
EXTRA_AND_MISSING = "The red car on the left has a sunroof and alloy wheels, so it is the Fiat 500."
UNRELATED = "A tall building with many windows stands behind the trees."
CONTRADICTS = "The red car on the left has round headlights and a chrome grille, so it is not the Fiat 500."


@pytest.fixture
def start_judge():
    """Start RuleJudgeServers with the given options; every one is stopped when the test ends, pass or fail."""
    servers = []

    def start(**options):
        server = RuleJudgeServer(**options)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def _client(url, **options):
    return JudgeClient(url, "rule-judge", **{"samples": 2, "timeout_s": 5.0, "budget_s": 20.0, **options})


def test_failure_kinds_of_messages_the_client_does_not_write_itself():
    assert failure_kind("reply from http://h/v1/chat/completions is not JSON: b'<html>'") == "not JSON"
    assert failure_kind("http://h/v1/models lists no model; set karl.ivgr.judge_model") == "no model listed"
    assert failure_kind("ConnectionResetError: [Errno 104] Connection reset by peer") == "ConnectionResetError"
    assert failure_kind("something else") == "other"


def test_the_doctests_run():
    result = doctest.testmod(judge_module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(("candidate", "score"), [
    (SAME, 1.0), (MISSING, 0.7), (EXTRA_AND_MISSING, 0.3), (UNRELATED, 0.0), (CONTRADICTS, 0.0), ("", 0.0)])
def test_rule_score(candidate, score):
    assert rule_score(REFERENCE, candidate) == score


def test_the_client_gets_the_rule_judges_scores(start_judge):
    server = start_judge()
    candidates = [SAME, MISSING, EXTRA_AND_MISSING, UNRELATED, CONTRADICTS]
    results = _client(server.url).score_many([(REFERENCE, c, QUESTION) for c in candidates])
    assert [r.mean for r in results] == [1.0, 0.7, 0.3, 0.0, 0.0]
    assert all(r.scores == [r.mean, r.mean] and r.failures == 0 and r.error is None for r in results)
    assert all(0 <= r.latency_s < 20 for r in results)
    assert server.requests == 2 * len(candidates)
    assert _client(server.url).score_many([]) == []


def test_no_model_name_takes_the_servers_first_model(start_judge):
    server = start_judge(model="judge-7b")
    client = JudgeClient(server.url + "/chat/completions", None, samples=1)
    assert client.score_many([(REFERENCE, SAME, QUESTION)])[0].mean == 1.0
    assert "judge-7b" in client.describe()


def test_a_reply_that_is_no_score_is_a_failure(start_judge):
    server = start_judge(mode="garbage")
    [result] = _client(server.url, samples=3).score_many([(REFERENCE, SAME, QUESTION)])
    assert result.scores == [None, None, None] and result.failures == 3 and result.mean is None
    assert "not a rubric score" in result.error and failure_kind(result.error) == "not a rubric score"


def test_server_errors_are_retried_then_failures(start_judge):
    server = start_judge(mode="error500")
    [result] = _client(server.url, retries=2).score_many([(REFERENCE, SAME, QUESTION)])
    assert result.failures == 2 and result.mean is None
    assert "HTTP 500" in result.error and "3 attempts" in result.error and failure_kind(result.error) == "HTTP 500"
    assert server.requests == 2 * 3


def test_a_retry_recovers_from_a_passing_server_error(start_judge):
    server = start_judge(fail_first=1)
    [result] = _client(server.url, samples=1, retries=1).score_many([(REFERENCE, MISSING, QUESTION)])
    assert result.scores == [0.7] and server.requests == 2


def test_a_wrong_model_name_is_not_retried(start_judge):
    server = start_judge()
    [result] = JudgeClient(server.url, "no-such-model", samples=2, retries=3).score_many([(REFERENCE, SAME, QUESTION)])
    assert result.failures == 2 and "HTTP 404" in result.error and failure_kind(result.error) == "HTTP 404"
    assert server.requests == 2


def test_an_unreachable_judge_gives_failures():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    [result] = JudgeClient(f"http://127.0.0.1:{port}/v1", "m", samples=2, retries=1).score_many([("r", "c", "q")])
    assert result.failures == 2 and "cannot reach" in result.error and failure_kind(result.error) == "no reply"


def test_a_hanging_judge_costs_the_budget_not_more(start_judge):
    server = start_judge(delay_s=5.0)
    client = _client(server.url, samples=4, timeout_s=10.0, budget_s=0.5)
    start = time.monotonic()
    results = client.score_many([(REFERENCE, SAME, QUESTION), (REFERENCE, MISSING, QUESTION)])
    elapsed = time.monotonic() - start
    assert elapsed < 3.0  # a bound on a hang (5 s per request, 10 s timeout), not a speed claim
    assert all(r.failures == 4 and r.mean is None and r.scores == [None] * 4 for r in results)
    assert all(r.latency_s < 3.0 for r in results)
    assert {failure_kind(r.error) for r in results} == {"over budget"}


def test_a_request_whose_timeout_the_budget_cut_fails_as_over_budget(start_judge):
    """The hanging-judge test above saw 'no reply' under load: the socket timeout, cut to the budget's
    remainder, fired before the pool's wait gave up, and a timed-out request read as an unreachable
    judge. A request cut short by the budget is over budget, whichever of the two ends first."""
    import threading

    server = start_judge(delay_s=5.0)
    client = _client(server.url, timeout_s=10.0)
    body = json.dumps({"model": "rule-judge", "messages": [], "max_tokens": 8}).encode()
    reply, problem = client._request(client.endpoint, body, time.monotonic() + 0.3, threading.Event())
    assert reply is None and failure_kind(problem) == "over budget", problem
    # A timeout of the request's own (shorter than what the budget leaves) is still no reply.
    short = _client(server.url, timeout_s=0.3, retries=0)
    reply, problem = short._request(short.endpoint, body, time.monotonic() + 20.0, threading.Event())
    assert reply is None and failure_kind(problem) == "no reply", problem


def test_no_more_requests_in_flight_than_max_concurrency(start_judge):
    server = start_judge(delay_s=0.1)
    results = _client(server.url, samples=2, max_concurrency=3).score_many([(REFERENCE, SAME, QUESTION)] * 5)
    assert all(r.mean == 1.0 for r in results)
    assert server.requests == 10 and 1 <= server.max_in_flight <= 3


def test_the_server_takes_a_burst_of_connections_at_once(start_judge):
    """32 connections at once, 32 in flight, every one answered. With socketserver's listen backlog of 5
    the kernel dropped the connections beyond it and the client's TCP stack sent them again 1 s later:
    each step of a main_ppo run spent 1.0 s on a judge that answers in milliseconds. That shows only as
    time, which a test must not assert on a shared machine, so the backlog itself is checked."""
    from karl_verl.judge import _JudgeHTTPServer

    server = start_judge()
    client = _client(server.url, samples=2, max_concurrency=32)
    client.score_many([(REFERENCE, SAME, QUESTION)])  # the model name is resolved once, before the burst
    results = client.score_many([(REFERENCE, SAME, QUESTION)] * 16)
    assert all(r.mean == 1.0 for r in results)
    assert _JudgeHTTPServer.request_queue_size >= 32


def test_the_client_from_config(start_judge):
    server = start_judge()
    config = IvgrConfig(enable=True, judge_url=server.url, judge_model="rule-judge", judge_samples=3)
    client = JudgeClient.from_config(config)
    assert (client.samples, client.temperature, client.budget_s) == (3, 0.5, 60.0)
    assert client.score_many([(REFERENCE, MISSING, QUESTION)])[0].scores == [0.7] * 3
    with pytest.raises(ValueError, match="judge_url"):
        JudgeClient.from_config(IvgrConfig())
    local = IvgrConfig(enable=True, judge_url="local", judge_model="rule-judge")
    with pytest.raises(ValueError, match="RuleJudgeServer"):
        JudgeClient.from_config(local)
    assert JudgeClient.from_config(local, url=server.url).endpoint == f"{server.url}/chat/completions"


@pytest.mark.parametrize("options", [{"url": "127.0.0.1:8000/v1"}, {"samples": 0}, {"budget_s": 0}, {"retries": -1}])
def test_bad_client_settings_are_refused(options):
    with pytest.raises(ValueError):
        JudgeClient(**{"url": "http://127.0.0.1:1/v1", "model": "m", **options})


def test_the_servers_routes(start_judge):
    server = start_judge(model="judge-x")
    with urllib.request.urlopen(f"{server.url}/models", timeout=5) as reply:
        assert json.load(reply)["data"][0]["id"] == "judge-x"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{server.url}/nothing", timeout=5)
    assert missing.value.code == 404
    body = json.dumps({"model": "judge-x", "messages": [{"role": "user", "content": "no judge prompt"}]}).encode()
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/chat/completions", data=body), timeout=5)
    assert bad.value.code == 400
    with pytest.raises(ValueError, match="mode"):
        RuleJudgeServer(mode="flaky")


def test_the_serve_command_prints_its_url_and_answers():
    command = [sys.executable, "-m", "karl_verl.judge", "serve", "--port", "0", "--model", "cli-judge"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), process.stderr.read()
        [result] = JudgeClient(url, "cli-judge", samples=1).score_many([(REFERENCE, SAME, QUESTION)])
        assert result.scores == [1.0]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
