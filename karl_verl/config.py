"""Configuration of KARL: one dataclass per concern, the single source of every number.

Pure module. The recipes (``recipes/recipe/karl_kvg*.yaml``) write no KARL number: Hydra config
nodes built from these dataclasses (:func:`hydra_default_nodes`) give ``karl.reward``,
``karl.mastery`` and ``algorithm.karl`` their values. Per-level tables are indexed by mastery
level 1..5 (see :mod:`karl_verl.mastery`), highest mastery first.

Reward presets (paper Tables 4 and 6; ``docs/METHOD.md``):

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
import difflib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    """Configuration values are wrong; each problem names its key and what was expected.

    ``problems`` lists every problem found (all fields of a section are checked before raising).
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def _float_table(value: Any, key: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{key}: expected {NUM_LEVELS} numbers (levels 1..5), got {value!r}")
    table = tuple(_number(v, key) for v in value)
    if len(table) != NUM_LEVELS:
        raise ConfigError(f"{key}: expected {NUM_LEVELS} numbers (levels 1..5), got {len(table)}: {table}")
    return table


def _nonnegative_table(value: Any, key: str) -> tuple[float, ...]:
    table = _float_table(value, key)
    if any(v < 0 for v in table) or not any(v > 0 for v in table):
        raise ConfigError(f"{key}: expected {NUM_LEVELS} numbers >= 0, at least one > 0, got {table}")
    return table


def _number(value: Any, key: str, low: float | None = None, high: float | None = None, *,
            low_open: bool = False) -> float:
    """A finite number, optionally in [low, high] (or (low, high] with ``low_open``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    too_low = low is not None and (number <= low if low_open else number < low)
    if too_low or (high is not None and number > high):
        bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{key}: expected a number in {bounds}, got {value!r}")
    return number


def _integer(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise ConfigError(f"{key}: expected an integer >= {low}, got {value!r}")
    if int(value) < low:
        raise ConfigError(f"{key}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _choice(value: Any, key: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ConfigError(f"{key}: expected one of {list(options)}, got {value!r}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _optional_path(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a file path or null, got {value!r}")
    return value


def _level_name(value: Any, key: str) -> str:
    try:
        parse_level(value)
    except MasteryError as err:
        raise ConfigError(f"{key}: {err}") from None
    return value


def pixel_bounds(value: Any, key: str) -> tuple[int, int]:
    """(min_pixels, max_pixels) of an image processor: two integers, 0 < min <= max."""
    try:
        low, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected two integers (min_pixels, max_pixels), got {value!r}") from None
    if not 0 < low <= high:
        raise ConfigError(f"{key}: expected 0 < min_pixels <= max_pixels, got ({low}, {high})")
    return low, high


def _thresholds(value: Any, key: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{key}: expected {NUM_LEVELS - 1} strictly decreasing numbers in [0, 1], got {value!r}")
    bounds = tuple(_number(v, key, 0.0, 1.0) for v in value)
    if len(bounds) != NUM_LEVELS - 1 or any(a <= b for a, b in itertools.pairwise(bounds)):
        raise ConfigError(f"{key}: expected {NUM_LEVELS - 1} strictly decreasing numbers in [0, 1], got {bounds}")
    return bounds


def _beta_prior(value: Any, key: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{key}: expected two numbers > 0 (alpha, beta), got {value!r}")
    prior = tuple(_number(v, key, 0.0, low_open=True) for v in value)
    if len(prior) != 2:
        raise ConfigError(f"{key}: expected two numbers > 0 (alpha, beta), got {prior}")
    return prior


def _check_fields(config: Any, prefix: str, checks: Mapping[str, Callable[[Any, str], Any]]) -> None:
    """Run every field's check, store the normalised values, and raise one ConfigError listing all problems."""
    problems: list[str] = []
    for name, check in checks.items():
        try:
            object.__setattr__(config, name, check(getattr(config, name), f"{prefix}.{name}"))
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)


def _unknown_key_problem(prefix: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    hint = f"did you mean {prefix}.{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
    return f"{prefix}.{key}: unknown key; {hint}"


def _from_mapping(cls: type, data: Mapping[str, Any] | None, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping (plain dict or OmegaConf), refusing unknown keys.

    Null values take the field's default. Unknown keys (each with the closest known key) and bad
    values are reported together in one :class:`ConfigError`.
    """
    if data is None:
        return cls()
    if hasattr(data, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [_unknown_key_problem(prefix, key, names) for key in data if key not in names]
    try:
        built = cls(**{key: value for key, value in data.items() if key in names and value is not None})
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return built


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
        # None takes the preset's table (the karl preset's when the preset itself is wrong, so that
        # the bad preset is the one problem reported).
        pos_default, neg_default = REWARD_PRESETS.get(self.preset, REWARD_PRESETS["karl"])
        _check_fields(self, "karl.reward", {
            "preset": lambda v, k: _choice(v, k, list(REWARD_PRESETS)),
            "tau": lambda v, k: _number(v, k, 0.0, 1.0, low_open=True),
            "inclusive_threshold": _boolean,
            "pos_scale": lambda v, k: _float_table(pos_default if v is None else v, k),
            "neg_scale": lambda v, k: _float_table(neg_default if v is None else v, k),
            "cap": lambda v, k: _number(v, k, 0.0, low_open=True),
            "format_tags_weight": lambda v, k: _number(v, k, 0.0),
            "format_box_weight": lambda v, k: _number(v, k, 0.0),
            "box_format": lambda v, k: _choice(v, k, BOX_FORMATS),
            "abs_pixels": pixel_bounds,
            "default_level": _level_name,
            "mastery_path": _optional_path,
        })

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
        _check_fields(self, "algorithm.karl", {
            "alpha_plus": _float_table,
            "alpha_minus": _float_table,
            "default_level": _level_name,
        })

    @property
    def is_identity(self) -> bool:
        return self.alpha_plus == _ONES and self.alpha_minus == _ONES

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> AdvantageConfig:
        return _from_mapping(cls, data, "algorithm.karl")


@dataclass(frozen=True)
class MasteryConfig:
    """How mastery is measured and refreshed (``karl.mastery``)."""

    #: Lower ACC_avg bounds of levels 1..4 (paper Sec. 3.1).
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
    #: A probe question that cannot be answered (unreadable image, prompt over max_model_len, server
    #: error, short answer) is skipped, not counted wrong; the probe still succeeds while at least this
    #: share of its questions is answered, else it fails (the previous table stays; at train begin the
    #: run stops). 0.95: a few bad images in thousands of questions cost nothing, while a systematic
    #: fault (replicas down, max_model_len too small, a broken image column) skips far more and fails
    #: loudly instead of measuring mastery on what is left. 1.0: any skipped question fails the probe.
    min_answered_share: float = 0.95
    #: Each probe image is resized (aspect kept) to at most this many pixels before its question is built,
    #: as qwen_vl_utils resizes a training image whose row carries ``max_pixels``. None: the training
    #: images' budget, the processor's own cap (Qwen3-VL-8B: 16,384 image tokens, so a 3000x3000 photo
    #: is a ~8,900-token question). The pre-flight reports the longest probe question against the
    #: rollout's max_model_len and, when one cannot fit, the budget that would.
    probe_max_pixels: int | None = None
    #: Probe requests in flight at once on the rollout servers (in-training probe only).
    probe_max_concurrency: int = 256
    #: Threads in the trainer that decode probe images and build question prompts (in-training probe
    #: only): images are read and decoded per request in flight, never the whole probe set at once.
    probe_prepare_workers: int = 8
    #: MiB of the trainer's memory for built probe prompts kept from one refresh to the next (in-training
    #: probe only): a cached question skips the chat template and the processor's pass over its image,
    #: the costly part of building it. Prompt ids are stored run-length encoded, ~0.6 KB per question of
    #: ~1,000 tokens, so 256 MiB holds the paper's 100,000 questions; past the budget the rest are built
    #: at every refresh. 0: build every prompt at every refresh.
    probe_prompt_cache_mib: int = 256
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
        _check_fields(self, "karl.mastery", {
            "thresholds": _thresholds,
            "table_path": _optional_path,
            "probe_data": _optional_path,
            "refresh_every_epochs": lambda v, k: _integer(v, k, 0),
            "refresh_every_steps": lambda v, k: _integer(v, k, 0),
            "probe_mode": lambda v, k: _choice(v, k, ("choice", "logprob", "generate")),
            "probe_images_per_entity": lambda v, k: _integer(v, k, 1),
            "refresh_questions_per_entity": lambda v, k: _integer(v, k, 1),
            "max_refresh_share": lambda v, k: _number(v, k, 0.0, 1.0, low_open=True),
            "probe_timeout_s": lambda v, k: _number(v, k, 0.0, low_open=True),
            "min_answered_share": lambda v, k: _number(v, k, 0.0, 1.0, low_open=True),
            "probe_max_pixels": lambda v, k: None if v is None else _integer(v, k, 1),
            "probe_max_concurrency": lambda v, k: _integer(v, k, 1),
            "probe_prepare_workers": lambda v, k: _integer(v, k, 1),
            "probe_prompt_cache_mib": lambda v, k: _integer(v, k, 0),
            "source": lambda v, k: _choice(v, k, ("probe", "online", "blend")),
            "online_weight": lambda v, k: _number(v, k, 0.0, 1.0),
            "online_decay": lambda v, k: _number(v, k, 0.0, 1.0, low_open=True),
            "online_prior": _beta_prior,
            "online_min_evidence": lambda v, k: _number(v, k, 0.0),
            "seed": lambda v, k: _integer(v, k, 0),
        })

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


def _levels(value: Any, key: str) -> tuple[int, ...]:
    """A non-empty set of mastery levels (numbers 1..5 or level names), as sorted level numbers."""
    if isinstance(value, (str, bytes, int)) or not isinstance(value, Iterable):
        value = [value]
    levels = []
    for item in value:
        try:
            levels.append(parse_level(item))
        except MasteryError as err:
            raise ConfigError(f"{key}: {err}") from None
    if not levels:
        raise ConfigError(f"{key}: expected at least one level (1..5)")
    return tuple(sorted(set(levels)))


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _optional_text(value: Any, key: str) -> str | None:
    return None if value is None else _text(value, key)


@dataclass(frozen=True)
class InjectConfig:
    """Knowledge-infused rollouts (``karl.inject``; karl-verl's addition, not the paper's).

    For a training prompt whose entity is at one of ``levels``, ``num_injected`` of its ``n``
    rollouts are an external response (a reference from ``responses_path`` or a teacher's reply)
    instead of a sample; the loss treats their tokens as off-policy with the shaped ratio
    ``p / (p + shaping_gamma)`` and no clipping.
    """

    enable: bool = False
    #: Levels (1..5 or names) whose prompts get external responses: by default the two the model does not know.
    levels: tuple[int, ...] = (4, 5)
    #: Rollouts of a group replaced by an external response; must be below actor_rollout_ref.rollout.n.
    num_injected: int = 1
    #: "file" (references per instance from responses_path) or "teacher" (an OpenAI-compatible endpoint).
    source: str = "file"
    #: JSONL or parquet with a ``key`` and a ``response`` column (source "file").
    responses_path: str | None = None
    #: The ``extra_info`` field whose value is a prompt's key in responses_path.
    key_field: str = "index"
    #: Base URL of an OpenAI-compatible API (``http://host:8000/v1``; source "teacher").
    teacher_url: str | None = None
    #: Served model name at teacher_url (source "teacher").
    teacher_model: str | None = None
    teacher_temperature: float = 0.0
    teacher_max_tokens: int = 1024
    #: Seconds one teacher reply may take, retries included; a late or failed reply falls back to a sample.
    teacher_timeout_s: float = 60.0
    #: Retries of a failed teacher request within teacher_timeout_s.
    teacher_retries: int = 1
    #: gamma of the off-policy shaping f(p) = p / (p + gamma).
    shaping_gamma: float = 0.1
    #: Group mean and std over the sampled (on-policy) rollouts only; injected ones are normalised by them too.
    on_policy_group_stats: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "karl.inject", {
            "enable": _boolean,
            "levels": _levels,
            "num_injected": lambda v, k: _integer(v, k, 1),
            "source": lambda v, k: _choice(v, k, ("file", "teacher")),
            "responses_path": _optional_path,
            "key_field": _text,
            "teacher_url": _optional_text,
            "teacher_model": _optional_text,
            "teacher_temperature": lambda v, k: _number(v, k, 0.0),
            "teacher_max_tokens": lambda v, k: _integer(v, k, 1),
            "teacher_timeout_s": lambda v, k: _number(v, k, 0.0, low_open=True),
            "teacher_retries": lambda v, k: _integer(v, k, 0),
            "shaping_gamma": lambda v, k: _number(v, k, 0.0, low_open=True),
            "on_policy_group_stats": _boolean,
        })
        if not self.enable:
            return
        if self.source == "file" and self.responses_path is None:
            raise ConfigError("karl.inject.responses_path: needed with karl.inject.source=file (a JSONL or parquet "
                              "file of reference responses with 'key' and 'response' columns)")
        if self.source == "teacher":
            problems = [f"karl.inject.{name}: needed with karl.inject.source=teacher ({what})"
                        for name, what in (("teacher_url", "an OpenAI-compatible base URL, e.g. http://host:8000/v1"),
                                           ("teacher_model", "the served model name"))
                        if getattr(self, name) is None]
            if self.teacher_url is not None and not self.teacher_url.startswith(("http://", "https://")):
                problems.append(f"karl.inject.teacher_url: expected an http:// or https:// URL, got "
                                f"{self.teacher_url!r}")
            if problems:
                raise ConfigError(problems)

    def check_group_size(self, n: int) -> None:
        """Raise when ``num_injected`` leaves no sampled rollout in a group of ``n`` (``rollout.n``)."""
        if self.enable and self.num_injected >= n:
            raise ConfigError(f"karl.inject.num_injected: expected fewer than actor_rollout_ref.rollout.n={n} "
                              f"(a group needs sampled rollouts), got {self.num_injected}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> InjectConfig:
        return _from_mapping(cls, data, "karl.inject")
def _optional_seed(value: Any, key: str) -> int | None:
    return None if value is None else _integer(value, key, 0)


@dataclass(frozen=True)
class CurriculumConfig:
    """Mastery-aware prompt sampling (``karl.curriculum``; karl-verl's addition, not the paper's).

    See :mod:`karl_verl.curriculum`. Off by default; on with uniform weights and the band-pass off
    it draws verl's own prompt order.
    """

    enable: bool = False
    #: Sampling weight of a prompt per mastery level 1..5 (>= 0); equal weights: verl's own order.
    level_weights: tuple[float, ...] = _ONES
    #: Band-pass: skip an entity whose rollouts' acc@0.5 rate is below this (0: no lower bound).
    min_success_rate: float = 0.0
    #: Band-pass: skip an entity whose rollouts' acc@0.5 rate is above this (1: no upper bound).
    max_success_rate: float = 1.0
    #: Counted rollouts an entity needs before the band-pass judges it.
    min_observations: float = 8.0
    #: A skipped entity's prompts weigh this times their level weight (0: never drawn while skipped).
    skipped_weight: float = 0.0
    #: A skipped entity comes back, counts reset, this many epochs after it was skipped (0: never).
    revisit_every_epochs: int = 1
    #: The band-pass counts are multiplied by this at every epoch start (1: no decay).
    decay: float = 1.0
    #: Seed of the draws; None: verl's ``data.seed`` (so uniform weights give verl's order).
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "karl.curriculum", {
            "enable": _boolean,
            "level_weights": _nonnegative_table,
            "min_success_rate": lambda v, k: _number(v, k, 0.0, 1.0),
            "max_success_rate": lambda v, k: _number(v, k, 0.0, 1.0),
            "min_observations": lambda v, k: _number(v, k, 0.0),
            "skipped_weight": lambda v, k: _number(v, k, 0.0, 1.0),
            "revisit_every_epochs": lambda v, k: _integer(v, k, 0),
            "decay": lambda v, k: _number(v, k, 0.0, 1.0, low_open=True),
            "seed": _optional_seed,
        })
        if self.min_success_rate > self.max_success_rate:
            raise ConfigError(f"karl.curriculum.min_success_rate: expected at most karl.curriculum.max_success_rate "
                              f"({self.max_success_rate}), got {self.min_success_rate}")

    @property
    def band_pass(self) -> bool:
        """True when the success-rate band can skip anything (a bound inside (0, 1))."""
        return self.min_success_rate > 0.0 or self.max_success_rate < 1.0

    @property
    def is_uniform(self) -> bool:
        """Equal level weights and no band-pass: the draws are verl's own order."""
        return len(set(self.level_weights)) == 1 and not self.band_pass

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> CurriculumConfig:
        return _from_mapping(cls, data, "karl.curriculum")


#: Named ``karl.curriculum`` settings, Hydra nodes ``karl/curriculum/<name>`` (recipe karl_kvg_curriculum
#: selects "focus"): partly known entities (levels 3, 4) three times as often as mastered ones (level 1);
#: an entity whose rollouts hit IoU 0.5 in under 5% or over 95% of 8 counted rollouts (two groups of
#: n=4) skipped for one epoch.
CURRICULUM_PRESETS: dict[str, dict[str, Any]] = {
    "focus": {"enable": True, "level_weights": (0.5, 1.0, 1.5, 1.5, 1.0), "min_success_rate": 0.05,
              "max_success_rate": 0.95, "min_observations": 8.0, "revisit_every_epochs": 1},
}


#: ``karl.ivgr.judge_url`` value for a rule-based judge that the trainer starts and stops itself.
LOCAL_JUDGE = "local"
#: ``karl.ivgr.val_stream`` values: validation prompts as in the dataset, or rendered as one iVGR stream.
VAL_STREAMS: tuple[str, ...] = ("plain", "textual", "grounded")


@dataclass(frozen=True)
class IvgrConfig:
    """Internalizing Visually Grounded Reasoning (``karl.ivgr``; iVGR, arXiv 2605.31096; see :mod:`karl_verl.ivgr`).

    Every training instance is rolled out twice: a "grounded" stream whose reasoning writes candidate
    boxes and a "textual" stream reasoning in words; each has its own GRPO group. A textual rollout's
    reward gets ``consistency_weight`` x an LLM judge's score of its reasoning against the instance's
    best cached grounded reasoning (the teacher cache).
    """

    enable: bool = False
    #: Weight of the judge's consistency score (0..1) added to a textual rollout's KARL reward.
    consistency_weight: float = 0.5
    #: A correct grounded rollout (IoU >= 0.5) enters the teacher cache when its IoU reward is at least this.
    tau: float = 0.3
    #: Base URL of the judge's OpenAI-compatible API (``http://host:8000/v1``); needed when enabled. ``local``:
    #: the trainer's process serves a rule-based judge (:class:`karl_verl.judge.RuleJudgeServer`) for the run's
    #: length: for CPU runs, which check the plumbing, not the quality of reasoning.
    judge_url: str | None = None
    #: Served model name at judge_url; None: the endpoint's first listed model.
    judge_model: str | None = None
    #: Judge calls per textual rollout; their valid scores are averaged (the released code: 4).
    judge_samples: int = 4
    #: Sampling temperature of a judge call (the released code: 0.5).
    judge_temperature: float = 0.5
    #: Tokens a judge reply may take (it is one score: 0.0, 0.3, 0.7 or 1.0).
    judge_max_tokens: int = 8
    #: Seconds one judge request may take.
    judge_timeout_s: float = 10.0
    #: Retries of a judge request after a connection error, a timeout or HTTP 408/429/5xx.
    judge_retries: int = 1
    #: Judge requests in flight at once.
    judge_max_concurrency: int = 8
    #: Seconds all judgements of one step may take; those unfinished by then count as failures (no consistency term).
    judge_budget_s: float = 60.0
    #: YAML or JSON file with the prompt templates (keys ``grounded``, ``textual``); None: the built-in ones.
    templates_path: str | None = None
    #: The ``extra_info`` field whose value identifies an instance (pairs the two streams, keys the teacher cache).
    key_field: str = "index"
    #: Prompts of validation: "plain" (the dataset's, unchanged: comparable with runs without iVGR), "textual"
    #: or "grounded" (the stream's template; "textual" measures iVGR's claim that the words-only stream grounds).
    val_stream: str = "plain"

    def __post_init__(self) -> None:
        _check_fields(self, "karl.ivgr", {
            "enable": _boolean,
            "consistency_weight": lambda v, k: _number(v, k, 0.0),
            "tau": lambda v, k: _number(v, k, 0.0, 1.0),
            "judge_url": _optional_text,
            "judge_model": _optional_text,
            "judge_samples": lambda v, k: _integer(v, k, 1),
            "judge_temperature": lambda v, k: _number(v, k, 0.0),
            "judge_max_tokens": lambda v, k: _integer(v, k, 1),
            "judge_timeout_s": lambda v, k: _number(v, k, 0.0, low_open=True),
            "judge_retries": lambda v, k: _integer(v, k, 0),
            "judge_max_concurrency": lambda v, k: _integer(v, k, 1),
            "judge_budget_s": lambda v, k: _number(v, k, 0.0, low_open=True),
            "templates_path": _optional_path,
            "key_field": _text,
            "val_stream": _text,
        })
        if self.val_stream not in VAL_STREAMS:
            raise ConfigError(f"karl.ivgr.val_stream: expected one of {list(VAL_STREAMS)}, got {self.val_stream!r}")
        if self.judge_url not in (None, LOCAL_JUDGE) and not self.judge_url.startswith(("http://", "https://")):
            raise ConfigError(f"karl.ivgr.judge_url: expected an http:// or https:// URL or {LOCAL_JUDGE!r}, got "
                              f"{self.judge_url!r}")
        if self.enable and self.judge_url is None:
            raise ConfigError("karl.ivgr.judge_url: needed with karl.ivgr.enable=true (an OpenAI-compatible base URL, "
                              f"e.g. http://host:8000/v1; {LOCAL_JUDGE!r}: a rule judge served by the trainer, for "
                              "CPU runs)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> IvgrConfig:
        return _from_mapping(cls, data, "karl.ivgr")


#: ``karl.runtime.attention`` values (see :mod:`karl_verl.gpu_stack`).
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "flash_attention_2", "sdpa", "eager")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the run executes on its machines (``karl.runtime``), not what it learns."""

    #: The actor's and reference's attention. ``auto``: ``flash_attention_2`` with verl's remove-padding where
    #: flash-attn imports in the process that resolves the config, else ``sdpa`` with remove-padding off; the
    #: choice is printed in the run's log. Any other value is passed to transformers as it is (and remove-padding
    #: follows it: on for flash_attention_2 only).
    attention: str = "auto"

    def __post_init__(self) -> None:
        _check_fields(self, "karl.runtime", {"attention": _text})
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"karl.runtime.attention: expected one of {list(ATTENTION_CHOICES)}, got "
                              f"{self.attention!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RuntimeConfig:
        return _from_mapping(cls, data, "karl.runtime")


@dataclass(frozen=True)
class KarlConfig:
    """Everything under the ``karl`` key of a verl config."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    mastery: MasteryConfig = field(default_factory=MasteryConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    ivgr: IvgrConfig = field(default_factory=IvgrConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def sections(cls) -> dict[str, type]:
        """The sections under ``karl`` (``reward``, ``mastery``, ...) and their dataclasses."""
        return {f.name: f.default_factory for f in dataclasses.fields(cls)}  # type: ignore[misc]

    @classmethod
    def check_sections(
        cls, karl: Mapping[str, Any] | None, algorithm_karl: Mapping[str, Any] | None
    ) -> tuple[RewardConfig | None, MasteryConfig | None, list[str]]:
        """Build every ``karl.*`` section and ``algorithm.karl`` apart, so that no error hides another:
        (reward or None, mastery or None, problems), each problem "key: what is wrong"."""
        problems: list[str] = []
        if hasattr(karl, "_metadata"):  # an OmegaConf DictConfig
            from omegaconf import OmegaConf

            karl = OmegaConf.to_container(karl, resolve=True)  # type: ignore[assignment]
        karl = karl or {}
        sections = cls.sections()
        problems.extend(_unknown_key_problem("karl", key, sections) for key in karl if key not in sections)
        if (mismatch := _preset_mismatch(karl.get("reward"))) is not None:
            problems.append(mismatch)
        built: dict[str, Any] = {}
        checks = [(name, section, karl.get(name)) for name, section in sections.items()]
        for name, section, data in [*checks, ("algorithm.karl", AdvantageConfig, algorithm_karl)]:
            try:
                built[name] = section.from_mapping(data)
            except ConfigError as err:  # each problem starts with its key
                problems.extend(err.problems)
                built[name] = None
        return built["reward"], built["mastery"], problems

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> KarlConfig:
        data = dict(data or {})
        sections = cls.sections()
        unknown = [_unknown_key_problem("karl", key, sections) for key in data if key not in sections]
        if unknown:
            raise ConfigError(unknown)
        return cls(**{name: section.from_mapping(data.get(name)) for name, section in sections.items()})


def _preset_mismatch(reward: Any) -> str | None:
    """A ``karl.reward.preset`` changed on its own while the scale tables still hold another preset's.

    The recipes write out the chosen preset's tables (so that the printed configuration shows them);
    changing only the name would silently keep the old tables.
    """
    if not isinstance(reward, Mapping) or reward.get("preset") not in REWARD_PRESETS:
        return None
    try:
        tables = (tuple(float(v) for v in reward["pos_scale"]), tuple(float(v) for v in reward["neg_scale"]))
    except (KeyError, TypeError, ValueError):
        return None
    preset = reward["preset"]
    if tables == REWARD_PRESETS[preset]:
        return None
    for other, other_tables in REWARD_PRESETS.items():
        if tables == other_tables:
            return (f"karl.reward.preset: {preset!r}, but karl.reward.pos_scale and neg_scale are preset {other!r}'s "
                    f"tables; choose a preset with karl/reward={preset} (it sets the preset's tables too), or set "
                    "karl.reward.pos_scale=null karl.reward.neg_scale=null")
    return None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def hydra_default_nodes() -> dict[str, dict[str, Any]]:
    """KARL's defaults as Hydra config nodes, ``{"group/name": node}``, built from the dataclasses.

    The recipes select them in their defaults list (``/karl/reward: karl``, ``/karl/mastery: default``,
    ``/karl/advantage@algorithm.karl: default``), so a composed configuration (``--cfg job``, the
    experiment tracker) shows every value a run uses while the numbers stay here. One
    ``karl/reward`` node per preset, with that preset's scale tables written out.
    """
    nodes: dict[str, Any] = {f"karl/reward/{preset}": RewardConfig(preset=preset) for preset in REWARD_PRESETS}
    nodes.update({f"karl/{name}/default": section() for name, section in KarlConfig.sections().items()
                  if name != "reward"})
    nodes.update({f"karl/curriculum/{name}": CurriculumConfig(**values) for name, values in CURRICULUM_PRESETS.items()})
    nodes["karl/advantage/default"] = AdvantageConfig()
    return {name: {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
            for name, config in nodes.items()}
