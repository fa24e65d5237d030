"""A transformers backend: batched generation and option scoring with any HF vision-language model.

Runs on CPU (tests, the tiny fixture, small probes) or on one GPU (``device="cuda"``); no vLLM,
no Ray. Batches are left-padded, so the last position of every row is the answer position.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from karl_verl.backends.base import (
    BackendError,
    GenerationRequest,
    SamplingSettings,
    check_generations,
    request_images,
    structured_messages,
)

if TYPE_CHECKING:
    import numpy as np
    import torch


def option_token_ids(tokenizer: Any, options: Sequence[str]) -> list[int]:
    """The token id of each option; every option must encode to exactly one token (else :class:`BackendError`)."""
    ids: list[int] = []
    for option in options:
        encoded = tokenizer.encode(option, add_special_tokens=False)
        if len(encoded) != 1:
            raise BackendError(f"option {option!r} is not a single token for this tokenizer: {encoded}")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        raise BackendError(f"options {list(options)} do not map to distinct tokens: {ids}")
    return ids


def load_processor(path: str | os.PathLike[str]) -> Any:
    """``AutoProcessor.from_pretrained(path)``, or the fixture loader for a tiny test checkpoint."""
    from karl_verl.testing.tiny_qwen3vl import is_tiny_checkpoint, load_tiny_processor

    # Only a directory written by save_tiny_checkpoint takes the fixture route (no torchvision on CPU);
    # every real checkpoint goes through the stock loader.
    if is_tiny_checkpoint(path):
        return load_tiny_processor(path)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def response_logprobs(model: Any, inputs: dict[str, torch.Tensor], response: list[int]) -> torch.Tensor:
    """Log-probabilities of ``response`` tokens after the prompt in ``inputs`` (grad enabled): the
    supervised loss of the warm-ups (``karl-verl experiment``, the dry run) is their negative mean."""
    import torch

    prompt_ids = inputs["input_ids"][0]
    ids = torch.cat([prompt_ids, torch.tensor(response, dtype=prompt_ids.dtype)]).unsqueeze(0)
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in inputs:  # M-RoPE needs to know which positions are image tokens
        token_types = inputs["mm_token_type_ids"][0]
        extra["mm_token_type_ids"] = torch.cat([token_types, token_types.new_zeros(len(response))]).unsqueeze(0)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    start = prompt_ids.shape[0]
    logprobs = torch.log_softmax(logits[start - 1 : start - 1 + len(response)].float(), dim=-1)
    return logprobs.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


class HFBackend:
    """:class:`~karl_verl.backends.base.TextGenerator` and :class:`~karl_verl.backends.base.OptionScorer`
    on a transformers model and processor (CPU or one GPU).

    ``batch_size`` requests go through the model at once; ``progress`` shows a tqdm bar per call.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        *,
        progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise BackendError(f"HFBackend: batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.batch_size = batch_size
        self.progress = progress

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> HFBackend:
        """Load model and processor from a checkpoint directory or hub name.

        ``device=None`` picks CUDA when available, else CPU. ``dtype="auto"`` is bfloat16 on CUDA and
        float32 on CPU (CPU bfloat16 matmuls are slow and imprecise). A directory written by
        :func:`karl_verl.testing.tiny_qwen3vl.save_tiny_checkpoint` is accepted too.
        """
        import torch
        from transformers import AutoModelForImageTextToText

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        # device_map loads the weights straight onto the device (no full copy in CPU memory first).
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map=device)
        return cls(model, load_processor(path), batch_size=batch_size, progress=progress)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(
        self, requests: Sequence[GenerationRequest], desc: str
    ) -> Iterator[tuple[int, list[GenerationRequest]]]:
        from tqdm.auto import tqdm

        with tqdm(total=len(requests), desc=desc, unit="q", disable=not self.progress, leave=False) as bar:
            for start in range(0, len(requests), self.batch_size):
                batch = list(requests[start : start + self.batch_size])
                yield start, batch
                bar.update(len(batch))

    def encode(self, requests: Sequence[GenerationRequest], *, first_index: int = 0) -> Any:
        """Chat template + processor for one batch: left-padded tensors on the model's device."""
        prompts, images = [], []
        for offset, request in enumerate(requests):
            where = f"request {first_index + offset}"
            messages = structured_messages(request, where=where)
            prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            images.extend(request_images(request, where=where))
        # Left padding puts every row's answer position last; padding_side per call leaves the
        # caller's processor untouched.
        inputs = self.processor(
            text=prompts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
        )
        return inputs.to(self.device)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSettings) -> list[list[str]]:
        """``sampling.n`` texts per request. Seeded: the same requests, batch size and seed give the same texts
        (the global torch RNG is restored afterwards). ``temperature == 0`` decodes greedily."""
        import torch

        outputs: list[list[str]] = []
        greedy = sampling.temperature == 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling.seed)
            for start, batch in self._batches(requests, "generate"):
                inputs = self.encode(batch, first_index=start)
                # Neutral top_k / repetition_penalty override what a checkpoint's generation_config.json
                # sets (Qwen's set both), so HF samples like vLLM given the same SamplingSettings.
                kwargs: dict[str, Any] = {
                    "max_new_tokens": sampling.max_new_tokens,
                    "num_return_sequences": sampling.n,
                    "repetition_penalty": 1.0,
                }
                if greedy:
                    kwargs.update(do_sample=False)
                else:
                    kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
                tokens = self.model.generate(
                    **inputs, **kwargs, pad_token_id=self.tokenizer.pad_token_id
                )
                texts = self.tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                # generate() returns the n samples of a request next to each other.
                outputs.extend(texts[i * sampling.n : (i + 1) * sampling.n] for i in range(len(batch)))
        return check_generations(outputs, len(requests), sampling.n, backend="HFBackend")

    def option_logprobs(self, requests: Sequence[GenerationRequest], options: Sequence[str]) -> np.ndarray:
        """Log-probability of each single-token option as the reply's first token: ONE forward pass per batch
        (no decoding), log-softmax over the whole vocabulary in float32. Shape ``[len(requests), len(options)]``."""
        import numpy as np
        import torch

        ids = torch.tensor(option_token_ids(self.tokenizer, options))
        rows: list[np.ndarray] = []
        with torch.no_grad():
            for start, batch in self._batches(requests, "score options"):
                inputs = self.encode(batch, first_index=start)
                # logits_to_keep=1: only the last (answer) position goes through the LM head.
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
                logprobs = torch.log_softmax(logits, dim=-1)[:, ids.to(logits.device)]
                rows.append(logprobs.cpu().numpy())
        if not rows:
            return np.zeros((0, len(options)), dtype=np.float64)
        return np.concatenate(rows).astype(np.float64)
