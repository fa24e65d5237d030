"""The doctests in the evaluation modules' docstrings run as tests."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["karl_verl.evaluation.released", "karl_verl.evaluation.compare"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
