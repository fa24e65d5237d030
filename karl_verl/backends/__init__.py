"""Generation backends behind two small protocols (see :mod:`karl_verl.backends.base`).

* :mod:`karl_verl.backends.base`: requests, sampling settings, the ``TextGenerator`` /
  ``OptionScorer`` protocols and request helpers (pure, CPU);
* :mod:`karl_verl.backends.hf`: transformers (CPU or one GPU);
* :mod:`karl_verl.backends.vllm_backend`: vLLM's offline engine (GPU only; imported lazily).

Importing this package imports neither torch nor vLLM.
"""

from karl_verl.backends.base import (
    IMAGE_PLACEHOLDER,
    BackendError,
    GenerationRequest,
    OptionScorer,
    SamplingSettings,
    TextGenerator,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "BackendError",
    "GenerationRequest",
    "OptionScorer",
    "SamplingSettings",
    "TextGenerator",
]
