"""``karl-verl info``: versions, and whether every karl-verl part is registered in verl.

verl swallows plugin load errors at DEBUG level, so a broken install is otherwise silent: this
command imports verl exactly as a training process does (which loads the ``verl.plugins`` entry
point), then reads verl's registries and Hydra's config search path. Runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

HELP = "show versions and check that karl-verl is registered in verl (exit 1 if not)"

RECIPES = ("karl_kvg", "karl_kvg_grpo", "karl_kvg_no_pos", "karl_kvg_no_neg", "karl_kvg_v1", "karl_kvg_v2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-recipes", action="store_true", help="skip the Hydra recipe check")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


ENTRY_POINT_GROUP, ENTRY_POINT_NAME = "verl.plugins", "karl"


def entry_point_status(policy: str) -> tuple[str, bool]:
    """(description, whether verl's own import will load karl-verl in every process)."""
    points = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT_NAME]
    if not points:
        return f"no entry point {ENTRY_POINT_NAME!r} in group {ENTRY_POINT_GROUP!r} (karl-verl not installed?)", False
    try:
        points[0].load()()
    except Exception as err:  # noqa: BLE001 - verl would swallow this; we surface it
        return f"entry point {points[0].value} fails to load: {err!r}", False
    policy = policy.strip().lower()
    if policy == "none" or (policy != "auto" and ENTRY_POINT_NAME not in {p.strip() for p in policy.split(",")}):
        return f"VERL_USE_EXTERNAL_PLUGINS={policy!r} stops verl from loading {points[0].value}", False
    return f"{ENTRY_POINT_GROUP}:{ENTRY_POINT_NAME} -> {points[0].value}", True


def recipe_status() -> list[tuple[str, bool]]:
    """(recipe, visible to Hydra through the search-path plugin) for every shipped recipe."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    search_path: ConfigSearchPath = create_config_search_path(None)
    assert isinstance(search_path, ConfigSearchPathImpl)
    for plugin in Plugins.instance().discover(SearchPathPlugin):
        plugin().manipulate_search_path(search_path)
    repository = ConfigLoaderImpl(config_search_path=search_path).repository
    available = set(repository.get_group_options("recipe"))
    return [(name, name in available) for name in RECIPES]


def run(args: argparse.Namespace) -> int:
    policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto")
    try:
        import verl  # noqa: F401  (loads the verl.plugins entry points, as every verl process does)
    except Exception as err:  # noqa: BLE001 - a broken install is what this command reports
        print(f"karl-verl info: verl cannot be imported here ({type(err).__name__}: {err}); install karl-verl with "
              "its dependencies (pip install . in a checkout) in this environment", file=sys.stderr)
        return 1

    from karl_verl.gpu_stack import GPU_EXTRA, choose_attention, stack_report
    from karl_verl.integration import registration_status

    print("karl-verl info")
    for name in ("karl-verl", "verl", "torch", "transformers", "hydra-core", "ray"):
        print(f"  {name:<14} {_version(name)}")
    print(f"  VERL_USE_EXTERNAL_PLUGINS={policy}")
    entry_point, ok = entry_point_status(policy)
    print(f"plugin entry point:\n  [{'ok' if ok else 'MISSING'}] {entry_point}")
    print("registered in verl:")
    for registry, name, registered in registration_status():
        ok &= registered
        print(f"  [{'ok' if registered else 'MISSING'}] {name!r:<12} {registry}")
    # verl's surface: every verl name karl-verl relies on, and the supported verl range.
    from karl_verl.integration.verl_surface import surface_report

    surface_lines, surface_ok = surface_report()
    print("\n".join(surface_lines))
    ok &= surface_ok
    if not args.no_recipes:
        print("Hydra recipes (+recipe=NAME):")
        try:
            recipes = recipe_status()
        except Exception as err:  # noqa: BLE001 - Hydra's plugin scan failing is itself the finding
            recipes = [(f"{name} (Hydra's search path cannot be read: {type(err).__name__}: {err})", False)
                       for name in RECIPES]
        for recipe, visible in recipes:
            ok &= visible
            print(f"  [{'ok' if visible else 'MISSING'}] {recipe}")
    print(f"GPU stack (against the pins of verl {_version('verl')}'s GPU extras, {GPU_EXTRA} and fsdp; informational):")
    for check in stack_report():
        print(f"  [{'ok' if check.matches else '--'}] {check.describe()}")
    attention = choose_attention("auto")
    print(f"actor attention of a karl_kvg run here (karl.runtime.attention=auto):\n  {attention.describe()}")
    from karl_verl.cpu.vllm_cpu import vllm_rollout_status

    usable, detail = vllm_rollout_status()  # optional: a GPU node has its own vLLM, the default CPU run none
    print(f"vLLM rollout on CPU (rollout.name=vllm, optional):\n  [{'ok' if usable else 'no'}] {detail}")
    print("all parts registered" if ok else "some parts are MISSING: see above (is karl-verl installed in this env?)")
    return 0 if ok else 1
