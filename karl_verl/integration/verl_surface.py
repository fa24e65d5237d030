"""verl's surface as karl-verl sees it: every verl name the package imports, subclasses, overrides, calls,
patches or registers into, each with why karl-verl needs it, and a check that the installed verl has them.

What runs where: importing this module does nothing but build the table (no verl, no torch). The check
(:func:`check_verl_surface`, :func:`missing_verl_names`) imports the verl modules named here, in the
calling process: ``karl-verl info`` runs it on any machine, CPU included, in seconds. A module that needs
an optional engine this machine lacks (``needs``, e.g. vLLM on a CPU machine, whose absence makes verl's
``vllm_rollout`` package raise at import) is checked in verl's source instead of imported; a ``module``
entry is looked up (``find_spec``), not executed.

``tests/integration/test_verl_surface.py`` scans the package and fails on a verl name used here but not
listed, and on an entry nothing uses any more. Names are Python names only: verl config keys,
environment variables (``VERL_USE_EXTERNAL_MODULES``, ``VERL_PLATFORM``, ...) and attributes verl sets
on instances (``self.config``, ``buffer.refill_fn``) are outside it, as no import can check them.

Kinds:

* ``import``: imported and used as verl defines it (called, read, or given to verl);
* ``subclass``: a karl-verl class derives from it;
* ``override``: a method karl-verl's subclass replaces; verl must still call it by that name;
* ``call``: a method or attribute of a verl class karl-verl calls or reads (inherited or on verl's object);
* ``patch``: karl-verl replaces it on verl's module or class at run time;
* ``registry``: a verl registry karl-verl adds its parts to, or the function that adds them;
* ``module``: a module named by its dotted path: run with ``python -m``, awaited by an import hook,
  or a logger name.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The verl versions karl-verl supports; setup.py's ``verl`` requirement carries the same specifier
#: (a test holds them equal: setup.py cannot import the package it installs).
SUPPORTED_VERL = ">=0.9.1,<0.10"

KINDS = ("import", "subclass", "override", "call", "patch", "registry", "module")


@dataclass(frozen=True)
class VerlName:
    """One verl name karl-verl relies on."""

    #: The verl module, dotted.
    module: str
    #: The attribute in it, dotted for a class member (``PPOTrainerSync._step_once``); None: the module itself.
    attr: str | None
    #: One of :data:`KINDS`.
    kind: str
    #: The karl-verl files that use it, relative to the repository root.
    used_in: tuple[str, ...]
    #: Why karl-verl needs it (not what it is).
    why: str
    #: A package the module needs to be imported at all; absent here, the name is checked in verl's source.
    needs: str | None = None

    @property
    def name(self) -> str:
        return self.module if self.attr is None else f"{self.module}.{self.attr}"


# Short names for the files, so the table below stays one entry a line or two.
_INIT = "karl_verl/integration/__init__.py"
_TRAINER = "karl_verl/integration/trainer.py"
_DYN = "karl_verl/integration/dynamic_sampling.py"
_DYN_FEATURE = "karl_verl/integration/features/dynamic_sampling.py"
_REWARD = "karl_verl/integration/reward_manager.py"
_ESTIMATOR = "karl_verl/integration/estimator.py"
_AGENT = "karl_verl/integration/inject_agent_loop.py"
_LOSS = "karl_verl/integration/inject_loss.py"
_INJECT = "karl_verl/integration/inject.py"
_PROBE = "karl_verl/integration/rollout_probe.py"
_FREEZE = "karl_verl/integration/vision_freeze.py"
_CPU_PLATFORM = "karl_verl/cpu/platform.py"
_CPU_ROLLOUT = "karl_verl/cpu/rollout.py"
_CPU_PATCHES = "karl_verl/cpu/patches.py"

_V1 = "verl.trainer.ppo.v1"
_SYNC = "verl.trainer.ppo.v1.trainer_sync"
_BUFFER = "verl.trainer.ppo.v1.replay_buffer"
_AGENT_LOOP = "verl.experimental.agent_loop.agent_loop"
_PLATFORM_BASE = "verl.plugin.platform.platform_base"
_REPLICA = "verl.workers.rollout.replica"
_WEIGHTS = "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer"


def _trainer_hook(method: str, why: str, kind: str = "override") -> VerlName:
    return VerlName(_SYNC, f"PPOTrainerSync.{method}", kind, (_TRAINER,), why)


def _buffer_hook(method: str, why: str) -> VerlName:
    return VerlName(_BUFFER, f"ReplayBuffer.{method}", "override", (_DYN,), why)


#: The methods of verl's platform interface the CPU platform implements (one reason for them all).
_PLATFORM_METHODS = (
    "communication_backend_name", "cudart", "current_device", "device_count", "device_module", "device_name",
    "empty_cache", "get_device_capability", "is_available", "is_ipc_supported", "is_platform_available",
    "manual_seed", "manual_seed_all", "nvtx_range", "profiler_start", "profiler_stop", "ray_noset_envvars",
    "ray_resource_name", "set_allocator_settings", "set_device", "synchronize", "vendor_name",
    "visible_devices_envvar",
)

VERL_SURFACE: tuple[VerlName, ...] = (
    # ---------------------------------------------------------------- verl itself and plugin loading
    VerlName("verl", None, "import", ("karl_verl/commands/info.py", "karl_verl/cpu/__init__.py",
                                      "karl_verl/dryrun/pipeline.py"),
             "Importing it loads the verl.plugins entry point (info, CPU layer) and locates its Hydra configs."),
    VerlName("verl", "DataProto", "import", (_REWARD,), "The reward loop hands each response to run_single as one."),
    VerlName("verl.plugin.platform.platform_manager", None, "module", ("karl_verl/cli.py",),
             "The CLI filters this logger's accelerator-fallback notice on CPU machines."),
    # ---------------------------------------------------------------- registration hosts (import hooks)
    VerlName("verl.experimental.reward_loop.reward_manager", None, "module", (_INIT,),
             "Its import is when the karl reward manager registers."),
    VerlName("verl.trainer.ppo.core_algos", None, "module", (_INIT,), "Its import is when karl_grpo registers."),
    VerlName(_V1, None, "module", (_INIT,), "Its import is when the karl trainer registers."),
    VerlName("verl.experimental.agent_loop", None, "module", (_INIT,),
             "Its import is when the karl_inject_agent agent loop registers."),
    # ---------------------------------------------------------------- reward manager ``karl``
    VerlName("verl.experimental.reward_loop.reward_manager", "register", "registry", (_REWARD,),
             "Registers the karl reward manager that reward.reward_manager.name=karl selects."),
    VerlName("verl.experimental.reward_loop.reward_manager.registry", "REWARD_MANAGER", "registry", (_REWARD,),
             "karl-verl info reads it to confirm the karl reward manager is registered."),
    VerlName("verl.experimental.reward_loop.reward_manager.base", "RewardManagerBase", "subclass", (_REWARD,),
             "KarlRewardManager derives from it to be constructed and called by verl's reward loop."),
    VerlName("verl.experimental.reward_loop.reward_manager.base", "RewardManagerBase.run_single", "override",
             (_REWARD,), "verl's reward loop calls it once per response: the KA-IoU reward is computed there."),
    # ---------------------------------------------------------------- advantage estimator ``karl_grpo``
    VerlName("verl.trainer.ppo.core_algos", "register_adv_est", "registry", (_ESTIMATOR,),
             "Registers karl_grpo so algorithm.adv_estimator=karl_grpo is accepted."),
    VerlName("verl.trainer.ppo.core_algos", "ADV_ESTIMATOR_REGISTRY", "registry", (_ESTIMATOR,),
             "karl-verl info reads it to confirm karl_grpo is registered."),
    VerlName("verl.trainer.ppo.core_algos", "agg_loss", "import", (_LOSS,),
             "The injected rows' shaped loss is aggregated exactly as verl aggregates the PPO term."),
    # ---------------------------------------------------------------- trainer ``karl``
    VerlName("verl.trainer.ppo.v1.trainer_base", "register_trainer", "registry", (_TRAINER,),
             "Registers KarlTrainer so trainer.v1.trainer_mode=karl selects it."),
    VerlName("verl.trainer.ppo.v1.trainer_base", "TRAINER_REGISTRY", "registry", (_TRAINER,),
             "karl-verl info reads it to confirm the karl trainer is registered."),
    VerlName("verl.trainer.ppo.v1.trainer_base", None, "import", (_DYN_FEATURE,),
             "Its logger is filtered while the replay buffer is built (see logger)."),
    VerlName("verl.trainer.ppo.v1.trainer_base", "logger", "call", (_DYN_FEATURE,),
             "Dynamic sampling holds back its 'max_num_gen_batches is ignored' warning when karl honours it."),
    VerlName(_SYNC, "PPOTrainerSync", "subclass", (_TRAINER,),
             "KarlTrainer is verl's sync v1 trainer plus KARL's hooks, and forces trainer_mode='sync'."),
    _trainer_hook("_setup", "Features start once verl's workers are set up."),
    _trainer_hook("_init_dataloader", "The curriculum replaces verl's train loader right after it is built."),
    _trainer_hook("_build_replay_buffer", "Dynamic sampling swaps in its replay buffer (KarlReplayBuffer)."),
    _trainer_hook("on_train_begin", "The mastery table is loaded or probed before the first step."),
    _trainer_hook("on_step_begin", "Features see each step start (refresh schedule, curriculum)."),
    _trainer_hook("on_step_end", "The mastery refresh runs at a step boundary, with rollout servers awake."),
    _trainer_hook("_step_once", "Scales the prompts one step asks for by the rows each prompt becomes (iVGR)."),
    _trainer_hook("_fetch_one_gen_batch", "Each prompt is tagged with its mastery level before rollout."),
    _trainer_hook("_add_prompts_to_generate", "Refilled prompts are tagged and counted per level."),
    _trainer_hook("_validate", "Validation prompts are tagged with levels like training prompts."),
    _trainer_hook("_compute_old_log_prob", "Injected rows get the actor's log-probs as rollout log-probs."),
    _trainer_hook("_compute_advantage", "karl_grpo needs each sample's mastery level, which verl does not pass."),
    _trainer_hook("_compute_metrics", "Adds the karl/* metrics to verl's step metrics."),
    _trainer_hook("_save_checkpoint", "The mastery and curriculum state are saved into each checkpoint."),
    _trainer_hook("_load_checkpoint", "The mastery and curriculum state are restored on resume."),
    _trainer_hook("_next_train_batch", "Refills fetch prompts with verl's own batching.", kind="call"),
    _trainer_hook("_submit_batch_to_rollout", "Refilled prompts go to rollout the way verl sends them.",
                  kind="call"),
    VerlName(_SYNC, "PPOTrainerSync.get_llm_client", "call", (_PROBE,),
             "The in-training probe talks to verl's own rollout servers through this client."),
    VerlName("verl.trainer.ppo.ray_trainer", "apply_kl_penalty", "import", (_TRAINER,),
             "karl_grpo's advantage step repeats verl's step 1 (KL in reward) unchanged."),
    VerlName("verl.trainer.ppo.rollout_corr_helper", "compute_rollout_correction_and_add_to_batch", "import",
             (_TRAINER,), "karl_grpo's advantage step repeats verl's step 2 (rollout correction) unchanged."),
    VerlName("verl.protocol", "DataProto", "import", (_INJECT, _TRAINER),
             "verl's advantage and debug-metric helpers take and return it."),
    VerlName("verl.protocol", "DataProto.from_dict", "call", (_INJECT,),
             "Builds the batch for verl's rollout-vs-actor diagnostics over sampled rows."),
    VerlName("verl.workers.utils.padding", "response_to_nested", "import", (_INJECT, _TRAINER),
             "Advantages and log-probs go back to TransferQueue in verl's nested layout."),
    # ---------------------------------------------------------------- replay buffer (dynamic sampling)
    VerlName(_BUFFER, "ReplayBuffer", "subclass", (_CPU_PATCHES, _DYN, _DYN_FEATURE, _TRAINER),
             "Dynamic sampling specialises verl's own buffer instance to count drops and bound refills."),
    VerlName(_BUFFER, "FILTER_GROUPS_REWARD_METRIC", "import", (_DYN,),
             "The filter metric that means 'the reward' must be read as verl reads it."),
    _buffer_hook("sample", "Resets the per-step generation budget before verl samples a batch."),
    _buffer_hook("_dapo_filtered_keys", "Stops filtering once a step's generation budget is spent."),
    _buffer_hook("_select_prompt_uids", "Puts groups with a learning signal first once filtering stopped."),
    _buffer_hook("_evict_terminal_groups", "Records the level of each group the filter drops."),
    VerlName(_BUFFER, "ReplayBuffer.__init__", "patch", (_CPU_PATCHES,),
             "CPU runs shorten its 2-s poll interval, which otherwise dominates a CPU step."),
    # ---------------------------------------------------------------- agent loop ``karl_inject_agent``
    VerlName(_AGENT_LOOP, "register", "registry", (_AGENT,),
             "Registers karl_inject_agent so the inject recipe's agent loop name resolves."),
    VerlName(_AGENT_LOOP, "_agent_loop_registry", "registry", (_AGENT,),
             "karl-verl info reads it to confirm karl_inject_agent is registered (verl exposes no getter)."),
    VerlName(_AGENT_LOOP, "AgentLoopOutput", "subclass", (_AGENT,),
             "InjectedOutput adds the per-row karl_injected flag that reaches the actor's loss."),
    VerlName(_AGENT_LOOP, "AgentLoopOutput.as_dict", "override", (_AGENT,),
             "The flag must be in the dict verl writes to TransferQueue."),
    VerlName("verl.experimental.agent_loop.single_turn_agent_loop", "SingleTurnAgentLoop", "subclass", (_AGENT,),
             "Injected sessions reuse verl's single-turn loop (prompt tokens, merge, truncation)."),
    VerlName("verl.experimental.agent_loop.single_turn_agent_loop", "SingleTurnAgentLoop.run", "override", (_AGENT,),
             "Each session decides there between a sampled and an injected response."),
    VerlName(_REPLICA, "TokenOutput", "import", (_CPU_ROLLOUT, _AGENT),
             "The stand-in server and the CPU rollout answer generate() in verl's token-out format."),
    # ---------------------------------------------------------------- in-training probe
    VerlName(_AGENT_LOOP, "AgentLoopBase", "subclass", (_PROBE,),
             "The probe builds prompts with the same machinery as training rollouts."),
    VerlName(_AGENT_LOOP, "AgentLoopBase.run", "override", (_PROBE,),
             "Abstract in verl: the prompt builder must define it to be instantiated."),
    VerlName(_AGENT_LOOP, "AgentLoopBase.process_multi_modal_info", "call", (_PROBE,),
             "Probe questions get their images processed as training prompts do."),
    VerlName(_AGENT_LOOP, "AgentLoopBase.ct_build_initial_tokens", "call", (_PROBE,),
             "Probe questions get their prompt token ids as training prompts do."),
    VerlName(_AGENT_LOOP, "AgentLoopBase._get_mm_processor_kwargs", "call", (_PROBE,),
             "Probe requests send the same processor arguments as training requests."),
    VerlName(_AGENT_LOOP, "DictConfigWrap", "import", (_PROBE,), "AgentLoopBase takes its configs wrapped in it."),
    VerlName("verl.utils.dataset.rl_dataset", "get_dataset_class", "import", (_PROBE,),
             "The probe uses the run's dataset class (data.custom_cls) for images, as training does."),
    VerlName("verl.utils.config", "omega_conf_to_dataclass", "import",
             ("karl_verl/integration/features/injection.py", _PROBE),
             "The actor and model configs are read as the typed configs verl's own code gets."),
    # ---------------------------------------------------------------- injection (actor loss, tagging)
    VerlName("verl.workers.utils.losses", "ppo_loss", "import", (_LOSS,),
             "Injected runs wrap verl's PPO loss, which stays bitwise verl's on sampled rows."),
    VerlName("verl.workers.utils.padding", "no_padding_2_padding", "import", (_LOSS,),
             "The shaped term reads the actor's log-probs in the padded layout ppo_loss uses."),
    VerlName("verl.utils.metric", "Metric", "import", (_LOSS,),
             "Loss metrics must be verl's Metric to be aggregated across ranks."),
    VerlName("verl.utils.metric", "AggregationType", "import", (_LOSS,),
             "The off-policy metrics choose how verl aggregates them."),
    VerlName("verl.utils.metric", "AggregationType.MEAN", "call", (_LOSS,),
             "The off-policy loss falls back to verl's mean aggregation."),
    VerlName("verl.utils.metric", "AggregationType.SUM", "call", (_LOSS,),
             "The ratio sum and token count are summed so their quotient is a true mean."),
    VerlName("verl.workers.engine_workers", "ActorRolloutRefWorker.set_loss_fn", "call",
             ("karl_verl/integration/features/injection.py",),
             "Injected runs hand the actor workers karl's loss through it."),
    VerlName("verl.utils.debug.metrics", "calculate_debug_metrics", "import", (_INJECT,),
             "verl's rollout-vs-actor diagnostics are recomputed over sampled rows only."),
    VerlName("verl.utils", "tensordict_utils", "import",
             ("karl_verl/integration/features/ivgr.py", "karl_verl/integration/features/levels.py", _INJECT),
             "Prompt batches are TensorDicts; per-row fields are set with verl's helpers."),
    VerlName("verl.utils.tensordict_utils", "assign_non_tensor_stack", "call",
             ("karl_verl/integration/features/ivgr.py", "karl_verl/integration/features/levels.py", _INJECT),
             "Puts the level, the injection plan and iVGR's streams on each prompt as verl stores fields."),
    # ---------------------------------------------------------------- weight sync into vLLM (all runs)
    VerlName(_WEIGHTS, None, "module", ("karl_verl/integration/weight_sync.py",),
             "Its import is when the bounded wait is installed (importing it earlier would load vLLM).",
             needs="vllm"),
    VerlName(_WEIGHTS, "BucketedWeightSender", "call", ("karl_verl/integration/weight_sync.py",),
             "Its waits for vLLM are bounded so a failed weight sync ends the run instead of hanging it.",
             needs="vllm"),
    VerlName(_WEIGHTS, "BucketedWeightSender._init_socket", "patch", ("karl_verl/integration/weight_sync.py",),
             "Gives the socket send and receive timeouts.", needs="vllm"),
    VerlName(_WEIGHTS, "BucketedWeightSender.async_send_weights", "patch", ("karl_verl/integration/weight_sync.py",),
             "Turns a timeout into an error that names the cause.", needs="vllm"),
    # ---------------------------------------------------------------- vision freeze (SFT)
    VerlName("verl.workers.engine", "EngineRegistry", "registry", (_FREEZE,),
             "The SFT engines are swapped for freezing ones in verl's engine table."),
    VerlName("verl.workers.engine", "EngineRegistry._engines", "registry", (_FREEZE,),
             "verl's register refuses a second class per key, so the table itself is edited."),
    VerlName("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead._build_module", "override",
             (_FREEZE,), "The vision tower is frozen after verl loads the model, before FSDP wraps it."),
    # ---------------------------------------------------------------- CPU execution layer: platform
    VerlName("verl.plugin.platform", "get_platform", "import", ("karl_verl/cpu/__init__.py",),
             "Tells whether an earlier import already resolved a platform other than cpu."),
    VerlName("verl.plugin.platform", "set_platform", "import", ("karl_verl/cpu/__init__.py",),
             "Replaces a platform resolved before the CPU layer was activated."),
    VerlName("verl.plugin.platform.platform_manager", "PlatformRegistry", "registry", (_CPU_PLATFORM,),
             "The CPU layer registers platform 'cpu' that VERL_PLATFORM=cpu selects."),
    VerlName("verl.plugin.platform.platform_manager", "PlatformRegistry.register", "registry", (_CPU_PLATFORM,),
             "Adds the cpu platform."),
    VerlName("verl.plugin.platform.platform_manager", "PlatformRegistry.get", "registry", (_CPU_PLATFORM,),
             "Keeps registration idempotent and lets info confirm it."),
    VerlName(_PLATFORM_BASE, "PlatformBase", "subclass", (_CPU_PLATFORM,),
             "CpuPlatform implements verl's device interface for machines without an accelerator."),
    *(VerlName(_PLATFORM_BASE, f"PlatformBase.{method}", "override", (_CPU_PLATFORM,),
               "verl asks the platform through it; the CPU platform must answer by that name.")
      for method in _PLATFORM_METHODS),
    # ---------------------------------------------------------------- CPU execution layer: rollout
    VerlName("verl.workers.rollout.base", "_ROLLOUT_REGISTRY", "registry", (_CPU_ROLLOUT,),
             "Registers the transformers rollout adapter (verl has no function for it)."),
    VerlName("verl.workers.rollout.base", "BaseRollout", "subclass", (_CPU_ROLLOUT,),
             "The per-worker adapter of the transformers rollout must be a verl rollout."),
    VerlName("verl.workers.rollout.base", "BaseRollout.resume", "override", (_CPU_ROLLOUT,),
             "verl wakes the rollout server through it."),
    VerlName("verl.workers.rollout.base", "BaseRollout.release", "override", (_CPU_ROLLOUT,),
             "verl puts the rollout server to sleep through it."),
    VerlName("verl.workers.rollout.base", "BaseRollout.update_weights", "override", (_CPU_ROLLOUT,),
             "verl syncs the actor's weights into the rollout server through it."),
    VerlName(_REPLICA, "RolloutReplicaRegistry", "registry", (_CPU_ROLLOUT,),
             "Registers the transformers replica that rollout.name=transformers selects."),
    VerlName(_REPLICA, "RolloutReplicaRegistry.register", "registry", (_CPU_ROLLOUT,), "Adds the replica."),
    VerlName(_REPLICA, "RolloutReplicaRegistry.get", "registry", (_CPU_ROLLOUT,),
             "Lets info confirm the replica is registered."),
    VerlName(_REPLICA, "RolloutReplica", "subclass", (_CPU_ROLLOUT,),
             "TransformersReplica is started, slept and woken by verl like its own replicas."),
    VerlName(_REPLICA, "RolloutReplica.launch_servers", "override", (_CPU_ROLLOUT,),
             "Starts the transformers server actors."),
    VerlName(_REPLICA, "RolloutReplica.sleep", "override", (_CPU_ROLLOUT,), "Frees the server's cache as verl asks."),
    VerlName(_REPLICA, "RolloutReplica.wake_up", "override", (_CPU_ROLLOUT,), "Restores the server as verl asks."),
    VerlName(_REPLICA, "RolloutReplica.max_concurrency", "call", (_CPU_ROLLOUT,),
             "The server actors get verl's concurrency limit."),
    VerlName(_REPLICA, "RolloutMode", "import", (_CPU_ROLLOUT,),
             "Sleep and wake depend on how verl placed the replica."),
    VerlName(_REPLICA, "RolloutMode.HYBRID", "call", (_CPU_ROLLOUT,), "Only a hybrid replica frees its cache."),
    VerlName(_REPLICA, "RolloutMode.STANDALONE", "call", (_CPU_ROLLOUT,), "A standalone replica is never woken."),
    VerlName("verl.utils.tokenizer", "hf_tokenizer", "import", (_CPU_ROLLOUT,),
             "The CPU rollout loads the tokenizer as verl's workers do."),
    VerlName("verl.utils.tokenizer", "hf_processor", "import", (_CPU_ROLLOUT,),
             "The CPU rollout loads the processor as verl's workers do (with the torchvision fallback)."),
    # ---------------------------------------------------------------- CPU execution layer: patches
    VerlName("verl.workers.config", "model", "import", (_CPU_PATCHES,), "Holds the hf_processor binding patched."),
    VerlName("verl.workers.config.model", "hf_processor", "patch", (_CPU_PATCHES,),
             "Without torchvision verl's processor is None for Qwen3-VL; the patch builds it."),
    VerlName("verl.workers.engine.fsdp", "transformer_impl", "import", (_CPU_PATCHES,),
             "Holds the CPUOffloadPolicy binding patched."),
    VerlName("verl.workers.engine.fsdp.transformer_impl", "CPUOffloadPolicy", "patch", (_CPU_PATCHES,),
             "Pinned host memory needs an accelerator; CPU runs use an unpinned policy."),
    # ---------------------------------------------------------------- CPU execution layer: datasets
    VerlName("verl.utils.dataset.rl_dataset", "RLHFDataset", "subclass", ("karl_verl/cpu/dataset.py",
                                                                          "karl_verl/dryrun/pipeline.py"),
             "CPU runs read images with Pillow alone; the dry run warms up with verl's own dataset."),
    VerlName("verl.utils.dataset.rl_dataset", "RLHFDataset._process_multi_modal_info", "override",
             ("karl_verl/cpu/dataset.py",), "The image extraction that needs torchvision is replaced there."),
    VerlName("verl.utils.dataset.rl_dataset", "RLHFDataset.process_vision_info", "override",
             ("karl_verl/cpu/dataset.py",), "verl's async image path must not import torchvision either."),
    VerlName("verl.utils.dataset.rl_dataset", "RLHFDataset._extract_audio_info", "call", ("karl_verl/cpu/dataset.py",),
             "Audio is extracted as verl does."),
    VerlName("verl.utils.dataset.multiturn_sft_dataset", "MultiTurnSFTDataset", "subclass",
             ("karl_verl/cpu/sft_dataset.py",), "CPU SFT runs read images with Pillow alone."),
    VerlName("verl.utils.dataset.multiturn_sft_dataset", "MultiTurnSFTDataset._build_messages", "override",
             ("karl_verl/cpu/sft_dataset.py",), "The image loading that needs torchvision is replaced there."),
    VerlName("verl.utils.py_functional", "convert_nested_value_to_list_recursive", "import",
             ("karl_verl/cpu/sft_dataset.py",), "Messages are normalised as verl's SFT dataset does."),
    # ---------------------------------------------------------------- entry points run as modules
    VerlName("verl.trainer.main_ppo", None, "module", ("karl_verl/dryrun/launch.py",),
             "The dry run and experiments run verl's real RL entry point."),
    VerlName("verl.trainer.sft_trainer", None, "module", ("karl_verl/dryrun/launch.py",),
             "The dry run runs verl's real SFT entry point."),
)


@dataclass(frozen=True)
class SurfaceCheck:
    """The outcome for one :class:`VerlName`."""

    entry: VerlName
    #: None: present; else what is wrong.
    error: str | None
    #: True: checked in verl's source (its ``needs`` is not installed), not imported.
    in_source: bool = False


def _verl_source(module: str) -> Path | None:
    """The source file of a verl module, found without importing its packages."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *module.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defined_in(body: list[ast.stmt], name: str) -> ast.stmt | None:
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return node
        if isinstance(node, ast.Import | ast.ImportFrom) and any(
                (alias.asname or alias.name) == name for alias in node.names):
            return node
    return None


def _check_in_source(entry: VerlName) -> str | None:
    source = _verl_source(entry.module)
    if source is None:
        return f"no module {entry.module} in the installed verl"
    body: list[ast.stmt] = ast.parse(source.read_text(encoding="utf-8")).body
    owner = entry.module
    for part in (entry.attr or "").split(".") if entry.attr else ():
        node = _defined_in(body, part)
        if node is None:
            return f"{owner} defines no {part!r} (read in verl's source: {entry.needs} is not installed)"
        body = getattr(node, "body", [])
        owner = f"{owner}.{part}"
    return None


def check_verl_name(entry: VerlName) -> SurfaceCheck:
    """Whether the installed verl has ``entry``: its module imports and each attribute resolves."""
    if entry.needs is not None and importlib.util.find_spec(entry.needs) is None:
        return SurfaceCheck(entry, _check_in_source(entry), in_source=True)
    if entry.kind == "module":
        # Named for ``python -m``, an import hook or a logger: that it exists is what karl-verl relies
        # on, and executing it here (an entry point's top level) is not needed to know that.
        try:
            found = importlib.util.find_spec(entry.module) is not None
        except Exception as err:  # noqa: BLE001 - a parent package that fails to import
            return SurfaceCheck(entry, f"cannot import {entry.module}'s package: {type(err).__name__}: {err}")
        return SurfaceCheck(entry, None if found else f"no module {entry.module}")
    try:
        obj = importlib.import_module(entry.module)
    except Exception as err:  # noqa: BLE001 - verl raises more than ImportError for a missing engine
        return SurfaceCheck(entry, f"cannot import {entry.module}: {type(err).__name__}: {err}")
    owner = entry.module
    for part in entry.attr.split(".") if entry.attr else ():
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return SurfaceCheck(entry, f"{owner} has no attribute {part!r}")
        owner = f"{owner}.{part}"
    return SurfaceCheck(entry, None)


def check_verl_surface(surface: Sequence[VerlName] | None = None) -> list[SurfaceCheck]:
    """:func:`check_verl_name` of every entry (default: :data:`VERL_SURFACE`, read at call time)."""
    return [check_verl_name(entry) for entry in (VERL_SURFACE if surface is None else surface)]


def missing_verl_names(surface: Sequence[VerlName] | None = None) -> list[str]:
    """``"name: error"`` for every entry the installed verl lacks; empty when all are present."""
    return [f"{check.entry.name}: {check.error}" for check in check_verl_surface(surface) if check.error]


def installed_verl_version() -> str | None:
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None


def verl_in_supported_range(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed verl's) is inside :data:`SUPPORTED_VERL`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = installed_verl_version() if version is None else version
    if version is None:
        return False
    try:
        # Pre-releases inside the range count (0.9.2rc1); 0.10.0.dev0 stays outside "<0.10".
        return SpecifierSet(SUPPORTED_VERL).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def surface_report(surface: Sequence[VerlName] | None = None) -> tuple[list[str], bool]:
    """The ``karl-verl info`` section: its lines, and False when a name is missing.

    The version range alone does not fail the check: a verl outside it that has every name may run,
    but is unsupported, and the line says so.
    """
    surface = VERL_SURFACE if surface is None else surface
    checks = check_verl_surface(surface)
    version = installed_verl_version()
    inside = verl_in_supported_range(version)
    lines = [f"verl surface ({len(surface)} names karl-verl uses, listed in karl_verl/integration/verl_surface.py):"]
    if inside:
        lines.append(f"  [ok] verl {version} is inside the supported range {SUPPORTED_VERL}")
    else:
        lines.append(f"  [UNSUPPORTED] verl {version or '(not installed)'} is outside the supported range "
                     f"{SUPPORTED_VERL}: pip install 'verl{SUPPORTED_VERL}'")
    missing = [check for check in checks if check.error]
    for check in missing:
        lines.append(f"  [MISSING] {check.entry.name}: {check.error}")
    if not missing:
        in_source = [check for check in checks if check.in_source]
        absent = ", ".join(sorted({check.entry.needs or "" for check in in_source}))
        note = f" ({len(in_source)} read in verl's source: {absent} not installed here)" if in_source else ""
        lines.append(f"  [ok] all {len(checks)} present{note}")
    return lines, not missing
