"""OmegaConf resolvers the recipes use, registered in every process that imports karl-verl.

``${karl_attention:${karl.runtime.attention}}`` and ``${karl_remove_padding:${karl.runtime.attention}}``
set the actor's ``override_config.attn_implementation`` and ``use_remove_padding`` from
:func:`karl_verl.gpu_stack.choose_attention`. OmegaConf calls a resolver in the process that reads the
key: verl's TaskRunner resolves the whole config before it builds the workers (and prints it), so the
choice is made once per run on a node of the cluster, and the logged config shows the resolved values.
The resolvers must exist in every process that may resolve these keys, so ``import karl_verl``
registers them (cheap: no import of torch or flash-attn until a key is read).
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from karl_verl.gpu_stack import AttentionChoice

ATTENTION_RESOLVER = "karl_attention"
REMOVE_PADDING_RESOLVER = "karl_remove_padding"


@functools.cache
def announced_attention(requested: str) -> AttentionChoice:
    """:func:`choose_attention`, printed to the run's log the first time in this process: the two keys
    that depend on it are resolved apart, and the log should state the choice once."""
    from karl_verl.gpu_stack import choose_attention

    choice = choose_attention(requested)
    # stderr: stdout may be a config dump (main_ppo --cfg job --resolve) that must stay plain YAML.
    print(f"[karl-verl] actor attention: {choice.describe()}", file=sys.stderr, flush=True)
    return choice


def _attention(requested: str = "auto") -> str:
    return announced_attention(str(requested)).implementation


def _remove_padding(requested: str = "auto") -> bool:
    return announced_attention(str(requested)).remove_padding


def register_resolvers() -> None:
    """Register the resolvers with OmegaConf in this process (idempotent)."""
    from omegaconf import OmegaConf

    for name, function in ((ATTENTION_RESOLVER, _attention), (REMOVE_PADDING_RESOLVER, _remove_padding)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
