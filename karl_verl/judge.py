"""The iVGR consistency judge: an HTTP client for any OpenAI-compatible endpoint, and a local rule judge.

* :class:`JudgeClient` scores textual reasonings against their cached grounded references
  (:func:`karl_verl.ivgr.judge_messages`): ``samples`` chat-completion requests per judgement, one
  sample each (``n`` = 1, so any server works), at most ``max_concurrency`` in flight from a thread
  pool, each with its own timeout and retries (connection errors, timeouts, HTTP 408/429/5xx). The
  whole call has a budget: what is unfinished when ``budget_s`` runs out is returned as failed
  samples, without waiting for it. A failed sample (no reply, an HTTP error, a reply that is not a
  rubric score) is None in :attr:`JudgeResult.scores`; nothing raises.
* :class:`RuleJudgeServer` is a judge for CPU runs and tests: a threaded ``http.server`` on
  127.0.0.1 answering ``POST /v1/chat/completions`` and ``GET /v1/models`` in the OpenAI format with
  :func:`rule_score`, a deterministic word-overlap rule. ``python -m karl_verl.judge serve --port N``
  runs one in a process of its own and prints its URL.

Both run in the calling process (the trainer's, for the client); standard library only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import random
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from karl_verl.config import LOCAL_JUDGE
from karl_verl.ivgr import judge_messages, message_text, parse_judge_prompt, rubric_score

if TYPE_CHECKING:
    from karl_verl.config import IvgrConfig

#: HTTP statuses worth retrying: the server is busy or restarting, not refusing the request (the teacher
#: client of ``karl_verl.data.teacher`` uses this set too).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: First backoff before a retry in seconds, doubled per retry up to MAX_BACKOFF_S, +-50% jitter; short,
#: since a judgement has seconds, not minutes (and never beyond the call's budget).
BACKOFF_S = 0.25
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class JudgeResult:
    """One judgement: a score per sample (None: that sample failed), their mean and failures."""

    scores: list[float | None]
    #: Mean of the valid scores; None when every sample failed.
    mean: float | None
    failures: int
    #: Seconds from the call's start until this judgement's last sample finished (or the budget ran out).
    latency_s: float
    #: Why the first failed sample failed (None: none failed).
    error: str | None = None


class JudgeClient:
    """Scores (reference, candidate, question) triples with an OpenAI-compatible judge; see the module docstring.

    ``url``: the API base (``http://host:8000/v1``) or the full ``.../chat/completions`` address.
    ``model``: the served model name; None asks ``<base>/models`` for its first model (once it answers).
    Thread-safe: every request is its own HTTP connection.
    """

    def __init__(self, url: str, model: str | None, *, samples: int = 4, temperature: float = 0.5,
                 max_tokens: int = 8, timeout_s: float = 10.0, retries: int = 1, max_concurrency: int = 8,
                 budget_s: float = 60.0, api_key: str | None = None) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"judge URL must start with http:// or https://, got {url!r}")
        if samples < 1 or max_tokens < 1 or retries < 0 or max_concurrency < 1:
            raise ValueError("samples, max_tokens and max_concurrency must be >= 1 and retries >= 0, got "
                             f"{samples}, {max_tokens}, {max_concurrency}, {retries}")
        if timeout_s <= 0 or budget_s <= 0 or temperature < 0:
            raise ValueError(f"timeout_s and budget_s must be > 0 and temperature >= 0, got {timeout_s}, {budget_s}, "
                             f"{temperature}")
        self.base = url.rstrip("/").removesuffix("/chat/completions")
        self.endpoint = f"{self.base}/chat/completions"
        self.samples, self.temperature, self.max_tokens = samples, temperature, max_tokens
        self.timeout_s, self.retries, self.budget_s = timeout_s, retries, budget_s
        self.max_concurrency = max_concurrency
        self.api_key = api_key
        self._model = model
        self._model_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: IvgrConfig, *, api_key: str | None = None, url: str | None = None) -> JudgeClient:
        """The client ``karl.ivgr`` describes (its ``judge_*`` fields); ``url`` in place of ``judge_url``."""
        url = url or config.judge_url
        if url is None or url == LOCAL_JUDGE:
            raise ValueError(f"karl.ivgr.judge_url: needed for a judge client (with {LOCAL_JUDGE!r}, pass the url of "
                             "the started RuleJudgeServer)")
        return cls(url, config.judge_model, samples=config.judge_samples,
                   temperature=config.judge_temperature, max_tokens=config.judge_max_tokens,
                   timeout_s=config.judge_timeout_s, retries=config.judge_retries,
                   max_concurrency=config.judge_max_concurrency, budget_s=config.judge_budget_s, api_key=api_key)

    def describe(self) -> str:
        return f"{self._model or '(first listed model)'} at {self.endpoint}"

    def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[JudgeResult]:
        """One :class:`JudgeResult` per ``(reference reasoning, candidate reasoning, question)``, in order.

        Returns within about ``budget_s`` (plus thread start-up): requests still running then are
        left to finish on their own (their timeouts are cut to the budget) and count as failures.
        """
        if not items:
            return []
        start = time.monotonic()
        deadline = start + self.budget_s
        stop = threading.Event()
        model, problem = self._resolved_model(deadline, stop)
        if model is None:
            return [JudgeResult([None] * self.samples, None, self.samples, time.monotonic() - start, problem)
                    for _ in items]
        bodies = [json.dumps({"model": model, "messages": judge_messages(reference, candidate, question),
                              "temperature": self.temperature, "max_tokens": self.max_tokens, "n": 1}).encode()
                  for reference, candidate, question in items]
        tasks = [(i, sample) for i in range(len(items)) for sample in range(self.samples)]
        pool = concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(tasks)),
                                                     thread_name_prefix="ivgr-judge")
        try:
            futures = {pool.submit(self._sample, bodies[i], deadline, stop): (i, sample) for i, sample in tasks}
            concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        finally:
            # Past the budget nothing more is started or retried, and nobody waits for what still runs.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        ended = time.monotonic()
        outcomes: list[list[tuple[float | None, str | None, float]]] = [[] for _ in items]
        for future, (i, _) in futures.items():
            if future.done() and not future.cancelled():
                outcomes[i].append(future.result())
            else:
                outcomes[i].append((None, f"unfinished after the judge budget of {self.budget_s:g} s", ended))
        return [_result(samples, start) for samples in outcomes]

    def _resolved_model(self, deadline: float, stop: threading.Event) -> tuple[str | None, str | None]:
        """(model, None), or (None, why not) when the model list cannot be had."""
        with self._model_lock:
            if self._model is None:
                try:
                    reply, problem = self._request(f"{self.base}/models", None, deadline, stop)
                except Exception as err:  # no model list is failed judgements, not a crash
                    reply, problem = None, f"{type(err).__name__}: {err}"
                models = reply.get("data") if isinstance(reply, dict) else None
                if models and isinstance(models[0], dict) and isinstance(models[0].get("id"), str):
                    self._model = models[0]["id"]
                else:
                    return None, problem or f"{self.base}/models lists no model; set karl.ivgr.judge_model"
            return self._model, None

    def _sample(self, body: bytes, deadline: float, stop: threading.Event) -> tuple[float | None, str | None, float]:
        """(score, None, finished at) of one judge request, or (None, why, finished at); never raises."""
        try:
            reply, problem = self._request(self.endpoint, body, deadline, stop)
            if problem is not None:
                return None, problem, time.monotonic()
            choices = reply.get("choices") if isinstance(reply, dict) else None
            first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
            content = (first.get("message") or {}).get("content") if isinstance(first.get("message"), dict) else None
            score = rubric_score(content) if isinstance(content, str) else None
            if score is None:
                shown = content if isinstance(content, str) else reply
                return None, f"reply is not a rubric score: {shown!r:.120}", time.monotonic()
            return score, None, time.monotonic()
        except Exception as err:  # a judgement that fails for any reason is a failure, never a crash
            return None, f"{type(err).__name__}: {err}", time.monotonic()

    def _request(self, url: str, body: bytes | None, deadline: float,
                 stop: threading.Event) -> tuple[Any, str | None]:
        """(parsed JSON reply, None) or (None, why), retrying what a retry can fix within the deadline."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        rng = random.Random()
        problem = "judge budget spent before the request"
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                return None, problem
            wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt) * rng.uniform(0.5, 1.5)
            cut_to_budget = remaining < self.timeout_s
            try:
                method = "GET" if body is None else "POST"
                request = urllib.request.Request(url, data=body, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=min(self.timeout_s, remaining)) as response:
                    payload = response.read()
                try:
                    return json.loads(payload), None
                except ValueError:
                    return None, f"reply from {url} is not JSON: {payload[:120]!r}"
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code} from {url}: {err.read()[:200].decode('utf-8', 'replace')}"
                if err.code not in RETRY_STATUSES:
                    return None, problem
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = min(MAX_BACKOFF_S, float(retry_after))
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as err:
                if cut_to_budget and isinstance(getattr(err, "reason", err), TimeoutError):
                    # The budget, not the judge, ended this wait: under load the socket timeout can
                    # fire before score_many's own wait does, and must not read as an unreachable judge.
                    return None, f"unfinished after the judge budget of {self.budget_s:g} s"
                problem = f"cannot reach {url}: {getattr(err, 'reason', err)}"
            if attempt < self.retries:
                stop.wait(min(wait, max(0.0, deadline - time.monotonic())))
        return None, f"{problem} (gave up after {self.retries + 1} attempts)"


def failure_kind(error: str) -> str:
    """The kind of a failed judgement, from its :attr:`JudgeResult.error`: what a run logs once per kind.

    >>> failure_kind("HTTP 500 from http://h/v1/chat/completions: {} (gave up after 2 attempts)")
    'HTTP 500'
    >>> failure_kind("unfinished after the judge budget of 3 s")
    'over budget'
    >>> failure_kind("reply is not a rubric score: 'maybe'")
    'not a rubric score'
    """
    if match := re.match(r"HTTP (\d{3}) ", error):
        return f"HTTP {match.group(1)}"
    for prefix, kind in _FAILURE_PREFIXES:
        if error.startswith(prefix):
            return kind
    if " is not JSON: " in error:
        return "not JSON"
    if "/models lists no model" in error:
        return "no model listed"
    if match := re.match(r"([A-Za-z_][\w.]*): ", error):
        return match.group(1)  # an exception the client caught, by type
    return "other"


#: Beginnings of the client's own failure messages and their :func:`failure_kind`.
_FAILURE_PREFIXES = (("cannot reach ", "no reply"), ("unfinished after the judge budget", "over budget"),
                     ("judge budget spent", "over budget"), ("reply is not a rubric score", "not a rubric score"))


def _result(samples: list[tuple[float | None, str | None, float]], start: float) -> JudgeResult:
    scores = [score for score, _, _ in samples]
    valid = [score for score in scores if score is not None]
    errors = [error for _, error, _ in samples if error is not None]
    return JudgeResult(scores, sum(valid) / len(valid) if valid else None, len(scores) - len(valid),
                       max(finished for _, _, finished in samples) - start, errors[0] if errors else None)


# --- the rule judge ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_NEGATORS = frozenset({"not", "no", "never", "none", "isn't", "aren't", "wasn't", "weren't", "doesn't", "don't",
                       "didn't", "cannot", "can't", "without", "neither", "nor"})
_STOPWORDS = frozenset({
    "the", "and", "are", "was", "were", "has", "have", "had", "its", "this", "that", "these", "those", "with", "for",
    "from", "into", "onto", "which", "who", "whose", "what", "where", "there", "here", "than", "then", "also", "but",
    "one", "ones", "some", "any", "all", "very", "just", "only", "more", "most", "both", "each", "other", "can",
    "could", "would", "should", "may", "might", "must", "will", "shall", "does", "did", "been", "being", "their",
    "they", "them", "his", "her", "she", "him", "our", "you", "your", "like", "looks", "look", "seems", "appears",
    "image", "picture", "photo", "box", "region", "candidate", "candidates", "answer", "therefore", "thus", "because",
})
#: :func:`rule_score`'s thresholds on the Jaccard overlap of content words.
RULE_UNRELATED_BELOW = 0.15
RULE_CONSISTENT_FROM = 0.8
#: Share of one side's content words the other lacks, above which it counts as "extra" / "missing" details.
RULE_DETAIL_SHARE = 0.2


def _content_words(text: str) -> tuple[set[str], set[str]]:
    """(asserted, negated) content words: words of 3+ letters that are no stopword; the first content word
    after a negator ("not", "no", "isn't", ...) is negated. Digits never count, so box coordinates do not."""
    asserted: set[str] = set()
    negated: set[str] = set()
    negate = False
    for word in _WORD.findall(text.lower()):
        if word in _NEGATORS:
            negate = True
        elif len(word) >= 3 and word not in _STOPWORDS:
            (negated if negate else asserted).add(word)
            negate = False
    return asserted, negated


def rule_score(reference: str, candidate: str) -> float:
    """A deterministic stand-in for the judge's rubric, from content words (not understanding: for CPU runs).

    * 0.0: a contradiction (a word negated in one text and asserted, never negated, in the other: "it
      is not the Fiat" against "it is the Fiat"), or unrelated texts (Jaccard overlap below
      :data:`RULE_UNRELATED_BELOW`, an empty candidate included);
    * 1.0: overlap at least :data:`RULE_CONSISTENT_FROM` (or both texts without content words);
    * 0.7: one of extra or missing details: at most :data:`RULE_DETAIL_SHARE` of the candidate's words
      are not in the reference, or at most that share of the reference's are not in the candidate;
    * 0.3: both extra and missing details.

    >>> rule_score("The red car is the Fiat [1,2,3,4].", "The red car is the Fiat.")
    1.0
    >>> rule_score("The red car is the Fiat.", "The red car is not the Fiat.")
    0.0
    """
    ref_asserted, ref_negated = _content_words(reference)
    cand_asserted, cand_negated = _content_words(candidate)
    if (cand_negated & (ref_asserted - ref_negated)) or (ref_negated & (cand_asserted - cand_negated)):
        return 0.0
    ref, cand = ref_asserted | ref_negated, cand_asserted | cand_negated
    if not ref and not cand:
        return 1.0
    overlap = len(ref & cand) / len(ref | cand)
    if overlap < RULE_UNRELATED_BELOW:
        return 0.0
    if overlap >= RULE_CONSISTENT_FROM:
        return 1.0
    extra, missing = len(cand - ref) / len(cand), len(ref - cand) / len(ref)
    return 0.7 if min(extra, missing) <= RULE_DETAIL_SHARE else 0.3


class RuleJudgeServer:
    """An OpenAI-compatible judge on 127.0.0.1 scoring with :func:`rule_score` (see the module docstring).

    ``mode``: "ok" (scores), "error500" (every request answers HTTP 500) or "garbage" (a reply that is no
    score). ``delay_s``: seconds each request waits before its answer (a slow or hanging judge; a stop
    cuts it short). ``fail_first``: the first this many chat requests answer HTTP 500 (a judge that
    recovers). ``requests`` and ``max_in_flight`` count chat requests and the most ever served at once.
    """

    MODES = ("ok", "error500", "garbage")

    def __init__(self, *, model: str = "rule-judge", mode: str = "ok", delay_s: float = 0.0, fail_first: int = 0,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {list(self.MODES)}, got {mode!r}")
        self.model, self.mode, self.delay_s, self.fail_first = model, mode, float(delay_s), int(fail_first)
        self.host, self.port = host, port
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API base, ``http://127.0.0.1:PORT/v1`` (the bound port once started)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> RuleJudgeServer:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _JudgeHTTPServer((self.host, self.port), _RuleJudgeHandler)
        server.judge = self  # type: ignore[attr-defined]
        self._server, self.port = server, server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"rule-judge:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> RuleJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def models_reply(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "karl-verl"}]}

    def chat_reply(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of one chat-completions request."""
        with self._lock:
            self.requests += 1
            number = self.requests
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s > 0:
                self._stopping.wait(self.delay_s)
            if self.mode == "error500" or number <= self.fail_first:
                return 500, _error("rule judge: simulated server error", "server_error")
            try:
                body = json.loads(raw)
            except ValueError:
                return 400, _error("request body is not JSON", "invalid_request_error")
            if not isinstance(body, dict) or body.get("model") != self.model:
                model = body.get("model") if isinstance(body, dict) else None
                return 404, _error(f"The model `{model}` does not exist.", "NotFoundError")
            users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
            parsed = parse_judge_prompt(message_text(users[-1].get("content"))) if users else None
            if parsed is None:
                return 400, _error("no judge prompt (karl_verl.ivgr.judge_messages) in the last user message",
                                   "invalid_request_error")
            _, reference, candidate = parsed
            garbage = self.mode == "garbage"
            content = "Looks mostly fine to me." if garbage else f"{rule_score(reference, candidate):.1f}"
            n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
            choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                       for i in range(n)]
            return 200, {"id": f"chatcmpl-rule-{number}", "object": "chat.completion", "created": int(time.time()),
                         "model": self.model, "choices": choices,
                         "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}}
        finally:
            with self._lock:
                self.in_flight -= 1


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


class _JudgeHTTPServer(ThreadingHTTPServer):
    #: A handler still waiting out delay_s must not hold up a stop.
    daemon_threads = True
    #: The listen backlog. socketserver's 5 is below a client's 8 concurrent requests: the kernel dropped
    #: the connections beyond it and the client's TCP stack sent them again after 1 s, so every step's
    #: judge call of a main_ppo run took 1.0 s instead of ~10 ms (ivgr/judge_time_s).
    request_queue_size = 128


class _RuleJudgeHandler(BaseHTTPRequestHandler):
    server_version = "karl-verl-rule-judge"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a request log line per judge call would flood a training log

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        judge: RuleJudgeServer = self.server.judge  # type: ignore[attr-defined]
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, judge.models_reply())
        else:
            self._send(404, _error(f"no route {self.path}", "NotFoundError"))

    def do_POST(self) -> None:
        judge: RuleJudgeServer = self.server.judge  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, _error(f"no route {self.path}", "NotFoundError"))
            return
        try:
            self._send(*judge.chat_reply(raw))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its budget ran out): nobody to answer


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m karl_verl.judge serve [--port N]``: run a :class:`RuleJudgeServer` until interrupted.

    Prints the API base URL (one line, flushed) once it listens, for a run that starts it as a subprocess.
    """
    parser = argparse.ArgumentParser(prog="python -m karl_verl.judge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the local rule judge (OpenAI-compatible) until interrupted")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    serve.add_argument("--model", default="rule-judge", help="served model name (karl.ivgr.judge_model)")
    serve.add_argument("--mode", choices=RuleJudgeServer.MODES, default="ok")
    serve.add_argument("--delay-s", type=float, default=0.0, help="seconds each request waits before its answer")
    args = parser.parse_args(argv)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    server = RuleJudgeServer(model=args.model, mode=args.mode, delay_s=args.delay_s, host=args.host, port=args.port)
    with server:
        print(server.url, flush=True)
        try:
            while not done.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    print("rule judge stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
