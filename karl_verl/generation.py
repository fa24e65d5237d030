"""Running a model: backend loading, chunked generation, and the ``--model`` options of the commands.

``karl-verl eval``, ``data filter`` and ``data cot`` (a local teacher) talk to a
:class:`karl_verl.backends.base.TextGenerator`, so tests pass a fake one; the real backends
(transformers, vLLM) are imported only when a model is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from karl_verl.backends.base import GenerationRequest, SamplingSettings, TextGenerator

BACKENDS: tuple[str, ...] = ("hf", "vllm")


def load_generator(
    model: str,
    backend: str = "hf",
    *,
    device: str | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    seed: int = 20,
    vllm_kwargs: dict[str, Any] | None = None,
) -> TextGenerator:
    """A transformers (``hf``) or vLLM (``vllm``) generator for the checkpoint at ``model``."""
    if backend == "hf":
        from karl_verl.backends.hf import HFBackend

        # Progress is shown per chunk by generate_all; the backend's own bar would nest inside it.
        return HFBackend.from_pretrained(model, device=device, batch_size=batch_size, dtype=dtype, progress=False)
    if backend == "vllm":
        from karl_verl.backends.vllm_backend import VLLMBackend

        return VLLMBackend.create(model, seed=seed, **(vllm_kwargs or {}))
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def generate_all(
    generator: TextGenerator,
    requests: Sequence[GenerationRequest],
    sampling: SamplingSettings,
    *,
    chunk_size: int | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[str]]:
    """``generator.generate`` over ``requests`` in chunks of ``chunk_size`` (None: all at once, which
    suits vLLM's own batching), with a progress bar; ``sampling.n`` texts per request, checked."""
    from tqdm import tqdm

    from karl_verl.backends.base import check_generations

    size = len(requests) if not chunk_size else chunk_size
    outputs: list[list[str]] = []
    with tqdm(total=len(requests), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(requests), max(1, size)):
            chunk = list(requests[start:start + size])
            texts = check_generations(generator.generate(chunk, sampling), len(chunk), sampling.n,
                                      backend=type(generator).__name__)
            outputs.extend(texts)
            bar.update(len(chunk))
    return outputs


def add_inference_arguments(
    parser: argparse.ArgumentParser, *, temperature: float, max_new_tokens: int, seed: int
) -> argparse._ArgumentGroup:
    """The ``--model`` options shared by ``eval`` and ``data filter``; returns the group for more."""
    group = parser.add_argument_group("inference (with --model)")
    group.add_argument("--backend", choices=BACKENDS, default="hf", help="transformers (hf) or vLLM (default: hf)")
    group.add_argument("--device", help="hf backend device (default: cuda when available)")
    group.add_argument("--batch-size", type=int, default=8, help="hf backend batch size (default: 8)")
    group.add_argument("--temperature", type=float, default=temperature, help=f"(default: {temperature})")
    group.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default: {max_new_tokens})")
    group.add_argument("--seed", type=int, default=seed, help=f"sampling seed (default: {seed})")
    return group


def generator_from_args(
    args: argparse.Namespace, n: int, *, vllm_kwargs: dict[str, Any] | None = None
) -> tuple[TextGenerator, SamplingSettings]:
    """The generator and sampling settings that :func:`add_inference_arguments`' options describe."""
    from karl_verl.backends.base import SamplingSettings

    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed, n=n)
    generator = load_generator(args.model, args.backend, device=args.device, batch_size=args.batch_size,
                               seed=args.seed, vllm_kwargs=vllm_kwargs)
    return generator, sampling
