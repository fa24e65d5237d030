"""Shared test setup: the oracle and corpus helpers in tests/_support are importable by name, and
under pytest-xdist (pyproject's addopts) the tests that run verl's ``main_ppo`` share one worker."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "_support"))


#: Tests that run verl's ``main_ppo`` (tests/dryrun/conftest.py holds the runs its tests share).
MAIN_PPO_TESTS = ("tests/dryrun/", "tests/experiment/test_quick.py", "tests/integration/test_ivgr_main_ppo.py",
                  "tests/gpu/")
#: Tests under tests/dryrun/ that start no ``main_ppo`` (Hydra compositions, a few warm-up steps): they go with
#: the quick tests, not onto the ``main_ppo`` worker, whose chain is the suite's longest.
NO_MAIN_PPO_TESTS = ("tests/dryrun/test_gpu_mode.py",)
#: pytest-timeout's limit of a main_ppo test, its shared runs included (pyproject's 900 s for the others).
MAIN_PPO_TIMEOUT_S = 1800
#: Tests whose runs use verl's vLLM rollout (the ``.venv-vllm`` environment; one module-scoped set of runs).
VLLM_TESTS = ("tests/cpu/test_vllm_rollout.py",)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under pytest-xdist (pyproject's ``-n auto``) every ``main_ppo`` test goes to one worker, and the
    vLLM tests, which share one set of runs, to one worker.

    They run Ray and several processes that use both cores while a step computes: two at once on a
    2-core machine each take twice as long, and a shared run (a session fixture) would run once per
    worker. One worker takes them one after another while the others work through the quick tests,
    many of them subprocesses that import verl (about 8 s each). xdist's own ``--dist loadgroup``
    does not group under pytest 9.2 (it renames ``item._nodeid``, which pytest no longer reads).
    """
    from xdist.scheduler import LoadScopeScheduling

    # xdist >= 3.7 sorts scopes by size (``--loadscope-reorder``, on by default): the six vLLM tests
    # would then start at once, beside the main_ppo chain, and both run at half speed.
    config.option.loadscopereorder = False

    class MainPpoTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(MAIN_PPO_TESTS) and not nodeid.startswith(NO_MAIN_PPO_TESTS):
                return "main_ppo"
            return "vllm" if nodeid.startswith(VLLM_TESTS) else nodeid

    return MainPpoTogether(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ``main_ppo`` tests first: they are the longest chain, so their worker starts on them at once.
    The vLLM tests last: the other worker reaches them once the quick tests are done, while the
    ``main_ppo`` chain still runs (on 2 cores the quick tests end about 7 minutes before it)."""
    heavy = [item for item in items
             if item.nodeid.startswith(MAIN_PPO_TESTS) and not item.nodeid.startswith(NO_MAIN_PPO_TESTS)]
    last = [item for item in items if item.nodeid.startswith(VLLM_TESTS)]
    for item in heavy:
        # A test's limit covers the session fixtures it sets up first (a dry run, then three curriculum runs):
        # 756 s of them under a fresh-clone CI's load, too close to pyproject's 900.
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(MAIN_PPO_TIMEOUT_S))
    chosen = {id(item) for item in heavy + last}
    items[:] = heavy + [item for item in items if id(item) not in chosen] + last


#: Packages whose presence changes what karl-verl does (the attention choice, the verl surface check,
#: the vLLM status); tests write fakes of them under tmp_path.
PROBED_PACKAGES = ("vllm", "flash_attn")


@pytest.fixture(autouse=True)
def _no_fake_package_outlives_its_test():
    """A fake ``vllm`` or ``flash_attn`` a test imported from its tmp_path and left in ``sys.modules``
    makes every later test in that worker see it installed: which tests then fail depends on xdist's
    split (a fresh-clone CI run saw the verl surface check fail this way)."""
    before = {name: sys.modules.get(name) for name in PROBED_PACKAGES}
    yield
    left = [name for name in PROBED_PACKAGES if sys.modules.get(name) is not before[name]
            and sys.modules.get(name) is not None]
    for name in left:
        sys.modules.pop(name)
    assert not left, f"the test left its own {left} in sys.modules"
