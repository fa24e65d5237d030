"""The recipes' attention resolvers (karl_verl/integration/resolvers.py) on OmegaConf configs."""

import sys

from omegaconf import OmegaConf

from karl_verl.integration import resolvers

RECIPE_KEYS = {
    "karl": {"runtime": {"attention": "auto"}},
    "model": {"use_remove_padding": "${karl_remove_padding:${karl.runtime.attention}}",
              "override_config": {"attn_implementation": "${karl_attention:${karl.runtime.attention}}"}},
}


def test_the_keys_resolve_to_one_choice_announced_once(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    resolvers.register_resolvers()
    resolvers.register_resolvers()  # idempotent: OmegaConf refuses a second registration under one name
    resolvers.announced_attention.cache_clear()
    config = OmegaConf.create(RECIPE_KEYS)
    resolved = OmegaConf.to_container(config, resolve=True)
    assert resolved["model"] == {"use_remove_padding": False, "override_config": {"attn_implementation": "sdpa"}}
    OmegaConf.to_container(config, resolve=True)
    err = capsys.readouterr().err
    assert err.count("[karl-verl] actor attention: attn_implementation=sdpa, use_remove_padding=false") == 1


def test_an_explicit_attention_is_passed_through():
    resolvers.register_resolvers()
    config = OmegaConf.create(RECIPE_KEYS)
    config.karl.runtime.attention = "flash_attention_2"
    assert config.model.use_remove_padding is True
    assert config.model.override_config.attn_implementation == "flash_attention_2"
