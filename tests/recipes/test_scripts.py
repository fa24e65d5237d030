"""The launch script in recipes/scripts/."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "scripts" / "run_karl_kvg.sh"


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_script_names_the_missing_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRAIN", "VAL", "MODEL", "CKPT")}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "set TRAIN to the training parquet" in result.stderr
