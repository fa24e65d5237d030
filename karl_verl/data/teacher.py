"""Teachers for ``karl-verl data cot``: an OpenAI-compatible chat endpoint, or a local model.

Both are :class:`~karl_verl.backends.base.TextGenerator` s, so the CoT generator takes either (and
tests a fake):

* :class:`ChatCompletionsTeacher` POSTs to ``<base>/chat/completions``, the protocol ``vllm serve``,
  SGLang and hosted APIs speak: images go as ``data:`` URLs in ``image_url`` content parts,
  sampling as ``temperature``, ``top_p``, ``max_tokens``, ``n`` and ``seed``. It is thread-safe
  (one HTTP request per call, no shared connection), so callers bound the concurrency with their
  own thread pool. Connection failures, timeouts, HTTP 408/429/5xx and malformed replies are
  retried with exponential backoff (and the server's ``Retry-After``); other HTTP errors (a wrong
  model name, a prompt too long) fail at once, since retrying cannot fix them.
* :func:`load_teacher` turns ``--teacher`` into one of them: an ``http(s)://`` URL is an endpoint,
  anything else a local checkpoint loaded with transformers (or vLLM's offline engine).

Standard library only (``urllib``): nothing to install for the HTTP teacher.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from karl_verl.backends.base import (
    BackendError,
    GenerationRequest,
    SamplingSettings,
    TextGenerator,
    load_image,
    structured_messages,
)
from karl_verl.judge import RETRY_STATUSES  # HTTP statuses worth retrying (one set for every client)

#: Retries after the first attempt of one request.
DEFAULT_RETRIES = 5
#: First backoff in seconds; doubled after each failure, up to MAX_BACKOFF_S, with +-50% jitter.
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
#: Seconds one HTTP request may take (a long rationale from a large teacher takes a while).
REQUEST_TIMEOUT_S = 300.0


class TeacherError(BackendError):
    """The teacher gave no usable answer (after retries, where retrying could help)."""


def is_endpoint(teacher: str) -> bool:
    return teacher.startswith(("http://", "https://"))


def _image_data_url(image: Any, where: str) -> str:
    """A ``data:`` URL of one image; encoded bytes are sent as they are (no re-encoding of JPEGs)."""
    from PIL import Image, UnidentifiedImageError

    raw = image.get("bytes") if isinstance(image, dict) else image
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            with Image.open(io.BytesIO(raw)) as opened:
                mime = Image.MIME.get(opened.format or "", "")
        except (OSError, UnidentifiedImageError) as err:
            raise BackendError(f"{where}: cannot decode image ({err})") from None
        if mime:
            return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"
    buffer = io.BytesIO()
    load_image(image, where=where).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def openai_messages(request: GenerationRequest, *, where: str = "request") -> list[dict[str, Any]]:
    """``request`` in the chat-completions format: text parts and ``image_url`` parts, in placeholder order."""
    images = iter(request.images)
    out = []
    for message in structured_messages(request, where=where):
        content = message["content"]
        parts = []
        for part in content:
            if part.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image_data_url(next(images), where)}})
            else:
                parts.append({"type": "text", "text": part.get("text", "")})
        out.append({"role": message["role"], "content": parts})
    return out


class ChatCompletionsTeacher:
    """:class:`~karl_verl.backends.base.TextGenerator` over an OpenAI-compatible ``/chat/completions`` endpoint.

    ``url``: the API base (``http://host:8000/v1``) or the full ``.../chat/completions`` address.
    ``model``: the served model name; None asks ``<base>/models`` once and takes the first.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        if not is_endpoint(url):
            raise TeacherError(f"teacher URL must start with http:// or https://, got {url!r}")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise TeacherError("retries and backoff_s must be >= 0 and timeout_s > 0")
        url = url.rstrip("/")
        self.base = url.removesuffix("/chat/completions")
        self.endpoint = f"{self.base}/chat/completions"
        self.api_key = api_key
        self.retries, self.backoff_s, self.max_backoff_s, self.timeout_s = retries, backoff_s, max_backoff_s, timeout_s
        self._model = model
        self._model_lock = threading.Lock()

    @property
    def model(self) -> str:
        with self._model_lock:
            if self._model is None:
                reply = self._call("GET", f"{self.base}/models", None, "model list")
                models = reply.get("data") if isinstance(reply, dict) else None
                if not models or not isinstance(models[0], dict) or not isinstance(models[0].get("id"), str):
                    raise TeacherError(f"{self.base}/models lists no model; pass the model name (--teacher-model)")
                self._model = models[0]["id"]
            return self._model

    def describe(self) -> str:
        return f"{self.model} at {self.endpoint}"

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSettings) -> list[list[str]]:
        """``sampling.n`` completions per request, one HTTP request each (``n`` and ``seed`` sent along)."""
        outputs = []
        for i, request in enumerate(requests):
            body = {
                "model": self.model,
                "messages": openai_messages(request, where=f"request {i}"),
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_new_tokens,
                "n": sampling.n,
                "seed": sampling.seed,
            }
            outputs.append(self._texts(self._call("POST", self.endpoint, body, f"request {i}"), sampling.n, i))
        return outputs

    @staticmethod
    def _texts(reply: Any, n: int, index: int) -> list[str]:
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            raise TeacherError(f"request {index}: expected {n} choices, got {choices!r:.200}")
        texts = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            content = (choice.get("message") or {}).get("content") if isinstance(choice, dict) else None
            # A model may answer with no text (content null); that is a miss to score, not an error.
            texts.append(content if isinstance(content, str) else "")
        return texts

    def _call(self, method: str, url: str, body: dict[str, Any] | None, what: str) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        rng = random.Random()
        problem = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * rng.uniform(0.5, 1.5)
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
                try:
                    return json.loads(payload)
                except ValueError:
                    problem = f"reply is not JSON: {payload[:200]!r}"
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode("utf-8", "replace")
                problem = f"HTTP {err.code} from {url}: {detail}"
                if err.code not in RETRY_STATUSES:
                    raise TeacherError(f"{what}: {problem}") from None
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = min(self.max_backoff_s, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                problem = f"cannot reach {url}: {getattr(err, 'reason', err)}"
            if attempt < self.retries:
                time.sleep(wait)
        raise TeacherError(f"{what}: {problem} (gave up after {self.retries + 1} attempts)")


def load_teacher(
    teacher: str,
    *,
    model: str | None = None,
    api_key: str | None = None,
    retries: int = DEFAULT_RETRIES,
    backend: str = "hf",
    device: str | None = None,
    batch_size: int = 1,
    seed: int = 0,
) -> TextGenerator:
    """An endpoint teacher for an ``http(s)://`` URL, else a local checkpoint (transformers or vLLM)."""
    if is_endpoint(teacher):
        return ChatCompletionsTeacher(teacher, model, api_key=api_key, retries=retries)
    from karl_verl.generation import load_generator

    return load_generator(teacher, backend, device=device, batch_size=batch_size, seed=seed)


def describe_teacher(teacher: TextGenerator, name: str) -> str:
    describe = getattr(teacher, "describe", None)
    return describe() if callable(describe) else name
