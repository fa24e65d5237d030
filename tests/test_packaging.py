"""Packaging: the wheel the README builds holds every part, and the gpu extra installs from wheels."""

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


#: Packages with no wheel for Linux x86_64 on PyPI: pip would build them from source on a GPU node
#: (flash-attn: hours with nvcc, or "No module named torch" under build isolation).
SOURCE_ONLY_ON_PYPI = ("flash-attn",)


def test_no_extra_requires_a_package_without_a_wheel():
    ours = _requirements("karl-verl")
    assert [str(r) for r in ours if r.name in SOURCE_ONLY_ON_PYPI] == []
    gpu = [r for r in ours if r.marker is not None and r.marker.evaluate({"extra": "gpu"})]
    # The gpu extra is verl's own vLLM extra, within karl-verl's verl range: a GPU node gets verl's pins.
    assert [(r.name, sorted(r.extras), str(r.specifier)) for r in gpu] == [("verl", ["vllm"], "<0.10,>=0.9.1")]


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
