"""The doctests in the data modules' docstrings run as tests."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["karl_verl.data.prompts", "karl_verl.data.schema", "karl_verl.data.compose",
                                    "karl_verl.data.sft", "karl_verl.data.cot"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
