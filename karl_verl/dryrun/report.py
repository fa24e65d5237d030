"""The dry run's report, built from what verl itself logged (its ``file`` logger's JSON lines).

Pure functions over the step records of :func:`karl_verl.dryrun.launch.read_step_metrics`: per step
and per mastery level the sample count, mean reward, IoU, acc@0.5 and mean |advantage| (the
``karl`` trainer's ``karl/level_k/*``), verl's policy and KL losses, and each mastery refresh (time,
level distribution, entities moved). The PNG shows each level's mean reward over the steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karl_verl.mastery import LEVEL_NAMES, NUM_LEVELS

LEVEL_QUANTITIES = ("count", "reward_mean", "iou_mean", "acc@0.5", "adv_abs_mean")


@dataclass
class StepRow:
    step: int
    epoch: int | None
    run: str
    levels: dict[int, dict[str, float]]
    policy_loss: float | None
    kl_loss: float | None
    seconds: float | None


@dataclass
class RefreshRow:
    step: int
    run: str
    ok: bool
    seconds: float | None
    distribution: dict[int, int]
    moved_up: int
    moved_down: int
    added: int


@dataclass
class TrainingSummary:
    steps: list[StepRow] = field(default_factory=list)
    refreshes: list[RefreshRow] = field(default_factory=list)


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def summarize(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> TrainingSummary:
    """Step and refresh rows of several runs' records, ``[(run name, records), ...]``, in order."""
    summary = TrainingSummary()
    for run, records in runs:
        for record in records:
            data, step = record["data"], int(record["step"])
            levels = {}
            for level in range(1, NUM_LEVELS + 1):
                values = {q: _number(data, f"karl/level_{level}/{q}") for q in LEVEL_QUANTITIES}
                levels[level] = {q: v for q, v in values.items() if v is not None}
            epoch = _number(data, "training/epoch")
            summary.steps.append(StepRow(step=step, epoch=None if epoch is None else int(epoch), run=run,
                                         levels=levels, policy_loss=_number(data, "actor/pg_loss"),
                                         kl_loss=_number(data, "actor/kl_loss"),
                                         seconds=_number(data, "timing_s/step")))
            ok, failed = _number(data, "karl/refresh/ok"), _number(data, "karl/refresh/failed")
            if ok or failed:
                summary.refreshes.append(RefreshRow(
                    step=step, run=run, ok=bool(ok), seconds=_number(data, "karl/refresh/probe_time_s"),
                    distribution={level: int(_number(data, f"karl/mastery/level_{level}/entities") or 0)
                                  for level in range(1, NUM_LEVELS + 1)},
                    moved_up=int(_number(data, "karl/refresh/entities_up") or 0),
                    moved_down=int(_number(data, "karl/refresh/entities_down") or 0),
                    added=int(_number(data, "karl/refresh/entities_added") or 0)))
    return summary


def format_steps(summary: TrainingSummary) -> list[str]:
    lines = [f"{'run':<7}{'step':>5}{'epoch':>6}  {'level':<24}{'samples':>8}{'reward':>9}{'IoU':>7}"
             f"{'acc@0.5':>9}{'|adv|':>8}{'pg_loss':>10}{'kl_loss':>10}"]
    for row in summary.steps:
        first = True
        for level in range(1, NUM_LEVELS + 1):
            stats = row.levels.get(level, {})
            if not stats.get("count"):
                continue
            head = (f"{row.run:<7}{row.step:>5}{'' if row.epoch is None else row.epoch + 1:>6}" if first
                    else " " * 18)
            losses = (f"{_fmt(row.policy_loss, 10, 4)}{_fmt(row.kl_loss, 10, 5)}" if first else "")
            lines.append(f"{head}  {level} {LEVEL_NAMES[level - 1]:<22}{int(stats['count']):>8}"
                         f"{_fmt(stats.get('reward_mean'), 9)}{_fmt(stats.get('iou_mean'), 7)}"
                         f"{_fmt(stats.get('acc@0.5'), 9)}{_fmt(stats.get('adv_abs_mean'), 8)}{losses}")
            first = False
    return lines


def format_refreshes(summary: TrainingSummary) -> list[str]:
    lines = []
    for index, refresh in enumerate(summary.refreshes):
        distribution = " / ".join(str(refresh.distribution[level]) for level in range(1, NUM_LEVELS + 1))
        when = "train begin" if index == 0 else "between epochs"
        status = "ok" if refresh.ok else "FAILED (previous table kept)"
        lines.append(f"  before step {refresh.step} ({when}, {refresh.run}): {status}, "
                     f"{_fmt(refresh.seconds, 0, 1).strip()} s; entities per level 1..5: {distribution}; "
                     f"{refresh.moved_up} up, {refresh.moved_down} down, {refresh.added} new")
    return lines


def _fmt(value: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def plot_level_rewards(summary: TrainingSummary, path: Path) -> Path:
    """PNG: mean reward per mastery level over the training steps (one line per level seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from karl_verl.atomic import atomic_write_bytes

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for level in range(1, NUM_LEVELS + 1):
        points = [(row.step, row.levels[level]["reward_mean"]) for row in summary.steps
                  if "reward_mean" in row.levels.get(level, {})]
        if points:
            steps, rewards = zip(*points, strict=True)
            axes.plot(steps, rewards, marker="o", label=f"{level} {LEVEL_NAMES[level - 1]}")
    for refresh in summary.refreshes:
        axes.axvline(refresh.step - 0.5, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("training step (dotted: mastery refresh before the step)")
    axes.set_ylabel("mean reward (KA-IoU + format)")
    axes.set_title("karl-verl dry run: reward per mastery level")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
