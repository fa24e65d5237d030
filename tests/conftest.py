"""Shared test setup: the oracle and corpus helpers in tests/_support are importable by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_support"))
