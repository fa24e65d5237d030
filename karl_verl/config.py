"""Configuration of KARL: one dataclass per concern, the single source of every number.

Pure module. The YAML recipes (``recipes/recipe/karl_kvg*.yaml``) mirror these dataclasses key
for key under ``karl.reward``, ``karl.mastery`` and ``algorithm.karl``; a test keeps the two in
step. Per-level tables are indexed by mastery level 1..5 (see :mod:`karl_verl.mastery`), highest
mastery first.

Reward presets (KARL_METHOD.md section 3; paper Tables 4 and 6):

==========  ====================================  ==========================================
preset      s+ (levels 1..5)                      s- (levels 1..5)
==========  ====================================  ==========================================
karl        0.65, 0.85, 1.0, 1.2, 1.4             -0.6, -0.5, -0.4, -0.2, 0.0   (final)
v1          0.6, 0.8, 1.0, 1.2, 1.4               -0.8, -0.6, -0.4, -0.2, 0.0
v2          0.65, 0.85, 1.0, 1.15, 1.25           -0.6, -0.5, -0.2, -0.1, 0.0
no_pos      1.0 x5                                as karl       ("w/o Pos.")
no_neg      as karl                               0.0 x5        ("w/o Neg.")
uniform     1.0 x5                                0.0 x5        (vanilla GRPO: IoU if > tau)
==========  ====================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from karl_verl.boxes import BOX_FORMATS, QWEN25_PIXELS
from karl_verl.mastery import DEFAULT_LEVEL_NAME, DEFAULT_THRESHOLDS, NUM_LEVELS, MasteryError, parse_level

_KARL_POS = (0.65, 0.85, 1.0, 1.2, 1.4)
_KARL_NEG = (-0.6, -0.5, -0.4, -0.2, 0.0)
_ONES = (1.0,) * NUM_LEVELS
_ZEROS = (0.0,) * NUM_LEVELS

#: preset name -> (s+ per level, s- per level)
REWARD_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "karl": (_KARL_POS, _KARL_NEG),
    "v1": ((0.6, 0.8, 1.0, 1.2, 1.4), (-0.8, -0.6, -0.4, -0.2, 0.0)),
    "v2": ((0.65, 0.85, 1.0, 1.15, 1.25), (-0.6, -0.5, -0.2, -0.1, 0.0)),
    "no_pos": (_ONES, _KARL_NEG),
    "no_neg": (_KARL_POS, _ZEROS),
    "uniform": (_ONES, _ZEROS),
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what was expected."""


def _float_table(value: Any, key: str) -> tuple[float, ...]:
    try:
        table = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {NUM_LEVELS} numbers (levels 1..5), got {value!r}") from None
    if len(table) != NUM_LEVELS:
        raise ConfigError(f"{key}: expected {NUM_LEVELS} numbers (levels 1..5), got {len(table)}: {table}")
    if not all(math.isfinite(v) for v in table):
        raise ConfigError(f"{key}: expected finite numbers, got {table}")
    return table


def _number(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


def pixel_bounds(value: Any, key: str) -> tuple[int, int]:
    """(min_pixels, max_pixels) of an image processor: two integers, 0 < min <= max."""
    try:
        low, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected two integers (min_pixels, max_pixels), got {value!r}") from None
    if not 0 < low <= high:
        raise ConfigError(f"{key}: expected 0 < min_pixels <= max_pixels, got ({low}, {high})")
    return low, high


def _from_mapping(cls: type, data: Mapping[str, Any] | None, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping (plain dict or OmegaConf), refusing unknown keys."""
    if data is None:
        return cls()
    if hasattr(data, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    return cls(**{key: value for key, value in data.items() if value is not None})


@dataclass(frozen=True)
class RewardConfig:
    """KA-IoU + format reward (paper Sec. 3.2; defaults reproduce the released reward exactly).

    ``pos_scale`` / ``neg_scale`` left as None take the ``preset``'s tables.
    """

    preset: str = "karl"
    #: IoU threshold tau for a success.
    tau: float = 0.65
    #: The released code tests ``IoU > tau``; the paper writes ``>=``.
    inclusive_threshold: bool = False
    #: s+ per level 1..5: a success scores ``min(s+ * IoU, cap)``.
    pos_scale: tuple[float, ...] | None = None
    #: s- per level 1..5: what a miss scores.
    neg_scale: tuple[float, ...] | None = None
    cap: float = 1.0
    #: Added when the response starts with <think>...</think> <answer>...</answer>.
    format_tags_weight: float = 0.5
    #: Added when the first <answer> span holds a ``(x1,y1),(x2,y2)`` box.
    format_box_weight: float = 0.5
    #: How boxes are read from the answer: "reference" (released reader) or an opt-in reader.
    box_format: str = "reference"
    #: box_format "qwen25_vl_abs": (min_pixels, max_pixels) of the Qwen2.5-VL processor the model ran
    #: with, to know the resized input its absolute pixels refer to (default: the processor's own).
    abs_pixels: tuple[int, ...] = QWEN25_PIXELS
    #: Level of an entity with no level in extra_info and none in the mastery table.
    default_level: str = DEFAULT_LEVEL_NAME
    #: Mastery table (JSON) for entities without ``extra_info["knowledge_level"]``; None: none.
    mastery_path: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in REWARD_PRESETS:
            raise ConfigError(f"karl.reward.preset: expected one of {sorted(REWARD_PRESETS)}, got {self.preset!r}")
        for key in ("tau", "cap", "format_tags_weight", "format_box_weight"):
            object.__setattr__(self, key, _number(getattr(self, key), f"karl.reward.{key}"))
        if not isinstance(self.inclusive_threshold, bool):
            raise ConfigError(
                f"karl.reward.inclusive_threshold: expected true or false, got {self.inclusive_threshold!r}"
            )
        pos_default, neg_default = REWARD_PRESETS[self.preset]
        object.__setattr__(self, "pos_scale", _float_table(
            pos_default if self.pos_scale is None else self.pos_scale, "karl.reward.pos_scale"))
        object.__setattr__(self, "neg_scale", _float_table(
            neg_default if self.neg_scale is None else self.neg_scale, "karl.reward.neg_scale"))
        if self.box_format not in BOX_FORMATS:
            raise ConfigError(f"karl.reward.box_format: expected one of {BOX_FORMATS}, got {self.box_format!r}")
        object.__setattr__(self, "abs_pixels", pixel_bounds(self.abs_pixels, "karl.reward.abs_pixels"))
        try:
            parse_level(self.default_level)
        except MasteryError as err:
            raise ConfigError(f"karl.reward.default_level: {err}") from None

    @property
    def default_level_number(self) -> int:
        return parse_level(self.default_level)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> RewardConfig:
        return cls(preset=preset, **overrides)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RewardConfig:
        return _from_mapping(cls, data, "karl.reward")


@dataclass(frozen=True)
class AdvantageConfig:
    """Mastery weighting of GRPO advantages (``algorithm.karl``; beyond the paper).

    After group normalisation, a positive advantage of a level-k sample is multiplied by
    ``alpha_plus[k]`` and a negative one by ``alpha_minus[k]``. All ones (the default) is plain
    GRPO, the paper's estimator.
    """

    alpha_plus: tuple[float, ...] = _ONES
    alpha_minus: tuple[float, ...] = _ONES
    #: Level for a sample that arrives without one.
    default_level: str = DEFAULT_LEVEL_NAME

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha_plus", _float_table(self.alpha_plus, "algorithm.karl.alpha_plus"))
        object.__setattr__(self, "alpha_minus", _float_table(self.alpha_minus, "algorithm.karl.alpha_minus"))
        try:
            parse_level(self.default_level)
        except MasteryError as err:
            raise ConfigError(f"algorithm.karl.default_level: {err}") from None

    @property
    def is_identity(self) -> bool:
        return self.alpha_plus == _ONES and self.alpha_minus == _ONES

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> AdvantageConfig:
        return _from_mapping(cls, data, "algorithm.karl")


@dataclass(frozen=True)
class MasteryConfig:
    """How mastery is measured and refreshed (``karl.mastery``)."""

    #: Lower ACC_avg bounds of levels 1..4 (KARL_METHOD.md section 2).
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    #: Table loaded at train begin; None: probe at train begin.
    table_path: str | None = None
    #: Probe set (parquet or JSONL of single-entity images); needed to probe or refresh.
    probe_data: str | None = None
    #: Re-probe every this many epochs (0: never); the paper measures once.
    refresh_every_epochs: int = 1
    #: Re-probe every this many steps instead (0: off).
    refresh_every_steps: int = 0
    #: "choice" (the letter the model picks in one constrained greedy token: the decision, cheapest on
    #: rollout servers), "logprob" (the four letters' log-probabilities: the decision and the expected
    #: accuracy) or "generate" (a free reply, parsed: the paper's protocol). choice and logprob decide alike.
    probe_mode: str = "choice"
    #: Images per entity in the probe (the paper uses up to 50).
    probe_images_per_entity: int = 50
    #: Questions per entity each probe asks, drawn afresh at every refresh from the entity's
    #: probe_images_per_entity (50: all of them, the paper's protocol); fewer make a refresh cheaper.
    refresh_questions_per_entity: int = 50
    #: Warn at the first step when a refresh is estimated to take more than this share of an epoch.
    max_refresh_share: float = 0.05
    #: Seconds a refresh may take before it is abandoned and the previous table kept.
    probe_timeout_s: float = 1800.0
    #: Probe requests in flight at once on the rollout servers (in-training probe only).
    probe_max_concurrency: int = 256
    #: "probe", "online" (Beta posterior from training rollouts) or "blend".
    source: str = "probe"
    #: Weight of the online estimate in "blend".
    online_weight: float = 0.5
    #: Per-refresh decay of the online posterior's counts.
    online_decay: float = 0.9
    #: Beta prior (alpha, beta) of the online acc@0.5 estimate; (1, 1) is uniform.
    online_prior: tuple[float, ...] = (1.0, 1.0)
    #: Decayed rollouts an entity needs before its online estimate is used (else it keeps its probe level).
    online_min_evidence: float = 8.0
    #: Seed of the probe's image sampling, option order and answer letters.
    seed: int = 0

    def __post_init__(self) -> None:
        bounds = tuple(float(t) for t in self.thresholds)
        if len(bounds) != NUM_LEVELS - 1 or any(a <= b for a, b in itertools.pairwise(bounds)):
            raise ConfigError(f"karl.mastery.thresholds: expected 4 strictly decreasing numbers, got {bounds}")
        object.__setattr__(self, "thresholds", bounds)
        if self.probe_mode not in ("choice", "logprob", "generate"):
            raise ConfigError(f"karl.mastery.probe_mode: expected 'choice', 'logprob' or 'generate', got "
                              f"{self.probe_mode!r}")
        if self.source not in ("probe", "online", "blend"):
            raise ConfigError(f"karl.mastery.source: expected 'probe', 'online' or 'blend', got {self.source!r}")
        for key in ("refresh_every_epochs", "refresh_every_steps"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"karl.mastery.{key}: expected an integer >= 0 (0: off), got {getattr(self, key)!r}")
        if not 0.0 < float(self.max_refresh_share) <= 1.0:
            raise ConfigError(f"karl.mastery.max_refresh_share: expected a share in (0, 1], got "
                              f"{self.max_refresh_share!r}")
        for key in ("probe_images_per_entity", "probe_max_concurrency", "refresh_questions_per_entity"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"karl.mastery.{key}: expected an integer >= 1, got {getattr(self, key)!r}")
        if not self.probe_timeout_s > 0:
            raise ConfigError(
                f"karl.mastery.probe_timeout_s: expected a number of seconds > 0, got {self.probe_timeout_s!r}"
            )
        if not 0.0 <= self.online_weight <= 1.0:
            raise ConfigError(f"karl.mastery.online_weight: expected a number in [0, 1], got {self.online_weight!r}")
        if not 0.0 < self.online_decay <= 1.0:
            raise ConfigError(f"karl.mastery.online_decay: expected a number in (0, 1], got {self.online_decay!r}")
        prior = tuple(float(v) for v in self.online_prior)
        if len(prior) != 2 or min(prior) <= 0:
            raise ConfigError(f"karl.mastery.online_prior: expected two numbers > 0 (alpha, beta), got {prior}")
        object.__setattr__(self, "online_prior", prior)
        if self.online_min_evidence < 0:
            raise ConfigError(
                f"karl.mastery.online_min_evidence: expected a number >= 0, got {self.online_min_evidence!r}"
            )

    def missing_inputs(self) -> str | None:
        """Why this configuration cannot set up a first table, or None when it can.

        The sources "probe" and "blend" start from a measured table: a file, or a probe at train
        begin. Checked by the trainer and, before Ray starts, by the recipe's Hydra callback.
        """
        if self.source in ("probe", "blend") and not (self.table_path or self.probe_data):
            return (
                f"karl.mastery.source={self.source!r} needs karl.mastery.table_path (a mastery table) or "
                "karl.mastery.probe_data (a probe set to measure one at train begin); "
                "or set karl.mastery.source=online"
            )
        return None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> MasteryConfig:
        return _from_mapping(cls, data, "karl.mastery")


@dataclass(frozen=True)
class KarlConfig:
    """Everything under the ``karl`` key of a verl config."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    mastery: MasteryConfig = field(default_factory=MasteryConfig)

    @staticmethod
    def check_sections(
        karl: Mapping[str, Any] | None, algorithm_karl: Mapping[str, Any] | None
    ) -> tuple[RewardConfig | None, MasteryConfig | None, list[str]]:
        """Build ``karl.reward``, ``karl.mastery`` and ``algorithm.karl`` apart, so that one error
        hides no other: (reward or None, mastery or None, problems), each problem "key: what is wrong"."""
        problems: list[str] = []
        if hasattr(karl, "_metadata"):  # an OmegaConf DictConfig
            from omegaconf import OmegaConf

            karl = OmegaConf.to_container(karl, resolve=True)  # type: ignore[assignment]
        karl = karl or {}
        unknown = sorted(set(karl) - {"reward", "mastery"})
        if unknown:
            problems.append(f"karl: unknown key(s) {unknown}; expected 'reward' and/or 'mastery'")
        built: list[Any] = []
        for cls, data in ((RewardConfig, karl.get("reward")), (MasteryConfig, karl.get("mastery")),
                          (AdvantageConfig, algorithm_karl)):
            try:
                built.append(cls.from_mapping(data))
            except ConfigError as err:  # its message starts with the key
                problems.append(str(err))
                built.append(None)
        return built[0], built[1], problems

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> KarlConfig:
        data = dict(data or {})
        unknown = sorted(set(data) - {"reward", "mastery"})
        if unknown:
            raise ConfigError(f"karl: unknown key(s) {unknown}; expected 'reward' and/or 'mastery'")
        return cls(RewardConfig.from_mapping(data.get("reward")), MasteryConfig.from_mapping(data.get("mastery")))
