"""A transformers rollout server for verl 0.9's agent loop: rollout ``transformers`` on CPU runs.

verl 0.9.1's v1 trainer generates through rollout *servers* (vLLM, SGLang, TRT-LLM), reached by
the agent loop and :class:`~verl.workers.rollout.llm_server.LLMServerClient` as Ray actors with a
token-in, token-out ``generate``. None runs without a GPU. This module registers a fourth rollout,
``transformers``, in verl's two rollout registries (``workers/rollout/base.py:_ROLLOUT_REGISTRY`` for
the per-worker adapter, ``workers/rollout/replica.py:RolloutReplicaRegistry`` for the replica):

* :class:`TransformersRolloutServer` (a Ray actor, one per replica) holds the policy as a
  transformers model and answers ``generate(request_id, prompt_ids, sampling_params, image_data,
  mm_processor_kwargs)`` like verl's vLLM server: ``temperature`` (0: greedy), ``top_p``, ``top_k``
  (-1: off), ``max_tokens``, ``seed``, ``repetition_penalty``, ``ignore_eos``, ``allowed_token_ids``,
  ``logprobs`` (the
  sampled tokens' log-probabilities, processed or raw as ``rollout.logprobs_mode`` says) and
  ``prompt_logprobs`` (vLLM's layout as verl's ``extract_prompt_logprobs`` builds it, so the
  probe's logprob mode runs on it). Images are turned into pixel values with the checkpoint's own
  image processor and the same ``mm_processor_kwargs`` vLLM would get.
* Sleep and wake-up are honoured, as vLLM's level-2 sleep: ``sleep`` frees the weights (buffers
  such as rotary tables are kept), a wake-up for ``weights`` allocates them again without values,
  and generation is refused until the next weight sync fills them; ``kv_cache`` gates generation
  the same way. So after a training step the server can only answer with the weights the actor
  just sent.
* :class:`TransformersServerAdapter` lives in each FSDP actor worker: at every weight sync it
  drains verl's weight generator (every rank must: gathering a sharded tensor is a collective)
  and the replica's leader rank sends the full tensors to its server.

Requests are queued and answered in batches (in a worker thread, so that control calls such as
``abort_all_requests`` stay responsive): the ``n`` samples of one prompt, which the agent loop sends
together, share one batched ``generate``, each row sampling from its own seeded generator so that
an answer does not depend on its batch mates. Other requests run one by one. A request without a
``seed`` gets one derived from the server's seed, the weight version, the prompt and how many times
the same prompt was asked since the last sync, so a run and its resumed twin sample the same
responses. Policies never write image placeholders; a random tiny model does, and verl's actor
would then find image tokens without image features, so the four vision placeholder tokens are
never sampled.

Runs only in CPU runs (recipe ``karl_kvg_cpu``); a GPU run never imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import ray
import torch
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry, TokenOutput

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "transformers"
#: Tokens a policy never writes (see the module docstring).
VISION_PLACEHOLDER_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def server_actor_name(replica_rank: int, suffix: str = "") -> str:
    return f"karl_transformers_rollout_{replica_rank}{suffix}"


class RolloutServerAsleep(RuntimeError):
    """``generate`` was called while the server's weights or cache are released (between sleep and sync)."""


def derived_seed(base_seed: int, weight_version: Any, prompt_ids: list[int], occurrence: int) -> int:
    """A request's seed when it gives none: fixed by the weights, the prompt and its repeat count."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{base_seed}|{weight_version}|{occurrence}|".encode())
    digest.update(",".join(map(str, prompt_ids)).encode())
    return int.from_bytes(digest.digest(), "little") & 0x7FFF_FFFF_FFFF


def prompt_logprob_entries(logprobs: torch.Tensor, prompt_ids: list[int], top_k: int
                           ) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM's prompt log-probabilities in verl's layout (``vllm_rollout/utils.py:extract_prompt_logprobs``).

    ``logprobs`` is ``[len(prompt_ids), vocab]`` (position j predicts token j + 1). Entry j of the
    result scores prompt token j + 1: the top ``top_k`` tokens by rank, or with ``top_k`` 0 the
    actual token alone; a dummy entry ends the list.
    """
    ids: list[list[int]] = []
    values: list[list[float]] = []
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long)
    scored = logprobs[:-1]
    if top_k == 0:
        actual = scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ids = [[int(t)] for t in targets.tolist()]
        values = [[float(v)] for v in actual.tolist()]
    else:
        top = torch.topk(scored, k=min(top_k, scored.shape[-1]), dim=-1)
        ids = top.indices.tolist()
        values = top.values.tolist()
    width = max(top_k, 1)
    ids.append([0] * width)
    values.append([0.0] * width)
    return ids, values


class _AllowedTokens:
    """vLLM's ``allowed_token_ids``: every other token's logit is -inf (a transformers logits processor)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.token_ids] = scores[:, self.token_ids]
        return masked


class _RowSampler:
    """The last logits processor: warps each row as vLLM's sampling parameters say and picks its token.

    Temperature 0 is greedy. Otherwise each row draws from its own ``torch.Generator`` seeded with the
    request's seed, so twins batched together sample independently and reproducibly. The processed
    log-probability of each chosen token is kept; the returned scores leave only that token finite.
    """

    def __init__(self, seeds: list[int], *, temperature: float, top_k: int, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.greedy = temperature <= 0
        self.warpers: list[Any] = []
        if not self.greedy and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if not self.greedy and top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if not self.greedy and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.chosen_logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        log_probs = torch.log_softmax(scores.float(), dim=-1)
        if self.greedy:
            chosen = scores.argmax(dim=-1)
        else:
            probs = log_probs.exp()
            chosen = torch.stack([torch.multinomial(probs[row], 1, generator=generator)[0]
                                  for row, generator in enumerate(self.generators)])
        self.chosen_logprobs.append(log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1))
        only_chosen = torch.full_like(scores, float("-inf"))
        only_chosen.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return only_chosen


@dataclasses.dataclass(eq=False)
class _Request:
    """One queued ``generate`` call; requests with the same :attr:`group` can share a batch."""

    prompt_ids: list[int]
    params: dict[str, Any]
    image_data: list[Any] | None
    mm_processor_kwargs: dict[str, Any]
    future: asyncio.Future | None

    @functools.cached_property
    def group(self) -> Any:
        images = [_image_fingerprint(image) for image in (self.image_data or [])]
        if any(fingerprint is None for fingerprint in images):
            return id(self)  # an image we cannot compare is batched with nothing
        settings = {k: v for k, v in self.params.items() if k != "seed"}
        return (tuple(self.prompt_ids), tuple(images), json.dumps(settings, sort_keys=True, default=repr),
                json.dumps(self.mm_processor_kwargs, sort_keys=True, default=repr))


def _image_fingerprint(image: Any) -> str | None:
    """A digest of a PIL image's pixels (None for anything else)."""
    tobytes = getattr(image, "tobytes", None)
    if tobytes is None or not hasattr(image, "mode") or not hasattr(image, "size"):
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}|{image.size}|".encode())
    digest.update(tobytes())
    return digest.hexdigest()


def _repeat_rows(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """One prompt's model inputs for ``rows`` identical rows (Qwen-VL pixel values are stacked per image)."""
    if rows == 1:
        return inputs
    return {name: value.repeat(rows, *([1] * (value.dim() - 1))) for name, value in inputs.items()}


class TransformersRolloutServer:
    """One rollout replica's model, served with transformers (a Ray actor; see the module docstring)."""

    def __init__(self, model_path: str, *, replica_rank: int, response_length: int, prompt_length: int,
                 max_model_len: int | None, seed: int, dtype: str = "float32",
                 logprobs_mode: str = "processed_logprobs", max_batch_size: int = 64,
                 batch_wait_ms: float = 10.0) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
        from verl.utils.tokenizer import hf_processor, hf_tokenizer

        from karl_verl.cpu.patches import processor_without_torchvision

        self.model_path = model_path
        self.replica_rank = replica_rank
        self.response_length = int(response_length)
        self.prompt_length = int(prompt_length)
        self.max_model_len = int(max_model_len or (self.prompt_length + self.response_length))
        self.seed = int(seed)
        if logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(f"rollout.logprobs_mode {logprobs_mode!r}: the transformers rollout supports "
                             "processed_logprobs and raw_logprobs")
        self.logprobs_mode = logprobs_mode
        hf_config = AutoConfig.from_pretrained(model_path)
        model_class = AutoModelForImageTextToText if hasattr(hf_config, "vision_config") else AutoModelForCausalLM
        self.model = model_class.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = hf_tokenizer(model_path)
        self.processor = processor_without_torchvision(model_path, hf_processor)
        self.eos_token_ids = self._eos_token_ids()
        vocab = self.tokenizer.get_vocab()
        self.suppressed_token_ids = [vocab[t] for t in VISION_PLACEHOLDER_TOKENS if t in vocab]
        self.image_token_id = getattr(hf_config, "image_token_id", None)
        self.video_token_id = getattr(hf_config, "video_token_id", None)
        self.weights_loaded = True
        self.weights_synced = True  # loaded from the checkpoint; False between a wake-up and the next sync
        self.kv_cache_ready = True
        self.weight_version: Any = "initial"
        self.global_steps: int | None = None
        self.syncs = 0
        self.requests = 0
        self.aborting = False
        self._occurrences: Counter[tuple[int, ...]] = Counter()
        self._kept_buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.batches = 0
        self._pending: list[_Request] = []
        self._batcher: asyncio.Future | None = None

    def _eos_token_ids(self) -> list[int]:
        ids = set()
        generation_config = getattr(self.model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    # ------------------------------------------------------------------ generation

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: list[Any] | None = None, video_data: list[Any] | None = None,
                       mm_processor_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> TokenOutput:
        if video_data:
            raise ValueError("the transformers rollout server does not take videos")
        if self.aborting:
            return self._aborted()
        request = _Request(prompt_ids=[int(t) for t in prompt_ids], params=dict(sampling_params or {}),
                           image_data=image_data, mm_processor_kwargs=dict(mm_processor_kwargs or {}),
                           future=asyncio.get_running_loop().create_future())
        self._pending.append(request)
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.ensure_future(self._serve_pending())
        return await request.future

    def _aborted(self) -> TokenOutput:
        return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted",
                           extra_fields={"global_steps": self.global_steps})

    async def _serve_pending(self) -> None:
        """Answer queued requests, oldest first, each turn taking every queued twin of the oldest one.

        The agent loop sends a prompt's ``n`` samples at once; a short wait lets them all arrive, so
        one batched ``generate`` answers the group (a model step costs about the same for 1 row or 64).
        """
        await asyncio.sleep(self.batch_wait_s)
        while self._pending:
            head = self._pending[0]
            batch = [r for r in self._pending if r.group == head.group][: self.max_batch_size]
            chosen = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in chosen]
            try:
                outputs = await asyncio.to_thread(self._generate_batch, batch)
            except Exception as error:  # every request of the batch fails with the batch's error
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            for request, output in zip(batch, outputs, strict=True):
                if not request.future.done():
                    request.future.set_result(output)

    def _generate(self, prompt_ids: list[int], params: dict[str, Any], image_data: list[Any] | None,
                  mm_processor_kwargs: dict[str, Any]) -> TokenOutput:
        """One request, answered as a batch of one (tests call it directly)."""
        request = _Request(prompt_ids=[int(t) for t in prompt_ids], params=dict(params), image_data=image_data,
                           mm_processor_kwargs=dict(mm_processor_kwargs), future=None)
        return self._generate_batch([request])[0]

    def _generate_batch(self, batch: list[_Request]) -> list[TokenOutput]:
        """Answer requests that share prompt, images and sampling parameters (all but the seed) in one pass."""
        first = batch[0]
        prompt_ids, params = first.prompt_ids, dict(first.params)
        with self._lock:
            if not (self.weights_loaded and self.weights_synced and self.kv_cache_ready):
                raise RolloutServerAsleep(
                    f"transformers rollout server {self.replica_rank}: generate while asleep (weights loaded: "
                    f"{self.weights_loaded}, synced: {self.weights_synced}, cache ready: {self.kv_cache_ready}); "
                    "verl must wake it and sync weights first")
            self.requests += len(batch)
            self.batches += 1
            headroom = self.max_model_len - len(prompt_ids)
            if headroom < 1:
                raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room within max_model_len "
                                 f"{self.max_model_len}")
            max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", None))
            if max_tokens is None:
                max_tokens = min(self.response_length, self.prompt_length + self.response_length - len(prompt_ids))
            max_tokens = max(1, min(int(max_tokens), headroom))
            seeds = []
            key = tuple(prompt_ids)
            for request in batch:
                seed = request.params.get("seed")
                if seed is None:
                    seed = derived_seed(self.seed, self.weight_version, prompt_ids, self._occurrences[key])
                    self._occurrences[key] += 1
                seeds.append(int(seed))
            inputs = self._model_inputs(prompt_ids, first.image_data, first.mm_processor_kwargs)
            extra: dict[str, Any] = {"global_steps": self.global_steps, "weight_version": self.weight_version}
            with torch.no_grad():
                top_prompt = params.get("prompt_logprobs")
                if top_prompt is not None:
                    logits = self.model(**inputs).logits[0].float()
                    extra["prompt_ids"], extra["prompt_logprobs"] = prompt_logprob_entries(
                        torch.log_softmax(logits, dim=-1), prompt_ids, int(top_prompt))
                rows = self._decode(_repeat_rows(inputs, len(batch)), params, max_tokens, seeds)
        want_logprobs = params.get("logprobs")
        return [TokenOutput(token_ids=tokens, log_probs=log_probs if want_logprobs not in (None, False) else None,
                            stop_reason="completed", extra_fields=dict(extra))
                for tokens, log_probs in rows]

    def _model_inputs(self, prompt_ids: list[int], image_data: list[Any] | None,
                      mm_processor_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if image_data:
            if self.processor is None:
                raise ValueError("images sent to a text-only model")
            pixels = self.processor.image_processor(images=list(image_data), return_tensors="pt",
                                                    **mm_processor_kwargs)
            inputs["pixel_values"] = pixels["pixel_values"]
            inputs["image_grid_thw"] = pixels["image_grid_thw"]
        if self.image_token_id is not None and self.processor is not None:
            # M-RoPE positions: 0 text, 1 image, 2 video (what the processor returns beside input_ids).
            token_types = torch.zeros_like(input_ids)
            token_types[input_ids == self.image_token_id] = 1
            if self.video_token_id is not None:
                token_types[input_ids == self.video_token_id] = 2
            inputs["mm_token_type_ids"] = token_types
        return inputs

    def _decode(self, inputs: dict[str, torch.Tensor], params: dict[str, Any], max_tokens: int, seeds: list[int]
                ) -> list[tuple[list[int], list[float]]]:
        from transformers import GenerationConfig, LogitsProcessorList

        ignore_eos = bool(params.get("ignore_eos", False))
        # Greedy search over scores in which a row sampler left one finite token per row: generate keeps
        # the cache and positions, and each row samples from its own seeded generator, so a request's
        # answer does not depend on which twins shared its batch.
        config = GenerationConfig(
            max_new_tokens=max_tokens, min_new_tokens=max_tokens if ignore_eos else 0, do_sample=False,
            repetition_penalty=float(params.get("repetition_penalty", 1.0)),
            eos_token_id=None if ignore_eos else self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            suppress_tokens=self.suppressed_token_ids or None,
            output_logits=self.logprobs_mode == "raw_logprobs", return_dict_in_generate=True,
        )
        sampler = _RowSampler(seeds, temperature=float(params.get("temperature", 1.0)),
                              top_k=int(params.get("top_k", -1) or -1), top_p=float(params.get("top_p", 1.0)))
        processors = LogitsProcessorList()
        allowed = params.get("allowed_token_ids")
        if allowed:
            processors.append(_AllowedTokens([int(t) for t in allowed]))
        processors.append(sampler)
        output = self.model.generate(**inputs, generation_config=config, logits_processor=processors)
        prompt_len = inputs["input_ids"].shape[1]
        rows = []
        for row in range(len(seeds)):
            tokens = output.sequences[row, prompt_len:].tolist()
            for i, token in enumerate(tokens):
                if not ignore_eos and token in self.eos_token_ids:
                    tokens = tokens[: i + 1]
                    break
            # As vLLM's logprobs_mode: "processed" after temperature / top-k / top-p, "raw" from the logits.
            if self.logprobs_mode == "processed_logprobs":
                log_probs = [float(step[row]) for step in sampler.chosen_logprobs[: len(tokens)]]
            else:
                log_probs = [float(torch.log_softmax(step[row].float(), dim=-1)[token])
                             for step, token in zip(output.logits, tokens, strict=False)]
            rows.append((tokens, log_probs))
        return rows

    # ------------------------------------------------------------------ weights and memory

    async def update_weights(self, state: dict[str, torch.Tensor], global_steps: int | None = None) -> dict[str, Any]:
        """Load a full state dict sent by the actor (every parameter named, nothing unknown)."""
        return await asyncio.to_thread(self._update_weights, state, global_steps)

    def _update_weights(self, state: dict[str, torch.Tensor], global_steps: int | None) -> dict[str, Any]:
        with self._lock:
            if not self.weights_loaded:
                raise RolloutServerAsleep("weights sent before the server was woken up for 'weights'")
            params = dict(self.model.named_parameters(remove_duplicate=False))
            params.update(dict(self.model.named_buffers()))
            unknown = sorted(set(state) - set(params))
            if unknown:
                raise ValueError(f"weight sync names {len(unknown)} tensors the model does not have, "
                                 f"e.g. {unknown[:3]}")
            # Everything is checked before anything is copied: a refused sync leaves the served weights whole.
            for name, tensor in state.items():
                if tuple(params[name].shape) != tuple(tensor.shape):
                    raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, the model "
                                     f"{tuple(params[name].shape)}")
            updated = {params[name].data_ptr() for name in state}
            stale = [name for name, p in self.model.named_parameters() if p.data_ptr() not in updated]
            if stale:
                raise ValueError(f"weight sync left {len(stale)} parameters unset, e.g. {stale[:3]}")
            for name, tensor in state.items():
                params[name].data.copy_(tensor.to(params[name].dtype))
            self.syncs += 1
            self.global_steps = global_steps
            self.weight_version = f"sync{self.syncs}@step{global_steps}"
            self.weights_synced = True
            self._occurrences.clear()
            return {"tensors": len(state), "weight_version": self.weight_version}

    async def sleep(self, level: int | None = None) -> None:
        """Release weights and cache (vLLM's level-2 sleep): generation is refused until wake-up and sync."""
        with self._lock:
            if self.weights_loaded:
                # Buffers are not weights: verl syncs parameters only, and non-persistent buffers (rotary
                # frequency tables) would come back uninitialised. They are kept, as vLLM keeps its own.
                self._kept_buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
                self.model.to("meta")
            self.weights_loaded = False
            self.kv_cache_ready = False

    async def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Allocate what ``tags`` name (``weights``, ``kv_cache``; None: both); weights hold no values until a sync."""
        tags = set(tags or ("weights", "kv_cache"))
        with self._lock:
            if "weights" in tags and not self.weights_loaded:
                self.model.to_empty(device="cpu")
                self.model.tie_weights()  # to_empty allocates each tied parameter separately
                buffers = dict(self.model.named_buffers())
                for name, kept in self._kept_buffers.items():
                    buffers[name].copy_(kept)
                self.weights_loaded = True
                self.weights_synced = False
                self.weight_version = "woken, not synced"
            if "kv_cache" in tags:
                self.kv_cache_ready = True

    async def release_kv_cache(self) -> None:
        self.kv_cache_ready = False

    async def resume_kv_cache(self) -> None:
        self.kv_cache_ready = True

    async def clear_kv_cache(self) -> None:
        return None  # caches live only inside one generate call

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False
                                 ) -> dict[str, Any]:
        """Queued and new requests return ``aborted`` until :meth:`resume_generation`; a running batch finishes."""
        self.aborting = True
        queued, self._pending = self._pending, []
        for request in queued:
            if request.future is not None and not request.future.done():
                request.future.set_result(self._aborted())
        return {"aborted_count": len(queued), "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict[str, Any]:
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        self.aborting = False

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    async def stats(self) -> dict[str, Any]:
        """What the server did (tests read it): requests answered, syncs, weight version, state."""
        return {"requests": self.requests, "syncs": self.syncs, "weight_version": self.weight_version,
                "global_steps": self.global_steps, "weights_loaded": self.weights_loaded,
                "weights_synced": self.weights_synced, "kv_cache_ready": self.kv_cache_ready, "batches": self.batches,
                "replica_rank": self.replica_rank, "pid": os.getpid()}

    async def first_parameter_sum(self) -> float:
        """A cheap fingerprint of the served weights (tests compare it with the actor's)."""
        with self._lock:
            return float(sum(p.double().sum() for p in self.model.parameters()))


class TransformersReplica(RolloutReplica):
    """verl rollout replica ``transformers``: one :class:`TransformersRolloutServer` actor."""

    async def launch_servers(self) -> None:
        if self.world_size != 1:
            raise ValueError("the transformers rollout serves a replica from one process: set "
                             "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data/pipeline sizes 1)")
        name = server_actor_name(self.replica_rank, self.name_suffix)
        model_path = getattr(self.model_config, "local_path", None) or self.model_config.path
        placement: dict[str, Any] = {}
        workers = list(getattr(self, "workers", None) or [])
        if workers:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On its rank's node, as verl's vLLM replica places its servers: weight syncs stay on the
            # node, and a multi-node CPU run is placed as a GPU one (one replica per node).
            node_id = await workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        server = ray.remote(TransformersRolloutServer).options(
            name=name, num_cpus=0, max_concurrency=self.max_concurrency, **placement,
        ).remote(
            model_path, replica_rank=self.replica_rank, response_length=self.config.response_length,
            prompt_length=self.config.prompt_length, max_model_len=self.config.max_model_len,
            seed=int(getattr(self.config, "seed", 0) or 0), dtype=str(self.config.dtype),
            logprobs_mode=str(self.config.logprobs_mode),
        )
        await server.stats.remote()  # surfaces a failed model load here, not at the first request
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ray-actor://{name}"

    async def sleep(self) -> None:
        # As verl's vLLM replica: only a hybrid replica that frees its cache sleeps.
        if self.rollout_mode == RolloutMode.HYBRID and self.config.free_cache_engine:
            await asyncio.gather(*[server.sleep.remote() for server in self.servers])

    async def wake_up(self) -> None:
        if self.rollout_mode != RolloutMode.STANDALONE:
            await asyncio.gather(*[server.wake_up.remote() for server in self.servers])


class TransformersServerAdapter(BaseRollout):
    """The rollout handle in each FSDP actor worker: forwards resume / release / weight syncs to the server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1, **kwargs: Any
                 ) -> None:
        super().__init__(config, model_config, device_mesh)
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.is_leader = rank % world == 0
        self._server: Any = None

    def _handle(self) -> Any:
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        if self.is_leader:
            await self._handle().wake_up.remote(list(tags))

    async def release(self) -> None:
        if self.is_leader:
            await self._handle().sleep.remote()

    async def update_weights(self, weights: Any, wire_format: str = "named_tensors", **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"the transformers rollout takes full named tensors, not {wire_format!r}")
        state = {}
        for name, tensor in weights:  # every rank drains: a sharded tensor's full_tensor() is a collective
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if self.is_leader:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.is_leader:
            result = await self._handle().update_weights.remote(state, kwargs.get("global_steps"))
            logger.info("transformers rollout %d: weights synced (%s)", self.replica_rank, result)


def register() -> None:
    """Register rollout ``transformers`` in verl's adapter and replica registries (idempotent)."""
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.TransformersServerAdapter"
    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: TransformersReplica)


def is_registered() -> bool:
    return (_ROLLOUT_REGISTRY.get((ROLLOUT_NAME, "async")) == f"{__name__}.TransformersServerAdapter"
            and RolloutReplicaRegistry.get(ROLLOUT_NAME) is TransformersReplica)


# Importing this module registers it (dict entries, as verl's own decorators do).
register()
