"""The package's layers: no module imports a module of a layer above its own, or of another group of its layer.

Bottom to top (:data:`LAYERS`); a module may import its own group and the layers below:

1. core: the method's pure modules (``karl_verl/*.py``: reward, boxes, mastery, advantage, config,
   accuracy, generation, synthetic_images, ...), ``backends/``, ``probe/``, ``testing/``;
2. ``data/`` | ``cpu/``;
3. ``evaluation/`` | ``integration/`` | ``world.py``;
4. ``dryrun/``;
5. ``experiment/`` (it runs ``main_ppo`` through the dry run's launcher);
6. ``commands/``, ``cli.py``, ``__main__.py``.

The package root, ``karl_verl/__init__.py``, imports ``karl_verl.integration`` (the hooks that register
karl-verl into verl): every import of a karl_verl module runs it, so importing the root is allowed
everywhere and its own imports belong to the integration group.

Two checks. Static: every ``import`` and ``from ... import`` of every file (inside functions and under
``TYPE_CHECKING`` too) and every ``importlib.import_module("karl_verl...")`` with a literal name, parsed
with :mod:`ast`. At run time: a fresh interpreter on the source tree imports every module, layer by
layer from the bottom, and each karl_verl module that an import brings in is charged to the module
whose import brought it (lower layers are in already, so the charge falls on the lowest importer;
groups of one layer go in alphabetically, so an import of a sibling already in shows in the static
check only, as does anything in ``__main__``, which runs the CLI when imported). One interpreter for
all layers: about 6 s, most of it importing verl once.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "karl_verl"

#: Bottom to top: per layer, its groups and each group's parts (a subpackage or a top-level module of
#: karl_verl). Groups of one layer are independent. Core also holds every top-level module named nowhere.
LAYERS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"core": ("backends", "probe", "testing")},
    {"data": ("data",), "cpu": ("cpu",)},
    {"evaluation": ("evaluation",), "integration": ("integration",), "world": ("world",)},
    {"dryrun": ("dryrun",)},
    {"experiment": ("experiment",)},
    {"commands": ("commands", "cli", "__main__")},
)
#: The group of the package root's own imports (``karl_verl/__init__.py``).
ROOT_GROUP = "integration"

RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}
GROUP_OF_PART = {part: group for groups in LAYERS for group, parts in groups.items() for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(path): path for path in sorted((REPO / PACKAGE).rglob("*.py"))}


def group_of(module: str) -> str:
    if module == PACKAGE:
        return ROOT_GROUP
    return GROUP_OF_PART.get(module.split(".")[1], "core")


def may_import(importer: str, imported: str) -> bool:
    if imported == PACKAGE:  # the root: imported with every karl_verl module
        return True
    mine, theirs = group_of(importer), group_of(imported)
    return theirs == mine or RANK[theirs] < RANK[mine]


def bottom_up() -> list[str]:
    """Every module, layer by layer from the bottom (``__main__`` left out: importing it runs the CLI)."""
    return sorted((m for m in FILES if m not in (PACKAGE, f"{PACKAGE}.__main__")),
                  key=lambda m: (RANK[group_of(m)], group_of(m), m))


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``path``, wherever it stands; ``from a import b`` gives ``a.b``
    when that is a module, else ``a``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield node.lineno, submodule if submodule in FILES else base
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def test_every_subpackage_has_a_layer():
    subpackages = {path.parent.name for path in (REPO / PACKAGE).glob("*/__init__.py")}
    assert sorted(subpackages - set(GROUP_OF_PART)) == []
    assert sorted(set(GROUP_OF_PART) - {m.split(".")[1] for m in FILES if m != PACKAGE}) == []


def test_no_import_statement_runs_up():
    """Static: every import in every file, lazy ones inside functions included."""
    offenders = []
    for module, path in FILES.items():
        for line, imported in dict.fromkeys(imports_of(path)):
            if imported.split(".")[0] == PACKAGE and not may_import(module, imported):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {module} ({group_of(module)}) imports "
                                 f"{imported} ({group_of(imported)})")
    assert offenders == [], "imports that run up a layer:\n" + "\n".join(offenders)


_IMPORT_EVERYTHING = """
import importlib, json, sys
import karl_verl.integration
# The registration hooks import integration's parts (and cpu/) when a verl registry module loads:
# the root package's doing, not the importing module's.
karl_verl.integration._remove_hooks()
root = sorted(m for m in sys.modules if m.split(".")[0] == "karl_verl")
brought = {}
for name in sys.argv[1:]:
    before = set(sys.modules)
    importlib.import_module(name)
    for new in set(sys.modules) - before:
        if new.split(".")[0] == "karl_verl":
            brought[new] = name
print(json.dumps({"file": karl_verl.__file__, "root": root, "brought": brought}))
"""


def test_no_import_runs_up_at_run_time():
    """Run time: what importing each module brings in, layer by layer from the bottom."""
    run = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING, *bottom_up()], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    imported = json.loads(run.stdout.splitlines()[-1])
    assert Path(imported["file"]).is_relative_to(REPO / PACKAGE)  # the source tree, not an installed copy
    assert [m for m in imported["root"] if group_of(m) != ROOT_GROUP] == [], "import karl_verl alone imports these"
    offenders = [f"{importer} ({group_of(importer)}) brought in {module} ({group_of(module)})"
                 for module, importer in sorted(imported["brought"].items()) if not may_import(importer, module)]
    assert offenders == [], "imports that run up a layer:\n" + "\n".join(offenders)
