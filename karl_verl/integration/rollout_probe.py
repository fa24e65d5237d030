"""The in-training probe backend: KARL's knowledge probe on verl's own rollout servers.

Where things run. :class:`RolloutProbeBackend` lives in the trainer process (verl's TaskRunner, a Ray
actor on CPU). It builds each question's prompt token ids with verl's own Continuous Token builder,
processor and dataset class, exactly as the training agent loop does (an :class:`AgentLoopBase`
helper; see :class:`_PromptBuilder`), and sends them through verl's
:class:`~verl.workers.rollout.llm_server.LLMServerClient` to the rollout replicas (vLLM / SGLang
servers on the training GPUs). The replicas hold the policy's current weights and are awake at the
step boundary, when the ``karl`` trainer refreshes mastery; there is no second copy of the model in
GPU memory.

Implements the probe protocols of :mod:`karl_verl.backends.base`, asking each server only for what
the mode uses (bytes per question measured in ``benchmarks/bench_probe_scale.py``):

* :meth:`RolloutProbeBackend.choose_options` (``probe_mode="choice"``, the default): one request per
  question, one greedy token constrained to the option letters (``allowed_token_ids``, which verl's
  server passes to vLLM's ``SamplingParams`` unchanged): the reply is the decision, a few hundred
  bytes whatever the prompt length.
* :meth:`RolloutProbeBackend.option_logprobs` (``probe_mode="logprob"``). verl's servers do not
  return top-k log-probabilities of *generated* tokens (they only return the sampled token's), but
  vLLM's ``prompt_logprobs`` pass through verl's server unchanged (verl's on-policy distillation
  relies on the same path, ``verl/experimental/teacher_loop/teacher_manager.py``). So each option is
  one request with that option's token appended to the prompt and ``prompt_logprobs=0`` (only the
  actual token's log-probability at each position, no top-k): the second-to-last entry is the
  option's log-probability right after the generation prompt. Four requests per question, and
  every prompt position comes back (a server cannot be asked for one position only).
* :meth:`RolloutProbeBackend.generate` (``probe_mode="generate"``): ordinary generation.

vLLM and karl-verl's CPU rollout (``transformers``, :mod:`karl_verl.cpu.rollout`) answer the first
two; on other rollout engines :attr:`supports_logprobs` is False and the trainer falls back to
generate mode with a warning.

All requests of one call run concurrently (at most ``max_concurrency`` in flight) on a private
event loop in a background thread, so that :meth:`cancel` (called by the trainer when a refresh
times out) can stop them from another thread.

One question that cannot be answered costs that question only: an unreadable image, a prompt over
the server's ``max_model_len``, a server-side exception or a short answer is recorded in
:attr:`RolloutProbeBackend.question_failures` (request index -> :class:`~karl_verl.probe.runner.QuestionFailure`,
its ``kind`` from :func:`failure_kind`) with a NaN row / None in its place, and the other questions
are answered; :func:`karl_verl.probe.runner.run_probe` skips it. Cancellation still stops everything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any
from uuid import uuid4

import numpy as np

from karl_verl.backends.base import (
    BackendError,
    GenerationRequest,
    SamplingSettings,
    load_image,
    structured_messages,
)
from karl_verl.probe.questions import ParquetImage
from karl_verl.probe.runner import QuestionFailure

logger = logging.getLogger(__name__)

#: Rollout engines whose servers answer ``prompt_logprobs`` in vLLM's layout and ``allowed_token_ids``.
PROMPT_LOGPROB_ROLLOUTS = ("vllm", "transformers")


class ProbeCancelled(RuntimeError):
    """The probe was cancelled (refresh timeout) while requests were in flight."""


class ShortAnswerError(BackendError):
    """A rollout server answered without the expected output (aborted request, empty reply, missing
    log-probabilities); it costs its question (kind "short answer" in ``question_failures``)."""


class UnreadableImageError(BackendError):
    """A question's image cannot be read or decoded (the message names the request, file and row)."""


class PromptEncodingError(BackendError):
    """verl's prompt machinery could not turn a question into prompt ids (processor, chat template)."""


# How a prompt too long is worded: verl's prompt builder ("Multimodal prompt produced N tokens,
# exceeding rollout.prompt_length=M"), vLLM's engine ("... is longer than the maximum model length of
# N"), verl's vLLM server ("... the model's maximum context length (N)") and karl-verl's CPU rollout
# ("... leaves no room within max_model_len N"). Matched in the message, not the type: through Ray the
# exception arrives wrapped (RayTaskError(ValueError)).
_PROMPT_TOO_LONG = re.compile(r"maximum model length|maximum context length|max_model_len|rollout\.prompt_length",
                              re.IGNORECASE)


def _cause(err: BaseException) -> BaseException:
    """The server's own exception inside Ray's wrapper (``RayTaskError.cause``), else ``err``."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def failure_kind(err: BaseException) -> str:
    """The short reason an exception cost its question, for counting ("server error: <type>" otherwise)."""
    err = _cause(err)
    if isinstance(err, UnreadableImageError):
        return "unreadable image"
    if isinstance(err, ShortAnswerError):
        return "short answer"
    if _PROMPT_TOO_LONG.search(str(err)):
        return "prompt too long"
    if isinstance(err, PromptEncodingError):
        return "encoding error"
    if isinstance(err, TimeoutError):
        return "timeout"
    return f"server error: {type(err).__name__}"


def _failure(err: BaseException) -> QuestionFailure:
    # The first line only (a Ray traceback would run to pages): the log shows it on one line.
    text = str(_cause(err)).strip()
    return QuestionFailure(failure_kind(err), text.splitlines()[0][:500] if text else type(_cause(err)).__name__)


def _with_images(request: GenerationRequest, where: str) -> list[dict[str, Any]]:
    """RLHFDataset-style messages whose image parts carry the decoded images (what the agent loop gets)."""
    messages = structured_messages(request, where=where)
    try:
        decoded = [load_image(image, where=f"{where}, image {i}", max_pixels=request.max_pixels)
                   for i, image in enumerate(request.images)]
    except BackendError as err:
        raise UnreadableImageError(str(err)) from None
    images = iter(decoded)
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": next(images)} if part.get("type") == "image" and "image" not in part
                else part
                for part in content
            ]
        out.append({**message, "content": content})
    return out


def prompt_key(request: GenerationRequest) -> tuple[Any, ...] | None:
    """What identifies a question's built prompt across refreshes, or None when it cannot be told cheaply.

    The chat text, each image's identity (a lazily read parquet row, a file path, or a digest of the
    encoded bytes) and the pixel budget. A decoded image (PIL, array) has no identity that survives a
    refresh: such requests are built every time.
    """
    images = []
    for image in request.images:
        if isinstance(image, (bytes, bytearray, memoryview)):
            images.append(("bytes", hashlib.blake2b(image, digest_size=16).digest()))
        elif isinstance(image, str):
            images.append(("path", image))
        elif isinstance(image, ParquetImage):
            images.append(("row", image.path, image.index, image.column))
        else:
            return None
    text = tuple((str(m.get("role")), repr(m.get("content"))) for m in request.messages)
    return text, tuple(images), request.max_pixels


class PromptCache:
    """Built probe prompts kept across refreshes, within a byte budget (lives in the trainer process).

    A refresh asks the same questions as the one before (the probe set is fixed for the run), so the
    Continuous Token build (chat template and the processor's pass over every image, the costly part
    of a question in the trainer) runs once per question. The images themselves are not kept (at the
    paper's 100,000 questions they would be hundreds of GB): they are read, decoded and resized as
    verl's agent loop does at every refresh, and a cached prompt is used only when the images come out
    the sizes they had when it was built.

    Prompt ids are stored run-length encoded (``int32`` values and run lengths): a Qwen-VL prompt is
    mostly one ``<|image_pad|>`` token repeated per image token, so a ~1,000-token question costs
    ~100 entries. When the budget is full nothing more is added and nothing is evicted: refreshes ask
    the whole set in the same order, where least-recently-used eviction would drop every entry before
    its next use.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, tuple[tuple[int, int], ...]]] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...] | None, sizes: tuple[tuple[int, int], ...]) -> list[int] | None:
        """The prompt ids built for ``key`` when its images had ``sizes``; None (a miss) otherwise."""
        entry = self._entries.get(key) if key is not None else None
        with self._lock:
            if entry is None or entry[2] != sizes:
                self.misses += 1
                return None
            self.hits += 1
        return np.repeat(entry[0], entry[1]).tolist()

    def put(self, key: tuple[Any, ...] | None, prompt_ids: Sequence[int], sizes: tuple[tuple[int, int], ...]) -> None:
        if key is None or not self.max_bytes:
            return
        ids = np.asarray(prompt_ids, dtype=np.int64)
        if ids.size == 0 or ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max:
            return
        starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 1))
        values = ids[starts].astype(np.int32)
        lengths = np.diff(np.append(starts, ids.size)).astype(np.int32)
        # Arrays plus the key and the dict slot, roughly: what decides whether the budget holds one more.
        cost = values.nbytes + lengths.nbytes + 2 * 112 + 200
        with self._lock:
            if key in self._entries or self.nbytes + cost > self.max_bytes:
                return
            self._entries[key] = (values, lengths, sizes)
            self.nbytes += cost

    def take_counts(self) -> tuple[int, int]:
        """(hits, misses) since the last call, and reset them (one refresh's figures)."""
        with self._lock:
            counts = (self.hits, self.misses)
            self.hits = self.misses = 0
        return counts


def _image_sizes(images: Any) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in getattr(image, "size", (-1, -1))) for image in images or ())


class _LoopThread:
    """An asyncio event loop running in a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, workers: int = 8) -> None:
        self.loop = asyncio.new_event_loop()
        # The loop's default executor: image decoding and prompt building (verl's dataset class runs
        # its vision processing there too) happen on these threads, per request in flight.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="karl-probe-prep")
        self.loop.set_default_executor(self._pool)
        self._thread = threading.Thread(target=self.loop.run_forever, name="karl-probe-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class RolloutProbeBackend:
    """:class:`~karl_verl.backends.base.OptionScorer` and ``TextGenerator`` on verl's rollout servers.

    Args:
        client: verl's ``LLMServerClient`` (``trainer.get_llm_client()``), or any object with its
            ``async generate(request_id, *, prompt_ids, sampling_params, image_data, ...)``.
        tokenizer, processor: the trainer's (``trainer.tokenizer`` / ``trainer.processor``).
        config: the whole verl config (data and rollout settings shape the prompts as in training).
        hf_model_type: the model's ``config.model_type`` (selects verl's Continuous Token builder).
        max_concurrency: requests in flight at once.
        prompt_cache: built prompts kept across refreshes (the trainer keeps one for the run); None: none.
    """

    def __init__(
        self,
        client: Any,
        *,
        tokenizer: Any,
        processor: Any,
        config: Any,
        hf_model_type: str | None = None,
        max_concurrency: int = 256,
        prepare_workers: int = 8,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.client = client
        self.prompt_cache = prompt_cache
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.hf_model_type = hf_model_type
        self.max_concurrency = max(1, int(max_concurrency))
        self.prepare_workers = max(1, int(prepare_workers))
        rollout = config.actor_rollout_ref.rollout
        self.rollout_name = str(rollout.get("name", "vllm"))
        self._loop: _LoopThread | None = None
        self._builder: Any = None
        self._cancelled = threading.Event()
        self._inflight: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        #: The questions the last call could not answer: request index -> why (see karl_verl.probe.runner).
        self.question_failures: dict[int, QuestionFailure] = {}

    @classmethod
    def from_trainer(cls, trainer: Any, *, hf_model_type: str | None, max_concurrency: int = 256,
                     prepare_workers: int = 8, prompt_cache: PromptCache | None = None) -> RolloutProbeBackend:
        """The backend of a running verl trainer (driver process): its client, tokenizer and config."""
        return cls(
            trainer.get_llm_client(),
            tokenizer=trainer.tokenizer,
            processor=trainer.processor,
            config=trainer.config,
            hf_model_type=hf_model_type,
            max_concurrency=max_concurrency,
            prepare_workers=prepare_workers,
            prompt_cache=prompt_cache,
        )

    @property
    def supports_logprobs(self) -> bool:
        """Whether the rollout engine answers choice and logprob mode (vLLM, karl-verl's CPU rollout)."""
        return self.rollout_name in PROMPT_LOGPROB_ROLLOUTS

    # ------------------------------------------------------------------ plumbing

    def _run(self, coro_fn: Any, *args: Any) -> Any:
        """Run ``coro_fn(*args)`` on the backend's loop and wait; cancellable from another thread."""
        if self._cancelled.is_set():
            raise ProbeCancelled("the probe was cancelled")
        if self._loop is None:
            self._loop = _LoopThread(self.prepare_workers)
        self.question_failures = {}
        future = self._loop.submit(coro_fn(*args))
        with self._lock:
            self._inflight.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise ProbeCancelled("the probe was cancelled while requests were in flight") from None
        finally:
            with self._lock:
                self._inflight.discard(future)

    def cancel(self) -> None:
        """Stop: in-flight calls raise :class:`ProbeCancelled`, and so does every later call.

        Only the client side is cancelled; a request the server already admitted runs to its end
        (one token in logprob mode, ``max_new_tokens`` in generate mode).
        """
        self._cancelled.set()
        with self._lock:
            inflight = list(self._inflight)
        for future in inflight:
            future.cancel()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    async def _prompt_builder(self) -> Any:
        # Built inside the running loop: AgentLoopBase binds the loop current at construction.
        if self._builder is None:
            self._builder = _make_prompt_builder(self)
        return self._builder

    async def _encode(self, request: GenerationRequest, where: str) -> tuple[list[int], list[Any] | None]:
        """Prompt token ids and processed images of one request, as verl's agent loop makes them."""
        builder = await self._prompt_builder()
        try:
            messages = await asyncio.get_running_loop().run_in_executor(None, _with_images, request, where)
            multi_modal = await builder.process_multi_modal_info(messages)
            images = multi_modal.get("images")
            cache, key, sizes = self.prompt_cache, None, ()
            if cache is not None:
                key, sizes = prompt_key(request), _image_sizes(images)
                if (cached := cache.get(key, sizes)) is not None:
                    return cached, images
            prompt_ids = [int(token) for token in await builder.ct_build_initial_tokens(messages, images=images)]
            if cache is not None:
                cache.put(key, prompt_ids, sizes)
        except UnreadableImageError:
            raise
        except Exception as err:
            raise PromptEncodingError(f"{where}: cannot build the prompt ({type(err).__name__}: {err})") from err
        return prompt_ids, images

    async def _generate_one(self, prompt_ids: list[int], images: Any, sampling_params: dict[str, Any],
                            where: str) -> Any:
        output = await self.client.generate(
            request_id=uuid4().hex,
            prompt_ids=prompt_ids,
            sampling_params=dict(sampling_params),
            image_data=images,
            # What the training agent loop sends with every request (the same AgentLoopBase method).
            mm_processor_kwargs=(await self._prompt_builder())._get_mm_processor_kwargs() or None,
        )
        if getattr(output, "stop_reason", None) == "aborted":
            raise ShortAnswerError(f"{where}: the rollout server aborted the request")
        return output

    async def _gather(self, coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
        """Each question's result in order; a question that raises gets None in its place and an entry
        in :attr:`question_failures`. Cancellation is not a question's failure: it stops all."""
        semaphore = asyncio.Semaphore(self.max_concurrency)
        failures: dict[int, QuestionFailure] = {}

        async def bounded(index: int, coro: Coroutine[Any, Any, Any]) -> Any:
            async with semaphore:
                try:
                    return await coro
                except ProbeCancelled:
                    raise
                except Exception as err:  # asyncio.CancelledError is a BaseException: not caught here
                    failures[index] = _failure(err)
                    return None

        tasks = [asyncio.ensure_future(bounded(index, coro)) for index, coro in enumerate(coros)]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # on cancellation, stop the siblings too
                task.cancel()
        self.question_failures = dict(sorted(failures.items()))
        return results

    @staticmethod
    async def _all_or_none(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
        """Every part of one question, or the first part's exception with the other parts stopped."""
        tasks = [asyncio.ensure_future(coro) for coro in coros]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    # ------------------------------------------------------------------ OptionScorer

    def option_logprobs(self, requests: Sequence[GenerationRequest], options: Sequence[str]) -> np.ndarray:
        """Log-probability of each single-token option as the reply's first token, ``[len(requests), len(options)]``."""
        if not self.supports_logprobs:
            raise BackendError(
                f"option_logprobs needs prompt log-probabilities ({', '.join(PROMPT_LOGPROB_ROLLOUTS)} rollouts); "
                f"the rollout is {self.rollout_name!r}"
            )
        from karl_verl.backends.hf import option_token_ids

        option_ids = option_token_ids(self.tokenizer, options)
        rows = self._run(self._option_logprobs, list(requests), option_ids)
        # A failed question's row is NaN (the marker run_probe checks against question_failures).
        failed = [float("nan")] * len(option_ids)
        return np.asarray([failed if row is None else row for row in rows],
                          dtype=np.float64).reshape(len(requests), len(option_ids))

    async def _option_logprobs(self, requests: list[GenerationRequest],
                               option_ids: list[int]) -> list[list[float] | None]:
        return await self._gather([self._score_request(r, option_ids, f"probe request {i}")
                                   for i, r in enumerate(requests)])

    async def _score_request(self, request: GenerationRequest, option_ids: list[int], where: str) -> list[float]:
        prompt_ids, images = await self._encode(request, where)
        return await self._all_or_none([self._appended_position(prompt_ids, images, option, where)
                                        for option in option_ids])

    async def _appended_position(self, prompt_ids: list[int], images: Any, token: int, where: str) -> float:
        """The log-probability of ``token`` right after ``prompt_ids`` (a forward pass, one token out)."""
        sequence = [*prompt_ids, token]
        # The same sampling parameters as verl's teacher log-prob pass, with only the actual tokens.
        sampling = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0, "detokenize": False}
        output = await self._generate_one(sequence, images, sampling, where)
        extra = getattr(output, "extra_fields", None) or {}
        ids, logprobs = extra.get("prompt_ids"), extra.get("prompt_logprobs")
        # verl's extract_prompt_logprobs: entry j scores prompt token j + 1 and a dummy entry ends the
        # list, so the appended token's position is the second to last. Counting from the end keeps
        # this right if the server deduplicated image tokens earlier in the prompt.
        if not ids or not logprobs or len(ids) < 2 or len(ids) != len(logprobs):
            raise ShortAnswerError(f"{where}: the rollout server returned no prompt log-probabilities "
                                   "(a vLLM or transformers rollout with prompt_logprobs support is required)")
        position_ids, position_logprobs = ids[-2], logprobs[-2]
        if [int(t) for t in position_ids if t is not None] != [token] or len(position_logprobs) != 1 \
                or position_logprobs[0] is None:
            raise ShortAnswerError(f"{where}: prompt log-probabilities do not line up with the prompt "
                                   f"(expected token {token}, got {position_ids})")
        return float(position_logprobs[0])

    # ------------------------------------------------------------------ OptionChooser

    def choose_options(self, requests: Sequence[GenerationRequest], options: Sequence[str]) -> list[int | None]:
        """The option each request picks: one greedy token constrained to the options' tokens (None: failed)."""
        if not self.supports_logprobs:
            raise BackendError(f"choose_options needs allowed_token_ids ({', '.join(PROMPT_LOGPROB_ROLLOUTS)} "
                               f"rollouts); the rollout is {self.rollout_name!r}")
        from karl_verl.backends.hf import option_token_ids

        option_ids = option_token_ids(self.tokenizer, options)
        return self._run(self._choose_all, list(requests), option_ids)

    async def _choose_all(self, requests: list[GenerationRequest], option_ids: list[int]) -> list[int | None]:
        return await self._gather([self._choose_one(r, option_ids, f"probe request {i}")
                                   for i, r in enumerate(requests)])

    async def _choose_one(self, request: GenerationRequest, option_ids: list[int], where: str) -> int:
        prompt_ids, images = await self._encode(request, where)
        sampling = {"max_tokens": 1, "temperature": 0.0, "allowed_token_ids": list(option_ids), "logprobs": False,
                    "detokenize": False}
        output = await self._generate_one(prompt_ids, images, sampling, where)
        token_ids = list(getattr(output, "token_ids", None) or [])
        if not token_ids or int(token_ids[0]) not in option_ids:
            raise ShortAnswerError(f"{where}: the rollout server answered {token_ids[:3]} instead of one of the "
                                   f"option tokens {option_ids}")
        return option_ids.index(int(token_ids[0]))

    # ------------------------------------------------------------------ TextGenerator

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSettings) -> list[list[str] | None]:
        """``sampling.n`` replies per request (prompt excluded), decoded without special tokens (None: failed)."""
        params = {
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "top_k": -1,
            "max_tokens": int(sampling.max_new_tokens),
            "repetition_penalty": 1.0,
            "logprobs": False,
        }
        return self._run(self._generate_all, list(requests), params, int(sampling.n), sampling.seed)

    async def _generate_all(self, requests: list[GenerationRequest], params: dict[str, Any], n: int,
                            seed: int | None) -> list[list[str] | None]:
        async def one(index: int, request: GenerationRequest) -> list[str]:
            where = f"probe request {index}"
            prompt_ids, images = await self._encode(request, where)
            texts = []
            for sample in range(n):
                sample_params = dict(params)
                if seed is not None:  # a per-request seed makes the probe reproducible on vLLM
                    sample_params["seed"] = int(seed) + index * n + sample
                output = await self._generate_one(prompt_ids, images, sample_params, where)
                token_ids = list(getattr(output, "token_ids", None) or [])
                if not token_ids:
                    raise ShortAnswerError(f"{where}: the rollout server returned an empty reply")
                texts.append(self.tokenizer.decode(token_ids, skip_special_tokens=True))
            return texts

        return await self._gather([one(i, r) for i, r in enumerate(requests)])


def model_type_of(config: Any) -> str | None:
    """The policy's Hugging Face ``model_type`` (what verl's agent-loop workers select the builder by).

    Builds verl's ``HFModelConfig`` (it reads the checkpoint's config, tokenizer and processor), so
    call it once per run.
    """
    from verl.utils.config import omega_conf_to_dataclass

    model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
    model_type = getattr(getattr(model_config, "hf_config", None), "model_type", None)
    return model_type if isinstance(model_type, str) else None


def _make_prompt_builder(backend: RolloutProbeBackend) -> Any:
    """verl's agent-loop prompt machinery (dataset class, processor, Continuous Token builder)."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase, DictConfigWrap
    from verl.utils.dataset.rl_dataset import get_dataset_class

    class _PromptBuilder(AgentLoopBase):
        """Only the prompt half of an agent loop: ``process_multi_modal_info`` and ``ct_build_initial_tokens``."""

        async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
            raise NotImplementedError("the probe's prompt builder does not run agent loops")

    config = backend.config
    return _PromptBuilder(
        trainer_config=DictConfigWrap(config),
        server_manager=backend.client,
        tokenizer=backend.tokenizer,
        processor=backend.processor,
        dataset_cls=get_dataset_class(config.data),
        data_config=DictConfigWrap(config.data),
        hf_model_type=backend.hf_model_type,
    )
