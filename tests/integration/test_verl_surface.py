"""verl's surface (karl_verl/integration/verl_surface.py): the list is complete, current and checked.

A scan of the package's source (:func:`scan_source`, AST only) collects every verl name it uses:
``import verl.x`` / ``from verl.x import a``, attributes read or assigned through those names (one
level: ``tu.assign_non_tensor_stack``, ``ReplayBuffer.__init__ = ...``, and through plain local aliases
such as ``sender = module.X``), ``getattr``/``setattr``/``hasattr`` with a literal name, strings that are
a dotted verl path (``import_module("verl.x")``, ``python -m verl.trainer.main_ppo``, import hooks), and
Hydra ``_target_: verl.`` in the recipes. Classes derived from verl classes add what they override and
what they reach on their base (``super().x``, ``self.x``), resolved against the installed verl
(:func:`used_verl_names`). What no scan can see (a method called on an object verl hands over, a module
passed as an argument) is in :data:`UNSCANNED`, kept honest by a text check of the files it names.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from karl_verl.integration import verl_surface
from karl_verl.integration.verl_surface import (
    KINDS,
    SUPPORTED_VERL,
    VERL_SURFACE,
    VerlName,
    check_verl_surface,
    missing_verl_names,
    verl_in_supported_range,
)

REPO = Path(__file__).resolve().parents[2]
#: Scanned folders (relative to the repository root) and the file that is the list, not a use.
SCANNED = ("karl_verl", "hydra_plugins")
NOT_SCANNED = {"karl_verl/integration/verl_surface.py"}
#: Dotted verl strings that are not Python names, and why.
NOT_NAMES = {"verl.plugins": "the entry-point group verl loads plugins from (karl-verl info checks the entry point)"}
#: Listed names no scan can see, and why; each is kept honest by the files it names mentioning it.
_WEIGHTS = "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer.BucketedWeightSender"
_BUILDER = "verl.experimental.agent_loop.agent_loop.AgentLoopBase"
UNSCANNED = {
    _WEIGHTS: "patched on the module handed to patch_sender by the import hook",
    f"{_WEIGHTS}._init_socket": "patched on the module handed to patch_sender by the import hook",
    f"{_WEIGHTS}.async_send_weights": "patched on the module handed to patch_sender by the import hook",
    "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead._build_module":
        "overridden by a mixin put in front of the registered engine class at run time (type())",
    f"{_BUILDER}.process_multi_modal_info": "called on the prompt builder instance",
    f"{_BUILDER}.ct_build_initial_tokens": "called on the prompt builder instance",
    f"{_BUILDER}._get_mm_processor_kwargs": "called on the prompt builder instance",
    "verl.trainer.ppo.v1.trainer_sync.PPOTrainerSync.get_llm_client": "called on the trainer the probe is given",
    "verl.workers.engine_workers.ActorRolloutRefWorker.set_loss_fn": "called through verl's worker group",
}

VERL_STRING = re.compile(r"verl(\.[A-Za-z_][A-Za-z0-9_]*)+")
HYDRA_TARGET = re.compile(r"_target_:\s*['\"]?(verl\.[A-Za-z0-9_.]+)")
#: Module attributes every module has: reading them says nothing about verl's surface.
MODULE_DUNDERS = frozenset({"__file__", "__spec__", "__name__", "__path__", "__version__", "__doc__", "__dict__",
                            "__module__", "__qualname__", "__class__", "__loader__", "__package__"})


# ---------------------------------------------------------------------- the scan (AST only, no verl)


@dataclass(frozen=True)
class VerlUse:
    """One place the package names a verl object."""

    name: str  # dotted: module path, then attributes, as far as the source goes
    path: str
    line: int
    how: str  # import, attribute, patch, getattr, string, hydra
    #: How many leading parts of ``name`` the source fixes (an import, a string); attributes past them
    #: are verl names only as far as each one's owner is a module or a class (see :func:`used_verl_names`).
    bound: int = 0


@dataclass
class VerlSubclass:
    """A class derived from a verl class: the methods it defines and what it reaches on its base."""

    name: str
    bases: list[str]
    path: str
    methods: set[str] = field(default_factory=set)
    super_attrs: set[str] = field(default_factory=set)
    self_attrs: set[str] = field(default_factory=set)


@dataclass
class ScanResult:
    uses: list[VerlUse] = field(default_factory=list)
    subclasses: list[VerlSubclass] = field(default_factory=list)


def _is_verl_module(name: str) -> bool:
    return name == "verl" or name.startswith("verl.")


def _literal_import_module(node: ast.Call) -> str | None:
    func = node.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")
    if named and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value if _is_verl_module(node.args[0].value) else None
    return None


#: A local name's verl binding: (dotted name, how many of its parts the source fixes); None: shadowed.
Binding = tuple[str, int] | None


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str, result: ScanResult) -> None:
        self.path = path
        self.result = result
        #: Innermost last.
        self.scopes: list[dict[str, Binding]] = [{}]
        #: Packages on the way to a plain ``import verl.a.b`` (reached through the name ``verl``): not uses.
        self.packages: set[str] = set()
        self.classes: list[VerlSubclass | None] = []
        self.self_names: list[str | None] = []

    def _lookup(self, name: str) -> Binding:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def _record(self, binding: tuple[str, int], node: ast.AST, how: str) -> None:
        if binding[0] not in self.packages:
            self.result.uses.append(VerlUse(binding[0], self.path, getattr(node, "lineno", 0), how, binding[1]))

    def resolve(self, node: ast.AST) -> Binding:
        """The verl name ``node`` evaluates to, with the count of parts its binding fixes."""
        if isinstance(node, ast.Name):
            return self._lookup(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is None or node.attr in MODULE_DUNDERS:
                return None
            return f"{base[0]}.{node.attr}", base[1]
        if isinstance(node, ast.Call):
            module = _literal_import_module(node)
            return (module, module.count(".") + 1) if module else None
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not _is_verl_module(alias.name):
                self.scopes[-1][(alias.asname or alias.name).split(".")[0]] = None
                continue
            self._record((alias.name, alias.name.count(".") + 1), node, "import")
            if alias.asname:
                self.scopes[-1][alias.asname] = (alias.name, alias.name.count(".") + 1)
            else:
                parts = alias.name.split(".")
                self.packages.update(".".join(parts[:cut]) for cut in range(1, len(parts)))
                self.scopes[-1]["verl"] = ("verl", 1)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        verl = not node.level and node.module is not None and _is_verl_module(node.module)
        for alias in node.names:
            if not verl:
                self.scopes[-1][alias.asname or alias.name] = None
                continue
            name = f"{node.module}.{alias.name}"
            self._record((name, name.count(".") + 1), node, "import")
            self.scopes[-1][alias.asname or alias.name] = (name, name.count(".") + 1)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expression in [*node.decorator_list, node.args, *([node.returns] if node.returns else [])]:
            self.visit(expression)
        self.scopes[-1][node.name] = None
        cls = self.classes[-1] if self.classes else None
        method = cls is not None and self.self_names[-1] is None
        if method:
            cls.methods.add(node.name)
        arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                     *filter(None, (node.args.vararg, node.args.kwarg))]
        positional = node.args.posonlyargs + node.args.args
        self.self_names.append(positional[0].arg if method and positional else "")
        self.scopes.append(dict.fromkeys((argument.arg for argument in arguments), None))
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()
        self.self_names.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.scopes.append({})
        self.generic_visit(node)
        self.scopes.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expression in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(expression)
        bases = [resolved[0] for resolved in map(self.resolve, node.bases) if resolved is not None]
        self.scopes[-1][node.name] = None
        info = VerlSubclass(node.name, bases, self.path) if bases else None
        if info is not None:
            self.result.subclasses.append(info)
        self.classes.append(info)
        self.self_names.append(None)  # the class body: functions defined here are its methods
        self.scopes.append({})
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()
        self.self_names.pop()
        self.classes.pop()

    def _bind(self, targets: list[ast.expr], value: ast.expr) -> None:
        resolved = self.resolve(value)
        for target in targets:
            if isinstance(target, ast.Name):
                self.scopes[-1][target.id] = resolved  # an alias (``sender = module.X``), or shadowed

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        self._bind(node.targets, node.value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        if node.value is not None:
            self._bind([node.target], node.value)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        resolved = self.resolve(node)
        if resolved is not None:
            self._record(resolved, node, "patch" if isinstance(node.ctx, ast.Store | ast.Del) else "attribute")
        cls = self.classes[-1] if self.classes else None
        if cls is not None and self.self_names and self.self_names[-1]:
            value = node.value
            if isinstance(value, ast.Name) and value.id == self.self_names[-1]:
                cls.self_attrs.add(node.attr)
            elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
                cls.super_attrs.add(node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Name) and func.id in {"getattr", "setattr", "hasattr", "delattr"}
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            resolved = self.resolve(node.args[0])
            attr = node.args[1].value
            # karl-verl's own markers on verl's objects (``_karl_cpu_poll``) are not verl names.
            if resolved is not None and not attr.startswith(("karl", "_karl")):
                self._record((f"{resolved[0]}.{attr}", resolved[1]), node,
                             "getattr" if func.id in {"getattr", "hasattr"} else "patch")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and VERL_STRING.fullmatch(node.value):
            self._record((node.value, node.value.count(".") + 1), node, "string")


def scan_source(source: str, path: str = "<source>", result: ScanResult | None = None) -> ScanResult:
    """The verl names ``source`` (Python) uses, as written (see the module docstring for what counts)."""
    result = ScanResult() if result is None else result
    _Scanner(path, result).visit(ast.parse(source, filename=path))
    return result


def scan_package(root: Path = REPO) -> ScanResult:
    """:func:`scan_source` of every .py under :data:`SCANNED`, plus the recipes' Hydra ``_target_: verl.``."""
    result = ScanResult()
    for folder in SCANNED:
        for file in sorted((root / folder).rglob("*.py")):
            path = file.relative_to(root).as_posix()
            if path not in NOT_SCANNED:
                scan_source(file.read_text(encoding="utf-8"), path, result)
    for file in sorted((root / "recipes").rglob("*.yaml")):
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            for match in HYDRA_TARGET.finditer(line):
                target = match.group(1)
                result.uses.append(VerlUse(target, file.relative_to(root).as_posix(), number, "hydra",
                                           target.count(".") + 1))
    return result


# ---------------------------------------------------------------------- resolved against the installed verl


@functools.cache
def _load(name: str) -> Any:
    """The object a dotted verl name denotes, or None when the installed verl lacks it (or it cannot load here)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - verl's vllm_rollout raises ValueError without vLLM
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _verl_part(use: VerlUse) -> str:
    """The part of ``use.name`` that is verl's: past what the source fixes, each attribute counts while
    its owner is a module or a class (``trainer_base.logger``, not ``.addFilter``; ``REWARD_MANAGER``,
    not its ``.get``). An owner that does not load here (verl lacks it) keeps one attribute."""
    parts = use.name.split(".")
    end = max(use.bound, 1)
    while end < len(parts):
        owner = _load(".".join(parts[:end]))
        if owner is None:
            end += end == use.bound
            break
        if not (inspect.ismodule(owner) or inspect.isclass(owner)):
            break
        end += 1
    return ".".join(parts[:end])


def used_verl_names(scan: ScanResult, listed: set[str] | frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """Every verl name the scan found -> the files using it.

    Each use is cut to its verl part (:func:`_verl_part`); :data:`NOT_NAMES` are left out. Added: for
    each class derived from a verl class, the base's methods it overrides and what it reaches on its
    base (``super().x``, and ``self.x`` that the base class defines). A member in ``listed`` counts
    even where the installed verl lacks it (so that a verl that dropped it reports it missing, not stale).
    """
    names: dict[str, set[str]] = {}
    for use in scan.uses:
        name = _verl_part(use)
        if name not in NOT_NAMES:
            names.setdefault(name, set()).add(use.path)
    for cls in scan.subclasses:
        bases = [(name, _load(name)) for name in cls.bases]
        reached = cls.methods | cls.super_attrs | (cls.self_attrs - cls.methods)
        for attr in sorted(reached):
            if attr.startswith("__"):
                continue  # every class has __init__ and friends: nothing a name check can tell
            for base_name, base in bases:
                member = f"{base_name}.{attr}"
                if member in listed or (base is not None and hasattr(base, attr)) or attr in cls.super_attrs:
                    names.setdefault(member, set()).add(cls.path)
                    break
    return names


@pytest.fixture(scope="module")
def used() -> dict[str, set[str]]:
    return used_verl_names(scan_package(), {entry.name for entry in VERL_SURFACE})


def _unlisted(used: dict[str, set[str]], surface: tuple[VerlName, ...] = VERL_SURFACE) -> list[str]:
    listed = {entry.name for entry in surface}
    return [f"{name} (used in {', '.join(sorted(files))})" for name, files in sorted(used.items())
            if name not in listed]


def _mentions(entry: VerlName, path: str) -> bool:
    """Whether ``path`` names the entry's last component (for what the scan cannot see)."""
    last = entry.name.rsplit(".", 1)[-1]
    return re.search(rf"\b{re.escape(last)}\b", (REPO / path).read_text(encoding="utf-8")) is not None


# ---------------------------------------------------------------------- the list against the package


def test_every_verl_name_the_package_uses_is_listed(used):
    unlisted = _unlisted(used)
    assert not unlisted, ("verl names used but not in karl_verl/integration/verl_surface.py (add each with why):\n  "
                          + "\n  ".join(unlisted))


def test_no_listed_name_is_stale(used):
    stale = [entry.name for entry in VERL_SURFACE if entry.name not in used and entry.name not in UNSCANNED]
    assert not stale, "listed in verl_surface.py but used nowhere any more:\n  " + "\n  ".join(stale)


def test_names_the_scan_cannot_see_are_still_named_where_listed(used):
    listed = {entry.name: entry for entry in VERL_SURFACE}
    assert set(UNSCANNED) <= set(listed), set(UNSCANNED) - set(listed)
    assert not set(UNSCANNED) & set(used), "the scan sees these now: drop them from UNSCANNED"
    gone = [f"{name}: {path} no longer mentions it" for name in UNSCANNED for path in listed[name].used_in
            if not _mentions(listed[name], path)]
    assert not gone, "\n".join(gone)


def test_used_in_names_the_files_that_use_it(used):
    wrong = [f"{entry.name}: used_in {sorted(entry.used_in)}, used in {sorted(used[entry.name])}"
             for entry in VERL_SURFACE if entry.name in used and set(entry.used_in) != used[entry.name]]
    assert not wrong, "\n".join(wrong)


def test_entries_are_well_formed():
    names = [entry.name for entry in VERL_SURFACE]
    assert len(names) == len(set(names)), sorted({name for name in names if names.count(name) > 1})
    for entry in VERL_SURFACE:
        assert entry.module == "verl" or entry.module.startswith("verl."), entry
        assert entry.kind in KINDS, entry
        assert entry.used_in and all((REPO / path).is_file() for path in entry.used_in), entry
        assert entry.why.strip() and entry.why.endswith("."), entry
        assert entry.kind != "module" or entry.attr is None, entry


# ---------------------------------------------------------------------- the check against the installed verl


def test_installed_verl_has_every_listed_name():
    assert verl_in_supported_range(), "the test environment's verl is outside SUPPORTED_VERL"
    assert missing_verl_names() == []


def test_a_name_verl_lacks_is_reported_with_its_error():
    fabricated = (
        VerlName("verl.trainer.ppo.core_algos", "no_such_name", "import", ("x",), "Test."),
        VerlName("verl.trainer.ppo.v1.trainer_sync", "PPOTrainerSync.no_such_hook", "override", ("x",), "Test."),
        VerlName("verl.no_such_module", "thing", "import", ("x",), "Test."),
        VerlName("verl.no_such_module", None, "module", ("x",), "Test."),
        # Read in verl's source, as an entry whose optional engine is not installed.
        VerlName("verl.trainer.ppo.core_algos", "no_such_in_source", "import", ("x",), "Test.",
                 needs="karl_no_such_package"),
    )
    missing = missing_verl_names((*fabricated, VERL_SURFACE[0]))
    assert len(missing) == len(fabricated), missing
    for entry, line in zip(fabricated, missing, strict=True):
        assert line.startswith(f"{entry.name}: "), line
    assert "has no attribute 'no_such_name'" in missing[0]
    assert "PPOTrainerSync has no attribute 'no_such_hook'" in missing[1]
    assert "ModuleNotFoundError" in missing[2]
    assert "no module verl.no_such_module" in missing[3]
    assert "karl_no_such_package is not installed" in missing[4]
    # The same path finds names that are there.
    present = VerlName("verl.trainer.ppo.core_algos", "register_adv_est", "import", ("x",), "Test.",
                       needs="karl_no_such_package")
    (check,) = check_verl_surface([present])
    assert check.error is None and check.in_source


def test_the_scanner_catches_each_way_of_using_verl():
    source = '''
import importlib
import verl.trainer.ppo.core_algos
from verl.workers import config as cfg
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.trainer.ppo.v1 import trainer_base

def f():
    trainer_base.logger.addFilter(None)
    verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage(1)
    cfg.model.hf_tokenizer = None
    setattr(ReplayBuffer, "poll_interval", 1.0)
    getattr(ReplayBuffer, "_karl_marker", False)  # karl-verl's own marker: not a verl name
    sender = ReplayBuffer
    sender.sample = None
    importlib.import_module("verl.utils.seqlen_balancing").get_seqlen_balanced_partitions

class Buffer(ReplayBuffer):
    def _dapo_filtered_keys(self, partition_id):
        return self._select_prompt_uids, super().sample
'''
    scan = scan_source(source)
    names: dict[str, set[str]] = {}
    for use in scan.uses:
        names.setdefault(use.name, set()).add(use.how)
    assert "import" in names["verl.trainer.ppo.core_algos"]
    assert names["verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage"] == {"attribute"}
    assert names["verl.workers.config.model"] == {"attribute"}
    assert names["verl.trainer.ppo.v1.replay_buffer.ReplayBuffer.poll_interval"] == {"patch"}
    assert names["verl.trainer.ppo.v1.replay_buffer.ReplayBuffer.sample"] == {"patch"}
    assert names["verl.utils.seqlen_balancing"] == {"string"}
    assert names["verl.utils.seqlen_balancing.get_seqlen_balanced_partitions"] == {"attribute"}
    assert not any("_karl_marker" in name for name in names)
    (cls,) = scan.subclasses
    assert cls.bases == ["verl.trainer.ppo.v1.replay_buffer.ReplayBuffer"]
    assert cls.methods == {"_dapo_filtered_keys"} and cls.super_attrs == {"sample"}
    used = used_verl_names(scan)
    assert {"verl.trainer.ppo.v1.replay_buffer.ReplayBuffer._dapo_filtered_keys",
            "verl.trainer.ppo.v1.replay_buffer.ReplayBuffer._select_prompt_uids",
            "verl.workers.config.model.hf_tokenizer",  # patched two attributes past the import
            "verl.trainer.ppo.v1.trainer_base.logger"} <= set(used)
    assert not any(name.endswith(".addFilter") for name in used)  # a Logger's method, not verl's
    unlisted = _unlisted(used)
    for name in ("verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage",
                 "verl.utils.seqlen_balancing.get_seqlen_balanced_partitions",
                 "verl.trainer.ppo.v1.replay_buffer.ReplayBuffer.poll_interval"):
        assert any(line.startswith(name + " ") for line in unlisted), (name, unlisted)
    # Already listed: not reported.
    assert not any(line.startswith("verl.trainer.ppo.v1.replay_buffer.ReplayBuffer._dapo_filtered_keys ")
                   for line in unlisted)


def test_dict_methods_of_a_verl_registry_are_not_verl_names():
    scan = scan_source("from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY\n"
                       "ADV_ESTIMATOR_REGISTRY.get('grpo')\n")
    assert set(used_verl_names(scan)) == {"verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY"}


# ---------------------------------------------------------------------- karl-verl info


def _info(capsys) -> tuple[int, str]:
    from karl_verl.commands import info

    rc = info.run(argparse.Namespace(no_recipes=True))
    return rc, capsys.readouterr().out


def test_info_prints_the_surface_and_fails_on_a_missing_name(monkeypatch, capsys):
    rc, out = _info(capsys)
    assert rc == 0, out
    assert f"verl surface ({len(VERL_SURFACE)} names karl-verl uses" in out
    assert f"[ok] all {len(VERL_SURFACE)} present" in out
    assert f"is inside the supported range {SUPPORTED_VERL}" in out

    missing = VerlName("verl.trainer.ppo.core_algos", "no_such_name", "import", ("x",), "Test.")
    monkeypatch.setattr(verl_surface, "VERL_SURFACE", (*VERL_SURFACE, missing))
    rc, out = _info(capsys)
    assert rc == 1
    assert f"verl surface ({len(VERL_SURFACE) + 1} names karl-verl uses" in out
    assert "[MISSING] verl.trainer.ppo.core_algos.no_such_name: verl.trainer.ppo.core_algos has no attribute" in out


# ---------------------------------------------------------------------- the supported range


def _setup_requirements() -> list[Requirement]:
    """setup.py's INSTALL_REQUIRES and EXTRAS_REQUIRE, read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    values = {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Name)
              and target.id in {"INSTALL_REQUIRES", "EXTRAS_REQUIRE"}}
    texts = [*values["INSTALL_REQUIRES"], *(text for extra in values["EXTRAS_REQUIRE"].values() for text in extra)]
    return [Requirement(text) for text in texts]


def test_setup_pins_verl_to_the_supported_range():
    assert "verl" + SUPPORTED_VERL in ast.literal_eval(
        next(node.value for node in ast.parse((REPO / "setup.py").read_text(encoding="utf-8")).body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "INSTALL_REQUIRES"))
    pins = [requirement for requirement in _setup_requirements() if requirement.name == "verl"]
    assert len(pins) == 2  # the install requirement and the gpu extra's verl[vllm]
    assert all(pin.specifier == SpecifierSet(SUPPORTED_VERL) for pin in pins), pins


def test_readme_states_the_range_and_the_count():
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"Supported verl: `{SUPPORTED_VERL}`" in text
    assert f"the {len(VERL_SURFACE)} verl names karl-verl" in text


@pytest.mark.parametrize(("version", "inside"), [
    ("0.9.1", True), ("0.9.3", True), ("0.9.2rc1", True),
    ("0.9.0", False), ("0.10.0.dev0", False), ("0.10.0", False), ("not a version", False),
])
def test_supported_range(version, inside):
    assert verl_in_supported_range(version) is inside
