"""The doctests in the pure modules' docstrings run as tests."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["karl_verl.accuracy", "karl_verl.boxes", "karl_verl.mastery", "karl_verl.reward"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
