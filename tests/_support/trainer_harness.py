"""verl's real v1 ``fit`` loop with the ``karl`` trainer on CPU; fakes only for GPU and server parts.

The one trainer harness of the suite: tests/integration/test_trainer.py and the reliability tests
(probe faults, resume) use it in the test process, and ``tests/reliability/_helpers/resume_run.py``
in a fresh interpreter. verl's own code runs: ``PPOTrainer.__init__`` from verl's composed default
config, ``fit``, ``step``, the replay buffer, ``_compute_old_log_prob``, ``_compute_metrics``,
``_validate``, ``_save_checkpoint`` and ``_load_checkpoint`` (with the StatefulDataLoader state),
the ``karl`` reward manager loaded as verl's reward loop loads it, and the real probe runner. Fakes
stand in only for what needs GPUs or rollout servers, and for the TransferQueue service (Ray actors;
too slow to start on 2 CPU cores):

* :class:`FakeTQ`: TransferQueue's kv calls in memory, returning batches as the real store does
  (jagged nested tensors per sample, NonTensorStack for the rest);
* :class:`FakeRollout`: the agent loop (vLLM servers): a fixed policy answers each prompt ``n``
  times, verl's ``karl`` reward manager scores it, the result goes to TransferQueue with every
  prompt field copied, as verl's ``AgentLoopWorkerTQ`` does;
* :class:`FakeActorWorkers`: log-probs, a no-op update, checkpoint files;
* :class:`FakeProbeBackend`: the probe's answers from the rollout servers, right exactly on the
  entities the model knows: a set the test changes, or a function of the training step (the weights
  a checkpoint restores, so a resumed run and an uninterrupted one see the same answers); faults can
  be injected per call.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

#: Entities of the probe set, and of the training data (Tu-160 is in no table: default level).
PROBED = ("F-16", "J-10", "MiG-29", "Su-30")
TRAIN_ENTITIES = ("Su-30", "F-16", "MiG-29", "Tu-160", "J-10", "Su-30", "F-16", "MiG-29")
#: ``algorithm.karl``: the advantage weights per level.
ALPHA = {"alpha_plus": [1.0, 1.0, 1.0, 2.0, 3.0], "alpha_minus": [1.0, 1.0, 1.0, 0.5, 0.25]}


def ground_truth(entity: str) -> str:
    return f"<|object_ref_start|>{entity}<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"


HIT = "<think>t</think><answer>(100,100),(300,300)</answer>"
NEAR = "<think>t</think><answer>(110,100),(300,310)</answer>"
MISS = "<think>t</think><answer>(600,600),(700,700)</answer>"


def policy(entity: str, session: int, step: int) -> str:
    """The fake model's answer: deterministic in (entity, session, step), getting better with steps."""
    good = (sum(map(ord, entity)) + session + step) % 4
    return (HIT, NEAR, MISS, MISS if step < 3 else HIT)[good]


def knowledge(step: int) -> set[str]:
    """What the fake model recognises after ``step`` completed steps: it learns as training goes."""
    known = {"Su-30"}
    if step >= 2:
        known.add("F-16")
    if step >= 4:
        known.add("MiG-29")
    return known


# ----------------------------------------------------------------------------- fakes


class FakeTQ:
    """TransferQueue's kv calls in memory (the store verl's trainer, replay buffer and padding use)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, dict]] = defaultdict(dict)

    def _record(self, partition_id: str, key: str) -> dict:
        return self.parts[partition_id].setdefault(key, {"fields": {}, "tag": {}})

    def kv_put(self, key, partition_id, fields=None, tag=None):
        self.kv_batch_put([key], partition_id, fields=fields, tags=None if tag is None else [tag])

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from transfer_queue import KVBatchMeta

        keys = list(keys)
        for i, key in enumerate(keys):
            record = self._record(partition_id, key)
            if tags is not None:
                record["tag"].update(tags[i])
            if fields is not None:
                for name in fields.keys():
                    value = fields.get(name)
                    if isinstance(value, torch.Tensor):
                        record["fields"][name] = value.unbind()[i] if value.is_nested else value[i]
                    else:
                        record["fields"][name] = value.tolist()[i]
        return KVBatchMeta(partition_id=partition_id, keys=keys,
                           tags=[dict(self.parts[partition_id][key]["tag"]) for key in keys])

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from tensordict import NonTensorStack, TensorDict

        rows = [self.parts[partition_id][key]["fields"] for key in keys]
        names = select_fields if select_fields is not None else list(rows[0])
        out = {}
        for name in [select_fields] if isinstance(select_fields, str) else names:
            present = sum(name in row for row in rows)
            if present == 0:
                continue  # like TransferQueue: fields no sample has are left out
            if present < len(rows):  # like TransferQueue's kv_batch_get
                raise ValueError("Some fields are not ready in all the requested keys!")
            values = [row[name] for row in rows]
            if all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
                out[name] = torch.nested.as_nested_tensor([v.contiguous() for v in values], layout=torch.jagged)
            elif all(isinstance(v, torch.Tensor) for v in values):
                out[name] = torch.stack(values)
            else:
                out[name] = NonTensorStack(*values)
        return TensorDict(out, batch_size=[len(keys)])

    def kv_list(self, partition_id=None):
        parts = [partition_id] if partition_id is not None else list(self.parts)
        return {p: {key: dict(rec["tag"]) for key, rec in self.parts[p].items()} for p in parts}

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.parts[partition_id].pop(key, None)


class FakeRollout:
    """The agent-loop manager and its workers: the rollout part of verl, without servers.

    Mirrors ``AgentLoopWorkerTQ.generate_sequences`` / ``_run_prompt`` / ``_agent_loop_postprocess``:
    each prompt's fields are copied into its ``n`` sessions; the answer is
    ``answer(entity, session, step)`` (:func:`policy` unless told otherwise; an ``answer`` taking a
    keyword ``prompt`` also gets the prompt's fields, e.g. its rendered ``raw_prompt``); the reward is verl's
    reward manager ``karl`` (loaded as verl's reward loop loads it) on a one-row DataProto built like
    verl's ``_compute_score``; outputs go to TransferQueue under ``{uid}_{session}_0``.
    """

    def __init__(self, tq: FakeTQ, config: Any, tokenizer: Any,
                 answer: Callable[[str, int, int], str] = policy) -> None:
        from verl.trainer.ppo.reward import load_reward_manager

        self.tq = tq
        self.config = config
        self.tokenizer = tokenizer
        self.answer = answer
        self._answer_takes_prompt = "prompt" in inspect.signature(answer).parameters
        self.reward = load_reward_manager(config, tokenizer)
        #: One entry per scored rollout: step, entity, the level sent with the prompt and the reward's view.
        self.scored: list[dict] = []

    def generate_sequences(self, batch: Any) -> None:
        from tensordict import NonTensorData, NonTensorStack

        validate = bool(batch["validate"]) if "validate" in batch.keys() else False
        batch.pop("validate", None)
        rollout = self.config.actor_rollout_ref.rollout
        for i in range(len(batch)):
            prompt = {}
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    prompt[key] = value[i]
                elif isinstance(value, NonTensorStack):
                    prompt[key] = value[i].data
                elif isinstance(value, NonTensorData):
                    prompt[key] = value.data
            self._run_prompt(prompt, validate, rollout.val_kwargs.n if validate else rollout.n)

    def _run_prompt(self, prompt: dict, validate: bool, n: int) -> None:
        from tensordict import TensorDict
        from verl import DataProto
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        from karl_verl.integration.trainer import LEVEL_FIELD

        uid, partition = prompt["uid"], "val" if validate else "train"
        steps = int(prompt["global_steps"])
        self.tq.kv_put(key=uid, partition_id=partition, tag={"status": "running"})
        entity = re.search(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>",
                           prompt["reward_model"]["ground_truth"])[1]
        for session in range(n):
            kwargs = {**prompt, "session_id": session}
            prompt_ids = torch.tensor(self.tokenizer.encode("find it", add_special_tokens=False))
            text = (self.answer(entity, session, steps, prompt=prompt) if self._answer_takes_prompt
                    else self.answer(entity, session, steps))
            response_ids = torch.tensor(self.tokenizer.encode(text, add_special_tokens=False))
            data = DataProto(
                batch=TensorDict({"prompts": prompt_ids[None], "responses": response_ids[None],
                                  "attention_mask": torch.ones(1, len(prompt_ids) + len(response_ids))},
                                 batch_size=1),
                non_tensor_batch={key: np.array([value]) for key, value in kwargs.items()},
            )
            result = self.reward.loop.run_until_complete(self.reward.run_single(data))
            info = result["reward_extra_info"]
            self.scored.append({"partition": partition, "step": steps, "index": int(prompt["index"]),
                                "entity": entity, "session": session, "sent_level": prompt.get(LEVEL_FIELD),
                                "level": info["knowledge_level"], "score": float(result["reward_score"])})
            rm_scores = torch.zeros(len(response_ids))
            rm_scores[-1] = result["reward_score"]
            record = {
                "prompts": prompt_ids, "responses": response_ids, "response_mask": torch.ones_like(response_ids),
                "rm_scores": rm_scores, "num_turns": 2,
                "extra_fields": {"reward_extra_info": info, "turn_scores": [], "tool_rewards": [],
                                 "min_global_steps": steps, "max_global_steps": steps},
                "input_ids": torch.cat([prompt_ids, response_ids]),
                **kwargs,
            }
            seq = len(prompt_ids) + len(response_ids)
            tag = {"status": "success", "prompt_len": len(prompt_ids), "response_len": len(response_ids),
                   "seq_len": seq, "global_steps": steps, "min_global_steps": steps, "max_global_steps": steps}
            self.tq.kv_batch_put(keys=[f"{uid}_{session}_0"], partition_id=partition,
                                 fields=list_of_dict_to_tensordict([record]), tags=[tag])
        self.tq.kv_put(key=uid, partition_id=partition, tag={"status": "finished"})


class FakeActorWorkers:
    """The actor worker group (GPU): constant log-probs, no-op updates, checkpoint marker files."""

    def __init__(self, tq: FakeTQ) -> None:
        self.tq = tq
        self._dispatch_info = {"actor": [0]}
        self.loaded: str | None = None

    def compute_log_prob(self, batch):
        from tensordict import TensorDict

        data = self.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                    select_fields=["prompts", "responses"])
        lengths = (data["prompts"].offsets().diff() + data["responses"].offsets().diff()).tolist()
        fields = TensorDict({
            "log_probs": torch.nested.as_nested_tensor([torch.full((n,), -0.5) for n in lengths], layout=torch.jagged),
            "entropy": torch.nested.as_nested_tensor([torch.full((n,), 1.0) for n in lengths], layout=torch.jagged),
        }, batch_size=len(batch))
        return self.tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)

    def update_actor(self, batch):
        return {"metrics": {"mfu": 0.0, "pg_loss": [0.0]}}

    def save_checkpoint(self, local_path, remote_path, global_steps, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        Path(local_path, "weights.txt").write_text(str(global_steps))

    def load_checkpoint(self, local_path, del_local_after_load=False):
        self.loaded = local_path


class FakeCheckpointManager:
    def update_weights(self, global_steps=None):
        pass

    def sleep_replicas(self):
        pass


class RecordingTracking:
    """verl's Tracking logger, keeping what it is given (console/wandb are verl's business)."""

    logged: list[tuple[int, dict]] = []

    def __init__(self, *args, **kwargs) -> None:
        RecordingTracking.logged = []

    def log(self, data, step):
        RecordingTracking.logged.append((step, dict(data)))

    def finish(self, exit_code=0):
        pass


#: Faults the probe backend can be told to show at a call (issue 6.3): the call raises; hangs past the
#: timeout (and, for ``cancel_raises``, its cancel raises too); answers fewer questions than asked;
#: returns NaN, the wrong number of options, or a question with every letter at -inf; or the
#: backend's ``close()`` raises after the probe.
FAULTS = ("exception", "hang", "cancel_raises", "short", "nan", "wrong_width", "all_inf", "close_raises")


class FakeProbeBackend:
    """An OptionScorer standing in for the rollout servers: right exactly on the entities the model knows.

    ``known`` is the set of those entities (a test adds to it as the model "learns"), or a function of
    the number of completed training steps giving it (:func:`knowledge`). :func:`build_trainer` ties
    the backend to its trainer, whose ``global_steps`` is the step here. ``faults`` maps a step to the
    fault (one of :data:`FAULTS`) shown when probed at that step; ``fault``, when set, is shown at
    every call whatever the step.
    """

    supports_logprobs = True

    def __init__(self, image_entity: dict[bytes, str], known: Iterable[str] | Callable[[int], set[str]] = (),
                 *, faults: dict[int, str] | None = None) -> None:
        self.image_entity = image_entity
        self.known = known if callable(known) else set(known)
        self.faults = dict(faults or {})
        self.fault: str | None = None
        self.trainer: Any = None
        self.calls = 0
        self.completed = 0  # calls that returned answers (a late, abandoned one included)
        self.injected: list[tuple[int, str]] = []
        self.cancelled = threading.Event()
        self.release = threading.Event()  # a hung call returns once this is set (or it is cancelled)

    def step(self) -> int:
        return self.trainer.global_steps if self.trainer is not None else 0

    def _fault(self) -> str | None:
        return self.fault or self.faults.get(self.step())

    def _knows(self) -> set[str]:
        # A function of the step: the weights of the steps completed so far.
        return self.known(self.step() - 1) if callable(self.known) else self.known

    def option_logprobs(self, requests, options):
        from karl_verl.probe.questions import LETTERS

        self.calls += 1
        fault = self._fault()
        if fault is not None and (self.step(), fault) not in self.injected:
            self.injected.append((self.step(), fault))
        if fault == "exception":
            raise ConnectionError("rollout server 3 went away")
        if fault in ("hang", "cancel_raises"):
            # A server that stops answering: returns only when cancelled or released.
            self.cancelled.clear()
            while not (self.cancelled.is_set() or self.release.is_set()):
                self.cancelled.wait(0.01)
            if self.cancelled.is_set():
                raise RuntimeError("cancelled")
        known = self._knows()
        rows = []
        for request in requests:
            image = request.images[0]  # the trainer reads its probe set lazily (ParquetImage)
            entity = self.image_entity[bytes(image.read() if hasattr(image, "read") else image)]
            letters = dict((name, letter) for letter, name in re.findall(r"^([ABCD])\. (.+)$",
                                                                          request.messages[0]["content"], re.M))
            right = letters[entity]
            choice = right if entity in known else LETTERS[(LETTERS.index(right) + 1) % 4]
            row = np.full(len(options), -5.0)
            row[LETTERS.index(choice)] = -0.01
            rows.append(row)
        scores = np.array(rows)
        self.completed += 1
        if fault == "short":
            return scores[:-1]  # a worker that answered fewer questions than asked
        if fault == "nan":
            scores[0, 0] = np.nan
        if fault == "wrong_width":
            return scores[:, :3]
        if fault == "all_inf":
            scores[-1, :] = -np.inf
        return scores

    def cancel(self):
        if self._fault() == "cancel_raises":
            # Cancelling fails: the hung call goes on running after the refresh is abandoned.
            raise RuntimeError("cancel failed too")
        self.cancelled.set()

    def close(self):
        if self._fault() == "close_raises":
            raise OSError("could not close the probe connections")


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return copy.deepcopy(self.rows[index])


def dataset_rows(entities: Sequence[str] = TRAIN_ENTITIES) -> list[dict]:
    return [{
        "data_source": "kvg/aircraft",
        "raw_prompt": [{"role": "user", "content": f"Find {entity}."}],
        "reward_model": {"style": "rule", "ground_truth": ground_truth(entity)},
        "extra_info": {"index": index},
        "dummy_tensor": torch.tensor([0], dtype=torch.uint8),
        "index": index,
        "tools_kwargs": {},
        "interaction_kwargs": {},
    } for index, entity in enumerate(entities)]


# ----------------------------------------------------------------------------- building and running


def write_probe_set(folder: Path) -> tuple[str, dict[bytes, str]]:
    """A parquet probe set, 2 images per probed aircraft; returns (path, image bytes -> entity)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows, image_entity = [], {}
    for number, entity in enumerate(sorted(PROBED) * 2):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * number % 256, 90, 20 * number % 256)).save(buffer, format="PNG")
        image_entity[buffer.getvalue()] = entity
        rows.append({"entity": entity, "category": "aircraft", "image": {"bytes": buffer.getvalue(), "path": None},
                     "image_id": f"img{number}"})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probe.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path), image_entity


def compose_verl_config(*overrides: str) -> Any:
    """verl's ``ppo_trainer`` config as Hydra composes it for ``main_ppo``, with ``overrides``, unlocked."""
    import verl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose("ppo_trainer", overrides=list(overrides))
    OmegaConf.set_struct(config, False)
    return config


def compose_base_config() -> Any:
    """verl's config for the ``karl`` trainer: 2 prompts a step, n=4 (2 in validation), 2 epochs."""
    return compose_verl_config(
        "algorithm.adv_estimator=karl_grpo",
        "trainer.v1.trainer_mode=karl",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.val_kwargs.n=2",
        "actor_rollout_ref.rollout.calculate_log_probs=false",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "data.train_batch_size=2",
        "trainer.total_epochs=2",
        "trainer.logger=[console]",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "reward.reward_manager.name=karl",
    )


def make_config(base: Any, workdir: Path, *, mastery: dict | None = None, advantage: dict | None = None,
                **trainer: Any) -> Any:
    """A copy of ``base`` checkpointing under ``workdir/ckpt``, with ``karl.mastery``, ``algorithm.karl``
    (the advantage weights) and any ``trainer.*`` settings given."""
    config = copy.deepcopy(base)
    config.trainer.default_local_dir = str(workdir / "ckpt")
    for key, value in trainer.items():
        config.trainer[key] = value
    config.karl = {"mastery": mastery or {}}
    config.algorithm.karl = advantage or {}
    return config


@contextlib.contextmanager
def patched_services(tq: FakeTQ) -> Iterator[None]:
    """Point verl's and karl's TransferQueue and Tracking at the fakes for the duration."""
    from verl.trainer.ppo import padding_utils
    from verl.trainer.ppo.v1 import replay_buffer, trainer_base

    from karl_verl.integration import trainer as karl_trainer
    from karl_verl.integration.features import base, dynamic_sampling, ivgr, levels

    modules = (trainer_base, replay_buffer, padding_utils, karl_trainer, base, dynamic_sampling, levels, ivgr)
    saved = [(module, "tq", module.tq) for module in modules]
    saved.append((trainer_base, "Tracking", trainer_base.Tracking))
    try:
        for module, name, _ in saved:
            setattr(module, name, tq if name == "tq" else RecordingTracking)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def build_trainer(config: Any, tq: FakeTQ, tokenizer: Any, *, backend: FakeProbeBackend | None = None,
                  entities: Sequence[str] = TRAIN_ENTITIES, total_steps: int | None = None,
                  seed: int | None = None) -> Any:
    """verl's real trainer object; what ``init()`` would start on GPUs is replaced by fakes.

    Trains on :func:`dataset_rows` of ``entities``: in order, or, with a ``seed``, shuffled by verl's
    own sampler (seeded from ``data.seed``, built as verl's ``_init_dataloader`` builds it, so that a
    resumed run continues the same order, across epochs too). ``backend`` answers the probe;
    ``total_steps`` stops ``fit`` early.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.trainer.ppo.utils import create_rl_sampler
    from verl.utils.dataset.rl_dataset import collate_fn

    from karl_verl.integration.trainer import KarlTrainer

    trainer = KarlTrainer(config)
    rows = dataset_rows(entities)
    size = config.data.train_batch_size
    trainer.tokenizer, trainer.processor = tokenizer, None
    trainer.train_dataset = ListDataset(rows)
    sampler = None
    if seed is not None:
        config.data.shuffle, config.data.seed = True, seed
        sampler = create_rl_sampler(config.data, trainer.train_dataset)
    trainer.train_dataloader = StatefulDataLoader(trainer.train_dataset, batch_size=size, drop_last=True,
                                                  num_workers=0, collate_fn=collate_fn, sampler=sampler)
    trainer.train_dataloader_it = None
    trainer.val_dataloader = StatefulDataLoader(ListDataset(dataset_rows(("Su-30", "J-10"))), batch_size=2,
                                                collate_fn=collate_fn)
    trainer.steps_per_epoch = len(rows) // size
    trainer.total_training_steps = total_steps or trainer.steps_per_epoch * config.trainer.total_epochs
    trainer._init_dump_executor()
    trainer.actor_rollout_wg = FakeActorWorkers(tq)
    trainer.checkpoint_manager = FakeCheckpointManager()
    trainer.reward_loop_manager = SimpleNamespace(reward_loop_worker_handles=[])  # streaming reward, as on GPUs
    trainer.resource_pool_manager = SimpleNamespace(get_n_gpus=lambda: 1)
    if backend is not None:
        backend.trainer = trainer
        trainer.karl_probe_backend = lambda: backend
    trainer._load_checkpoint()  # verl's resume logic: from scratch unless a checkpoint is there
    return trainer


#: Fields of the state that measure time, not what was learned: left out of comparisons.
TIMING_KEYS = ("wall_time_s",)


def normalized_state(state_json: Any) -> Any:
    """The mastery state as JSON, without wall-clock times (they differ between any two runs)."""
    if isinstance(state_json, dict):
        return {k: normalized_state(v) for k, v in state_json.items() if k not in TIMING_KEYS}
    if isinstance(state_json, list):
        return [normalized_state(v) for v in state_json]
    return state_json


#: Metrics that measure time: left out of comparisons.
TIMING_METRICS = ("karl/refresh/probe_time_s", "karl/refresh/probe_time_share", "karl/refresh/estimated_time_s",
                  "karl/refresh/estimated_epoch_share")


@dataclass
class RunOutcome:
    """What a (possibly partial) training run produced, in comparable form."""

    state: dict
    scored: list[dict]
    karl_metrics: dict[int, dict[str, float]]
    final_levels: list[int]
    injected: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    global_steps: int = 0
    resumed_from: str | None = None

    def to_json(self) -> dict:
        return {
            "state": self.state, "scored": self.scored,
            "karl_metrics": {str(k): v for k, v in self.karl_metrics.items()},
            "final_levels": self.final_levels, "injected": [list(i) for i in self.injected],
            "warnings": self.warnings, "global_steps": self.global_steps, "resumed_from": self.resumed_from,
        }

    @classmethod
    def from_json(cls, data: dict) -> RunOutcome:
        return cls(state=data["state"], scored=data["scored"],
                   karl_metrics={int(k): v for k, v in data["karl_metrics"].items()},
                   final_levels=data["final_levels"], injected=[tuple(i) for i in data["injected"]],
                   warnings=data["warnings"], global_steps=data["global_steps"], resumed_from=data["resumed_from"])


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_training(workdir: Path, *, mastery: dict, epochs: int, total_steps: int | None = None,
                 save_freq: int = -1, faults: dict[int, str] | None = None, base_config: Any = None,
                 tokenizer: Any = None, probe_timeout_s: float = 2.0) -> RunOutcome:
    """Train (or resume, when ``workdir/ckpt`` holds a checkpoint) with verl's ``fit`` and the fakes.

    The data is :data:`TRAIN_ENTITIES` shuffled with seed 7, the answers :func:`policy`'s, the probe's
    :func:`knowledge`'s. ``total_steps`` stops the run early (verl checkpoints at its last step when
    ``save_freq > 0``).
    """
    from karl_verl.integration import trainer as karl_trainer
    from karl_verl.testing.tiny_qwen3vl import build_tiny_tokenizer

    base_config = base_config if base_config is not None else compose_base_config()
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    probe_path, image_entity = write_probe_set(workdir / "probe")
    mastery = {"probe_data": probe_path, "probe_images_per_entity": 2, "probe_timeout_s": probe_timeout_s, **mastery}
    config = make_config(base_config, workdir, mastery=mastery, advantage=ALPHA, total_epochs=epochs,
                         save_freq=save_freq)
    tq = FakeTQ()
    backend = FakeProbeBackend(image_entity, knowledge, faults=faults)
    collector = _WarningCollector()
    logging.getLogger(karl_trainer.__name__).addHandler(collector)
    try:
        with patched_services(tq):
            trainer = build_trainer(config, tq, tokenizer, backend=backend, total_steps=total_steps, seed=7)
            resumed_from = None if trainer.global_steps == 0 else f"global_step_{trainer.global_steps}"
            rollout = FakeRollout(tq, config, tokenizer)
            trainer.fit(rollout)
            backend.release.set()  # let any abandoned (hung) probe thread end
    finally:
        logging.getLogger(karl_trainer.__name__).removeHandler(collector)
    metrics = {step: {k: v for k, v in data.items() if k.startswith("karl/") and k not in TIMING_METRICS}
               for step, data in RecordingTracking.logged}
    final_levels = [trainer.karl_level(row["extra_info"], row["reward_model"])[0] for row in dataset_rows()]
    return RunOutcome(state=normalized_state(trainer.karl_state.to_json()),
                      scored=[s for s in rollout.scored if s["partition"] == "train"], karl_metrics=metrics,
                      final_levels=final_levels, injected=list(backend.injected), warnings=collector.messages,
                      global_steps=trainer.global_steps, resumed_from=resumed_from)
