"""Mastery-aware prompt sampling (karl-verl's addition, not the paper's): which training prompts a step rolls out.

Pure module: no Ray, no verl trainer (torch for the random generator only). The ``karl`` trainer
builds one :class:`PromptCurriculum` over the training set's rows when ``karl.curriculum.enable``
is true (:mod:`karl_verl.integration.curriculum` is the glue); see ``docs/curriculum.md``.

Weights. Row r weighs ``level_weights[level(r) - 1]``: its entity's level in the current mastery
table (the same rule the trainer tags prompts with, :func:`karl_verl.mastery_state.sample_level`),
times ``skipped_weight`` while the band-pass skips its entity.

Draws. An epoch is as many prompts as verl's own train loader yields: ``len(dataset) // batch_size``
batches of ``batch_size`` (verl drops the last partial batch).

* Uniform level weights with the band-pass off ("verl's order"): each epoch is a permutation of the
  rows drawn exactly as verl's ``create_rl_sampler`` draws it (``torch.randperm`` on a generator
  seeded by the seed, or row order when ``shuffle`` is false), bitwise the same prompts.
* Otherwise: each prompt is drawn independently, with replacement, with probability proportional to
  its row's weight (like ``torch.utils.data.WeightedRandomSampler``): the expected share of level k
  in the draws is ``w_k * n_k / sum_j w_j * n_j`` (n_k rows at level k). A batch is drawn when it is
  fetched, with the weights in force then, so a refresh changes the very next batch.

Band-pass on the success rate. The curriculum counts, per entity, the training rollouts that hit
acc@0.5 (the reward's ``acc``) in its own :class:`~karl_verl.online.OnlineMastery` (separate from
the ``karl.mastery`` online posterior: a revisit resets an entity's counts, which must not touch the
mastery estimate). At each re-weight (every epoch start and every mastery refresh), an entity with at
least ``min_observations`` counted rollouts whose success rate ``successes / rollouts`` is below
``min_success_rate`` or above ``max_success_rate`` starts being skipped: nothing to learn from groups
that always or never succeed. "Later": a skipped entity comes back at the first re-weight at least
``revisit_every_epochs`` epochs after it was skipped, with its counts reset (a fresh look at a
policy that has changed); 0 keeps it skipped for the rest of the run. Counts decay by ``decay`` at
every epoch start.

State. :meth:`PromptCurriculum.state_dict` holds the generator, epoch, position, counts and skipped
entities as plain JSON; a sampler loaded from it draws what the saved one would have drawn next.
The per-row levels are not in it: they come from the mastery table, saved with the mastery state.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from karl_verl.config import CurriculumConfig
from karl_verl.mastery import NUM_LEVELS
from karl_verl.online import OnlineMastery

STATE_FORMAT = "karl-verl/curriculum-state-v1"

logger = logging.getLogger(__name__)
METRIC_PREFIX = "karl/curriculum"


class CurriculumError(ValueError):
    """A curriculum state or input that does not fit this sampler (the message says what and where)."""


def _rng_state_to_text(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def _rng_state_from_text(text: Any, where: str) -> torch.Tensor:
    try:
        state = torch.frombuffer(bytearray(base64.b64decode(str(text).encode("ascii"), validate=True)),
                                 dtype=torch.uint8)
        torch.Generator().set_state(state)  # refused here, before any state of ours changes
    except (ValueError, RuntimeError, TypeError) as err:
        raise CurriculumError(f"{where}: not a torch generator state ({err})") from None
    return state


def _mode(verl_order: bool) -> str:
    return "verl's own order (equal weights, no band-pass)" if verl_order else "weighted draws"


def new_generator(seed: int | None) -> torch.Generator:
    """The generator verl's ``create_rl_sampler`` builds: seeded when ``seed`` is set, else torch's default seed."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(int(seed))
    return generator


@dataclass(frozen=True)
class ReweightRecord:
    """What one re-weight did: why, the epoch, entities newly skipped / back, skipped now, fallback used."""

    reason: str
    epoch: int
    newly_skipped: int
    revisited: int
    skipped: int
    fallback: bool


class PromptCurriculum:
    """A seeded, stateful sampler of training-row indices, weighted by mastery level (see the module doc).

    ``entities``: one entry per dataset row (its entity, or None when it has none: such a row is never
    skipped). Levels are given with :meth:`set_levels` (and at each refresh with :meth:`reweight`).
    """

    def __init__(self, entities: Sequence[str | None], config: CurriculumConfig, *, batch_size: int,
                 shuffle: bool = True, seed: int | None = None) -> None:
        if batch_size < 1:
            raise CurriculumError(f"batch_size: expected an integer >= 1, got {batch_size}")
        if len(entities) < batch_size:
            raise CurriculumError(f"the training set has {len(entities)} rows, fewer than one batch of {batch_size}")
        self.config = config
        self.entities = [e.strip() if isinstance(e, str) and e.strip() else None for e in entities]
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.num_rows = len(self.entities)
        self.epoch_length = (self.num_rows // self.batch_size) * self.batch_size
        self.row_levels = np.full(self.num_rows, NUM_LEVELS, dtype=np.int64)
        self._rng = new_generator(seed)
        self._epoch_rng = _rng_state_to_text(self._rng)  # the generator before this epoch's permutation
        self.epoch = 0
        self.position = 0
        self.started = False
        self.counts = OnlineMastery(prior_alpha=1.0, prior_beta=1.0, decay=config.decay)
        #: entity -> epoch it was skipped in
        self.skipped: dict[str, int] = {}
        self._permutation: list[int] | None = None
        self._weights = np.ones(self.num_rows)
        self._fallback = False
        self._drawn_step = np.zeros(NUM_LEVELS, dtype=np.int64)
        self._drawn_epoch = np.zeros(NUM_LEVELS, dtype=np.int64)
        self._reweights: list[ReweightRecord] = []

    # ------------------------------------------------------------------ weights

    @property
    def verl_order(self) -> bool:
        """True when the draws are verl's own permutation (uniform level weights, band-pass off)."""
        return self.config.is_uniform

    def set_levels(self, levels: Sequence[int]) -> None:
        """The rows' current levels (1..5); the weights follow, the band-pass is not re-evaluated."""
        array = np.asarray(levels, dtype=np.int64)
        if array.shape != (self.num_rows,):
            raise CurriculumError(f"set_levels: expected {self.num_rows} levels (one per row), got shape {array.shape}")
        if array.size and (array.min() < 1 or array.max() > NUM_LEVELS):
            raise CurriculumError(f"set_levels: expected levels in 1..{NUM_LEVELS}, got {sorted(set(array.tolist()))}")
        self.row_levels = array
        self._recompute_weights()

    def reweight(self, levels: Sequence[int] | None, reason: str) -> ReweightRecord:
        """Re-read the weights (a mastery refresh, or an epoch start): new levels, then the band-pass."""
        newly, back = self._update_band()
        if levels is not None:
            self.set_levels(levels)
        else:
            self._recompute_weights()
        record = ReweightRecord(reason=reason, epoch=self.epoch, newly_skipped=newly, revisited=back,
                                skipped=len(self.skipped), fallback=self._fallback)
        self._reweights.append(record)
        return record

    def _update_band(self) -> tuple[int, int]:
        config = self.config
        if not config.band_pass:
            return 0, 0
        # A re-weight between epochs (a refresh at an epoch boundary) belongs to the epoch about to start.
        epoch = self.epoch + 1 if self.epoch_done else self.epoch
        back = 0
        if config.revisit_every_epochs > 0:
            for entity, since in list(self.skipped.items()):
                if epoch - since >= config.revisit_every_epochs:
                    del self.skipped[entity]
                    self.counts.counts.pop(entity, None)
                    back += 1
        newly = 0
        for entity, counts in self.counts.counts.items():
            if entity in self.skipped or counts.total < config.min_observations or counts.total <= 0:
                continue
            rate = counts.successes / counts.total
            if rate < config.min_success_rate or rate > config.max_success_rate:
                self.skipped[entity] = epoch
                newly += 1
        return newly, back

    def _recompute_weights(self) -> None:
        level_weights = np.asarray(self.config.level_weights, dtype=np.float64)
        weights = level_weights[self.row_levels - 1]
        if self.skipped:
            skipped = np.array([entity in self.skipped for entity in self.entities], dtype=bool)
            banded = np.where(skipped, weights * self.config.skipped_weight, weights)
            # Every drawable row skipped: the band-pass gives way (level weights alone) rather than stopping.
            weights = banded if banded.sum() > 0 else weights
            self._fallback = not banded.sum() > 0
        else:
            self._fallback = False
        if not weights.sum() > 0:
            # Every row sits on a zero-weight level (the table moved them there): draw uniformly.
            weights = np.ones(self.num_rows)
            self._fallback = True
        self._weights = weights

    def row_weights(self) -> np.ndarray:
        """Each row's current weight (after the band-pass and any fallback); a copy."""
        return self._weights.copy()

    def level_shares(self) -> np.ndarray:
        """Expected share of each level 1..5 in the weighted draws under the current weights."""
        totals = np.bincount(self.row_levels - 1, weights=self._weights, minlength=NUM_LEVELS)[:NUM_LEVELS]
        return totals / totals.sum()

    # ------------------------------------------------------------------ observations

    def observe(self, entities: Sequence[str | None], successes: Sequence[Any]) -> int:
        """Count one rollout outcome (acc@0.5) per entity; returns how many were counted."""
        return self.counts.observe(list(entities), list(successes))

    # ------------------------------------------------------------------ draws

    @property
    def epoch_done(self) -> bool:
        return self.started and self.position >= self.epoch_length

    def _start_epoch(self) -> None:
        if self.started:
            self.epoch += 1
            self.counts.apply_decay()
        self.started = True
        self.position = 0
        self._drawn_epoch[:] = 0
        self._epoch_rng = _rng_state_to_text(self._rng)
        self._permutation = self._draw_permutation() if self.verl_order else None
        self.reweight(None, "epoch_start")

    def _draw_permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        return torch.randperm(self.num_rows, generator=self._rng).tolist()

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` row indices, starting a new epoch when the current one is used up."""
        if not self.started or self.epoch_done:
            self._start_epoch()
        if self.verl_order:
            assert self._permutation is not None
            batch = self._permutation[self.position:self.position + self.batch_size]
        else:
            weights = torch.from_numpy(self._weights)
            batch = torch.multinomial(weights, self.batch_size, replacement=True, generator=self._rng).tolist()
        self.position += self.batch_size
        drawn = np.bincount(self.row_levels[batch] - 1, minlength=NUM_LEVELS)[:NUM_LEVELS]
        self._drawn_step += drawn
        self._drawn_epoch += drawn
        return batch

    def epoch_batches(self) -> Iterator[list[int]]:
        """The batches of one pass (an epoch, or the rest of the current one after a resume).

        A pass that starts with the current epoch used up starts the next epoch; it ends when its
        epoch is used up, as verl's loader ends an epoch.
        """
        served = False
        while True:
            if self.epoch_done and served:
                return
            served = True
            yield self.next_batch()

    def __len__(self) -> int:
        return self.epoch_length // self.batch_size

    # ------------------------------------------------------------------ metrics

    def consume_metrics(self) -> dict[str, float]:
        """Metrics since the last call: drawn per level (this step and the epoch so far), shares, band."""
        out: dict[str, float] = {f"{METRIC_PREFIX}/epoch": float(self.epoch)}
        shares = self.level_shares()
        for level in range(1, NUM_LEVELS + 1):
            out[f"{METRIC_PREFIX}/level_{level}/drawn"] = float(self._drawn_step[level - 1])
            out[f"{METRIC_PREFIX}/level_{level}/drawn_epoch"] = float(self._drawn_epoch[level - 1])
            out[f"{METRIC_PREFIX}/level_{level}/weight_share"] = float(shares[level - 1])
        out[f"{METRIC_PREFIX}/skipped_entities"] = float(len(self.skipped))
        out[f"{METRIC_PREFIX}/reweights"] = float(len(self._reweights))
        out[f"{METRIC_PREFIX}/newly_skipped"] = float(sum(r.newly_skipped for r in self._reweights))
        out[f"{METRIC_PREFIX}/revisited"] = float(sum(r.revisited for r in self._reweights))
        out[f"{METRIC_PREFIX}/fallback"] = 1.0 if self._fallback else 0.0
        self._drawn_step[:] = 0
        self._reweights = []
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed sampler needs (JSON-serialisable): generator, epoch, position, counts, band."""
        return {
            "format": STATE_FORMAT,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "verl_order": self.verl_order,
            "epoch": self.epoch,
            "position": self.position,
            "started": self.started,
            "rng": _rng_state_to_text(self._rng),
            "epoch_rng": self._epoch_rng,
            "counts": self.counts.to_json(),
            "skipped": dict(sorted(self.skipped.items())),
            "drawn_epoch": self._drawn_epoch.tolist(),
        }

    def load_state_dict(self, state: Any, *, source: str = "curriculum state") -> None:
        """Continue from a :meth:`state_dict` (levels stay as set: they come from the mastery table)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CurriculumError(f"{source}: not a karl-verl curriculum state (expected key 'format' = "
                                  f"{STATE_FORMAT!r})")
        for key, expected in (("num_rows", self.num_rows), ("batch_size", self.batch_size)):
            if state.get(key) != expected:
                raise CurriculumError(f"{source}: key {key!r} is {state.get(key)!r} but this run has {expected!r} "
                                      "(the training set or the data batch size changed since it was saved)")
        if state.get("verl_order") != self.verl_order:
            # New weights at resume (equal ones and no band-pass, or the other way round): the epoch,
            # its position and the generator carry over; the rest of the epoch is drawn the new way.
            logger.warning("%s was saved with %s; this run draws %s from epoch %s, position %s on", source,
                           _mode(bool(state.get("verl_order"))), _mode(self.verl_order), state.get("epoch"),
                           state.get("position"))
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            skipped = {str(entity): int(since) for entity, since in dict(state["skipped"]).items()}
            drawn_epoch = np.asarray(state["drawn_epoch"], dtype=np.int64)
            started = bool(state["started"])
        except (KeyError, TypeError, ValueError) as err:
            raise CurriculumError(f"{source}: missing or malformed key ({err!r})") from None
        if not 0 <= position <= self.epoch_length or epoch < 0 or drawn_epoch.shape != (NUM_LEVELS,):
            raise CurriculumError(f"{source}: epoch {epoch}, position {position} or drawn_epoch "
                                  f"{drawn_epoch.tolist()} out of range (epoch length {self.epoch_length})")
        counts = OnlineMastery.from_json(state.get("counts"), source=source)
        epoch_rng = _rng_state_from_text(state.get("epoch_rng"), f"{source}: key 'epoch_rng'")
        rng = _rng_state_from_text(state.get("rng"), f"{source}: key 'rng'")
        # Everything checked: from here on nothing raises, so a refused state leaves this sampler as it was.
        self._rng.set_state(epoch_rng)
        self._epoch_rng = str(state["epoch_rng"])
        self._permutation = self._draw_permutation() if self.verl_order and started else None
        self._rng.set_state(rng)
        self.epoch, self.position, self.started = epoch, position, started
        self.counts = OnlineMastery(prior_alpha=1.0, prior_beta=1.0, decay=self.config.decay, counts=counts.counts)
        self.skipped = skipped
        self._drawn_epoch = drawn_epoch
        self._drawn_step[:] = 0
        self._recompute_weights()
