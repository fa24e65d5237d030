"""Hydra callback that stops a run before Ray starts when a cheap check already shows it cannot work.

Runs in the driver, inside Hydra, before verl's ``main`` (and so before Ray starts): without it a
missing model path surfaces minutes later inside a Ray actor, and wandb without credentials kills
the run once the GPUs are up. The recipes list their required keys
(``hydra.callbacks.karl_required_keys.keys``) and set them to null. The callback reports, in one
message, every problem of:

* required keys left unset;
* data, model, mastery-table, probe-set and reference-response paths that do not exist or cannot be read (a model
  directory without ``config.json``);
* ``karl.*`` / ``algorithm.karl`` values (the checks of :mod:`karl_verl.config`, every section at
  once) and, for the ``karl`` trainer, no way to a first mastery table, and knowledge-infused
  rollouts with verl settings they cannot run with (agent loop, group size) or a reference file the
  trainer would refuse (a bad row, a vision special token in a response), or a teacher
  (``karl.inject.source=teacher``) whose model list does not answer from this machine or, when the
  run joins a Ray cluster, from any of its nodes (each named); with iVGR
  (``karl.ivgr.enable``) a judge whose ``<judge_url>/models`` does not answer within a few seconds, a
  bad template file, or dynamic sampling;
* dynamic sampling (``algorithm.filter_groups``) on a key the ``karl`` reward's breakdown lacks;
* vLLM rollouts without chunked prefill whose ``max_model_len`` exceeds ``max_num_batched_tokens``
  (verl 0.9.1's vLLM server dies at start on it);
* ``wandb`` in ``trainer.logger`` without credentials, unless ``WANDB_MODE`` is offline or disabled;
* fewer local GPUs than ``trainer.n_gpus_per_node`` on a single-node run that starts its own Ray
  (not when a Ray address is given, nor with ``trainer.device=cpu``).

It checks at ``on_run_start``, before Hydra creates its output folder (the recipes put that under
``trainer.default_local_dir``, which may be the unset key).
"""

from __future__ import annotations

import netrc
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from karl_verl.integration.reach import MODELS_CHECK_TIMEOUT_S

#: File inputs a run reads in the driver or its workers: key -> what it is.
FILE_KEYS: dict[str, str] = {
    "data.train_files": "training data",
    "data.val_files": "validation data",
    "karl.mastery.table_path": "mastery table",
    "karl.reward.mastery_path": "mastery table",
    "karl.mastery.probe_data": "probe set",
    "karl.inject.responses_path": "reference responses",
}
MODEL_KEYS: tuple[str, ...] = ("actor_rollout_ref.model.path",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def unset_keys(config: DictConfig, keys: Iterable[str]) -> list[str]:
    """The dotted ``keys`` whose value in ``config`` is absent, null, ``???`` or an empty string."""
    unset = []
    for key in keys:
        value = OmegaConf.select(config, key, default=None, throw_on_missing=False)
        if value is None or (isinstance(value, str) and value.strip() in ("", "???")):
            unset.append(key)
    return unset


def karl_config_problems(config: DictConfig) -> list[str]:
    """What in ``karl.*`` / ``algorithm.karl`` would stop the run once it reads them.

    The checks of the config dataclasses (every section, every value), run early, whenever the run
    uses a KARL part (the ``karl`` trainer, reward manager or estimator); and for the ``karl``
    trainer, :meth:`~karl_verl.config.MasteryConfig.missing_inputs`.
    """
    from karl_verl.config import KarlConfig

    uses_karl_trainer = _select(config, "trainer.v1.trainer_mode") == "karl"
    uses_karl = (uses_karl_trainer or _select(config, "reward.reward_manager.name") == "karl"
                 or _select(config, "algorithm.adv_estimator") == "karl_grpo")
    if not uses_karl:
        return []
    _, mastery, problems = KarlConfig.check_sections(_select(config, "karl"), _select(config, "algorithm.karl"))
    if uses_karl_trainer and mastery is not None and (problem := mastery.missing_inputs()):
        problems.append(problem)
    if uses_karl_trainer:
        problems.extend(inject_problems(config))
    if uses_karl_trainer:
        problems.extend(ivgr_problems(config))
    return problems




def ivgr_problems(config: DictConfig, timeout_s: float = MODELS_CHECK_TIMEOUT_S) -> list[str]:
    """With ``karl.ivgr.enable``: a judge that does not answer, a bad template file, dynamic sampling.

    An unset ``judge_url`` is reported with the other ``karl.*`` problems (:class:`~karl_verl.config.IvgrConfig`).
    """
    from karl_verl.config import LOCAL_JUDGE, ConfigError, IvgrConfig

    try:
        ivgr = IvgrConfig.from_mapping(_select(config, "karl.ivgr"))
    except ConfigError:
        return []  # reported with the other karl.* problems
    if not ivgr.enable:
        return []
    problems = []
    from karl_verl.integration.reach import models_unreachable

    if ivgr.judge_url not in (None, LOCAL_JUDGE) and (why := models_unreachable(ivgr.judge_url, timeout_s)):
        problems.append(f"karl.ivgr.judge_url: the judge does not answer: {why} (start it first; "
                        "`python -m karl_verl.judge serve` runs a local rule judge)")
    if ivgr.templates_path is not None:
        from karl_verl.ivgr import load_templates

        try:
            load_templates(ivgr.templates_path)
        except ValueError as err:
            problems.append(f"karl.ivgr.templates_path: {err}")
    filter_groups = _select(config, "algorithm.filter_groups")
    if filter_groups and filter_groups.get("enable", False):
        problems.append("karl.ivgr.enable: not supported with algorithm.filter_groups.enable=true (dynamic sampling "
                        "drops one stream's group without the other's); turn one of them off")
    return problems


def inject_problems(config: DictConfig) -> list[str]:
    """With ``karl.inject.enable``: the verl settings injection cannot run with (agent loop, group size, ...)
    and a reference file the trainer would refuse (a bad row, a vision special token in a response),
    which it would otherwise find only after Ray and the workers are up."""
    from karl_verl.config import ConfigError, InjectConfig

    try:
        inject = InjectConfig.from_mapping(_select(config, "karl.inject"))
    except ConfigError:
        return []  # reported with the other karl.* problems
    if not inject.enable:
        return []
    from karl_verl.integration.inject import check_trainer_config

    problems = []
    try:
        check_trainer_config(inject, config)
    except ConfigError as err:
        problems.append("; ".join(err.problems))
    problems.extend(teacher_problems(config, inject))
    path = inject.responses_path
    # A path that does not exist is reported by path_problems; the policy's tokenizer is not loaded here,
    # so the file is checked against the Qwen-VL vision tokens (the trainer adds the tokenizer's own).
    if inject.source == "file" and path and not _is_remote(path) and Path(path).expanduser().exists():
        from karl_verl.inject import ReferenceError, load_references

        try:
            load_references(str(Path(path).expanduser()))
        except ReferenceError as err:  # names the file and the row
            problems.append(f"karl.inject.responses_path: {err}")
        except (ValueError, OSError) as err:  # unreadable parquet, text that is not UTF-8
            problems.append(f"karl.inject.responses_path: {path}: cannot read ({type(err).__name__}: {err})")
    return problems


def ray_address(config: DictConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray cluster a run joins (``ray_kwargs.ray_init.address``, else ``RAY_ADDRESS``), or None: its own."""
    environ = os.environ if environ is None else environ
    address = _select(config, "ray_kwargs.ray_init.address") or environ.get("RAY_ADDRESS", "").strip()
    return str(address) if address else None


def teacher_problems(config: DictConfig, inject: Any, environ: Mapping[str, str] | None = None,
                     timeout_s: float = MODELS_CHECK_TIMEOUT_S) -> list[str]:
    """With ``karl.inject.source=teacher``: the teacher's model list not answering here, or from any node
    of the Ray cluster the run joins (:mod:`karl_verl.integration.reach`), each node named.

    A run that starts its own Ray runs on this machine alone, so this machine's answer is every node's.
    """
    url = inject.teacher_url
    if not inject.enable or inject.source != "teacher" or not url:
        return []
    from karl_verl.integration.reach import models_unreachable, nodes_without_reply

    hint = "start it first, or make it reachable from every node (agent-loop workers call it from all of them)"
    if why := models_unreachable(url, timeout_s):
        return [f"karl.inject.teacher_url: the teacher does not answer from this machine: {why} ({hint})"]
    address = ray_address(config, environ)
    if address is None:
        return []
    return [f"karl.inject.teacher_url: the teacher does not answer from {node}: {why} ({hint})"
            for node, why in nodes_without_reply(url, address, timeout_s=timeout_s).items()]


def filter_groups_problem(config: DictConfig) -> str | None:
    """Dynamic sampling with the ``karl`` reward manager on a key its breakdown does not have.

    verl would find out at the first finished group, inside the trainer, after every worker started.
    """
    filter_groups = _select(config, "algorithm.filter_groups")
    if not filter_groups or not filter_groups.get("enable", False):
        return None
    if _select(config, "reward.reward_manager.name") != "karl" or _select(config, "reward.custom_reward_function.path"):
        return None
    from karl_verl.reward import SUCCESS_FIELD, KarlReward

    metric = filter_groups.get("metric", None)
    keys = sorted([*KarlReward()(None, "", "", {}), "reward_error"])
    if metric == "reward" or metric in keys:
        return None
    return (f"algorithm.filter_groups.metric: {metric!r} is not in the karl reward's breakdown; use "
            f"{SUCCESS_FIELD} (groups that all succeed or all fail carry no GRPO signal) or one of {', '.join(keys)}")


def trainer_mode_problem(config: DictConfig) -> str | None:
    """A config that asks for the ``karl`` trainer's work while ``trainer.v1.trainer_mode`` selects another trainer.

    verl then runs its own trainer (``sync``, ``colocate_async``, ``separate_async``) without a word:
    ``karl_grpo`` gets no mastery levels (every sample weighted as the default level), and the
    refresh, curriculum and injection never run. Plain GRPO with the karl reward
    (``karl_kvg_grpo``: verl's ``grpo``, refresh off) is a valid run on verl's ``sync`` trainer.
    """
    mode = _select(config, "trainer.v1.trainer_mode")
    karl = _select(config, "karl")
    if mode in (None, "karl") or karl is None:
        return None

    def number(key: str) -> float:
        value = _select(config, key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    asks = []
    if _select(config, "algorithm.adv_estimator") == "karl_grpo":
        asks.append("algorithm.adv_estimator=karl_grpo (its mastery levels come from the karl trainer)")
    if number("karl.mastery.refresh_every_epochs") > 0 or number("karl.mastery.refresh_every_steps") > 0:
        asks.append("a mastery refresh (karl.mastery.refresh_every_epochs / refresh_every_steps > 0)")
    for section in ("curriculum", "inject"):
        if _select(config, f"karl.{section}.enable") is True:
            asks.append(f"karl.{section}.enable=true")
    if not asks:
        return None
    return (f"trainer.v1.trainer_mode={mode}: verl's own {mode!r} trainer would run and silently skip what this "
            f"config asks of the karl trainer: {'; '.join(asks)}. The karl trainer is synchronous: use "
            "trainer.v1.trainer_mode=karl (the karl recipes set it), or turn those off for a plain GRPO run "
            "(+recipe=karl_kvg_grpo)")


def _max_position_embeddings(model_path: Any) -> int | None:
    """``max_position_embeddings`` of a local Hugging Face model (its text config's for a VLM), else None."""
    import json

    paths = _paths(model_path)
    if len(paths) != 1 or _is_remote(paths[0]):
        return None
    try:
        config = json.loads((Path(paths[0]).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings", (config.get("text_config") or {}).get("max_position_embeddings"))
    return int(value) if isinstance(value, (int, float)) else None


def vllm_batched_tokens_problem(config: DictConfig) -> str | None:
    """vLLM rollouts with ``enable_chunked_prefill=false`` and ``max_model_len`` above ``max_num_batched_tokens``.

    verl 0.9.1's vLLM server then raises ``max_num_batched_tokens`` to ``max_model_len`` by assigning
    a field of its frozen ``RolloutConfig`` (``vllm_async_server.py``, ``_validate_configs``): the run
    dies with ``FrozenInstanceError`` when the rollout servers start, after every worker loaded the
    model. An unset ``max_model_len`` becomes the model's ``max_position_embeddings`` (262144 for
    Qwen3-VL), which trips it. Not specific to CPUs: ``karl_kvg`` sets both keys.
    """
    rollout = _select(config, "actor_rollout_ref.rollout")
    if not rollout or rollout.get("name") != "vllm" or rollout.get("enable_chunked_prefill", True) is not False:
        return None
    batched = rollout.get("max_num_batched_tokens")
    model_len = rollout.get("max_model_len")
    source = "actor_rollout_ref.rollout.max_model_len"
    if model_len is None:
        model_len = _max_position_embeddings(_select(config, "actor_rollout_ref.model.path"))
        source = f"the model's max_position_embeddings ({source} unset)"
        if model_len is None:
            return ("actor_rollout_ref.rollout.max_model_len: unset, with enable_chunked_prefill=false: verl's vLLM "
                    "server would take the model's max_position_embeddings and, when that exceeds "
                    f"max_num_batched_tokens ({batched}), die at start (FrozenInstanceError); set max_model_len "
                    "to at most max_num_batched_tokens and at least data.max_prompt_length + max_response_length")
    if not isinstance(batched, int) or not isinstance(model_len, int) or model_len <= batched:
        return None
    return (f"actor_rollout_ref.rollout.max_num_batched_tokens={batched} is below {source} ({model_len}) with "
            "enable_chunked_prefill=false: verl 0.9.1's vLLM server dies at start (FrozenInstanceError when it "
            "raises max_num_batched_tokens); set max_model_len <= max_num_batched_tokens (prompt + response must "
            "fit), or raise max_num_batched_tokens")


#: The example command of the stop message, unless the recipe gives its own (``example``).
MAIN_PPO_EXAMPLE = (
    "python -m verl.trainer.main_ppo +recipe=karl_kvg data.train_files=/data/train.parquet "
    "data.val_files=/data/val.parquet actor_rollout_ref.model.path=/models/Qwen3-VL-8B-Instruct "
    "trainer.default_local_dir=/ckpt/karl_kvg karl.mastery.probe_data=/data/probe.parquet"
)


def _select(config: DictConfig, key: str) -> Any:
    return OmegaConf.select(config, key, default=None, throw_on_missing=False)


def _paths(value: Any) -> list[str]:
    """The paths a key holds; empty ones are left to the unset-key and config checks."""
    values = value if isinstance(value, (list, tuple, ListConfig)) else [value]
    return [str(v) for v in values if v is not None and str(v).strip() not in ("", "???")]


def _is_remote(path: str) -> bool:
    return bool(urlparse(path).scheme) and "://" in path


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read, or None."""
    if not path.exists():
        return "does not exist"
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        return "is not readable"
    return None


def path_problems(config: DictConfig) -> list[str]:
    """Input paths that do not exist or cannot be read; remote URLs and Hub model ids are left alone."""
    problems = []
    for key, what in FILE_KEYS.items():
        for path in _paths(_select(config, key)):
            if not _is_remote(path) and (why := _unreadable(Path(path).expanduser())):
                problems.append(f"{key}: {what} {path} {why}")
    for key in MODEL_KEYS:
        for path in _paths(_select(config, key)):
            local = Path(path).expanduser()
            if _is_remote(path) or (not local.exists() and _HUB_ID.match(path)):
                continue  # verl downloads those itself
            if why := _unreadable(local):
                problems.append(f"{key}: model {path} {why}")
            elif not local.is_dir() or not (local / "config.json").is_file():
                problems.append(f"{key}: {path} is not a Hugging Face model directory (no config.json in it)")
    return problems


#: Read or written on every node of a multi-node run, besides the inputs of FILE_KEYS and MODEL_KEYS.
SHARED_OUTPUT_KEYS: dict[str, str] = {"trainer.default_local_dir": "checkpoints (every rank writes its shard)"}


def shared_filesystem_notice(config: DictConfig) -> str | None:
    """With ``trainer.nnodes > 1``: the local paths every node must see at the same place, or None.

    Each FSDP rank writes its checkpoint shard and reads it back on resume; the reward workers, spread
    over the nodes, read the mastery table when a sample carries no level; the trainer's probe reads
    the probe set; every rank and rollout server loads the model. A path that exists only on the head
    node fails on the others, or silently gives each node its own checkpoint.
    """
    nodes = _select(config, "trainer.nnodes")
    if nodes is None or int(nodes) <= 1:
        return None
    keys = {**FILE_KEYS, **{key: "model" for key in MODEL_KEYS}, **SHARED_OUTPUT_KEYS}
    local = [f"  {key}: {path} ({what})" for key, what in keys.items()
             for path in _paths(_select(config, key)) if not _is_remote(path)]
    if not local:
        return None
    return (f"karl-verl: trainer.nnodes={int(nodes)}: these paths must be on a filesystem every node mounts at "
            "the same place (or be remote URLs):\n" + "\n".join(local))


def _loggers(config: DictConfig) -> list[str]:
    value = _select(config, "trainer.logger")
    return [str(value)] if isinstance(value, str) else [str(v) for v in value or []]


def wandb_has_credentials(environ: Mapping[str, str]) -> bool:
    """An API key in the environment, or a ``wandb login`` entry in the netrc file wandb reads."""
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = Path(environ.get("NETRC", Path(environ.get("HOME", "~")).expanduser() / ".netrc"))
    try:
        return netrc.netrc(str(netrc_path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_problem(config: DictConfig, environ: Mapping[str, str]) -> str | None:
    if "wandb" not in _loggers(config):
        return None
    if environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled", "dryrun"):
        return None
    if wandb_has_credentials(environ):
        return None
    return ("trainer.logger: includes wandb, but wandb has no credentials (no WANDB_API_KEY, no `wandb login`); "
            "run `wandb login` (or export WANDB_API_KEY=...), or log without it: trainer.logger=[console] "
            "or WANDB_MODE=offline")


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_problem(config: DictConfig, environ: Mapping[str, str], count_gpus: Any = local_gpu_count) -> str | None:
    """Too few local GPUs for a single-node run that starts its own Ray (None when not checkable)."""
    if str(_select(config, "trainer.device") or "cuda") == "cpu":
        return None
    if _select(config, "actor_rollout_ref") is None:
        return None  # not a main_ppo run: verl's SFT trainer is launched by torchrun, which places its ranks
    if ray_address(config, environ):
        return None  # an existing cluster: its GPUs are not this machine's
    nnodes, wanted = _select(config, "trainer.nnodes"), _select(config, "trainer.n_gpus_per_node")
    if nnodes != 1 or not isinstance(wanted, int) or isinstance(wanted, bool):
        return None
    available = count_gpus()
    if available >= wanted:
        return None
    return (f"trainer.n_gpus_per_node: {wanted} GPUs asked for, {available} visible on this machine; "
            f"set trainer.n_gpus_per_node={available}" if available else
            f"trainer.n_gpus_per_node: {wanted} GPUs asked for, none visible on this machine (CUDA_VISIBLE_DEVICES, "
            "drivers); run on a GPU node, or give an existing Ray cluster with RAY_ADDRESS")


def run_problems(config: DictConfig, required: Iterable[str], environ: Mapping[str, str] | None = None,
                 count_gpus: Any = local_gpu_count) -> tuple[list[str], list[str]]:
    """(unset required keys, other problems) of a composed run configuration."""
    environ = os.environ if environ is None else environ
    problems = path_problems(config) + karl_config_problems(config)
    problems += [p for p in (filter_groups_problem(config), trainer_mode_problem(config),
                             vllm_batched_tokens_problem(config)) if p]
    problems += [p for p in (wandb_problem(config, environ), gpu_problem(config, environ, count_gpus)) if p]
    return unset_keys(config, required), problems


def format_problems(unset: list[str], problems: list[str], example: str | None = None) -> str:
    lines = []
    if unset:
        listing = "\n".join(f"  {key}=..." for key in unset)
        lines.append(f"karl-verl: this recipe needs these keys set on the command line:\n{listing}\n"
                     f"e.g. {example or MAIN_PPO_EXAMPLE}")
    if problems:
        lines.append(f"karl-verl: {len(problems)} problem(s) would stop this run later, after its workers start:\n"
                     + "\n".join(f"  {p}" for p in problems))
    return "\n".join(lines)


class RequiredKeysCallback(Callback):
    def __init__(self, keys: Iterable[str] = (), example: str | None = None) -> None:
        self.keys = list(keys)
        self.example = example
        self._checked = False

    def _check(self, config: DictConfig) -> None:
        if self._checked:
            return
        self._checked = True
        unset, problems = run_problems(config, self.keys)
        if unset or problems:
            # SystemExit, not an exception: Hydra logs and swallows exceptions raised by callbacks.
            raise SystemExit(format_problems(unset, problems, self.example))
        if notice := shared_filesystem_notice(config):
            print(notice, file=sys.stderr, flush=True)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Multirun jobs (and callers that only send job events) are checked here.
        self._check(config)
