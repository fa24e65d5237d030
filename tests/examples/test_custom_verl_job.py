"""examples/custom_verl_job.py runs and prints what its docstring promises."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_verl_job.py"


def test_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KA-IoU + format, mostly incorrect  : [2.0, 0.8, 0.0, 2.0]" in result.stdout
    assert "karl_grpo advantages" in result.stdout
