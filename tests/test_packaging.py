"""Packaging: the wheel the README builds holds every part, and the gpu extra pins what verl pins."""

import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _requirements(distribution: str) -> list[Requirement]:
    return [Requirement(text) for text in importlib.metadata.requires(distribution) or []]


def test_gpu_extra_pins_flash_attn_as_verl_does():
    verl_pins = {str(r.specifier) for r in _requirements("verl") if r.name == "flash-attn"}
    ours = [r for r in _requirements("karl-verl") if r.name == "flash-attn"]
    assert len(verl_pins) == 1 and verl_pins.pop().startswith("==")
    assert len(ours) == 1 and 'extra == "gpu"' in str(ours[0].marker)
    assert {str(r.specifier) for r in _requirements("verl") if r.name == "flash-attn"} == {str(ours[0].specifier)}


def test_pip_wheel_holds_the_package_recipes_and_hydra_plugin(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, text=True, timeout=600,
                   cwd=tmp_path)
    (wheel,) = tmp_path.glob("karl_verl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {Path(n).stem for n in names if re.match(r"karl_verl/recipes/recipe/.*\.yaml$", n)}
    assert {"karl_kvg", "karl_kvg_grpo", "karl_kvg_v1"} <= recipes
    assert "hydra_plugins/karl_verl_recipes/__init__.py" in names
    assert "karl_verl/cli.py" in names and "karl_verl/commands/usage.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "karl = karl_verl.integration:register_all" in text and "karl-verl = karl_verl.cli:main" in text
