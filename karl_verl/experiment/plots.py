"""PNG plots of ``karl-verl experiment`` (matplotlib, Agg backend; written atomically)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karl_verl.atomic import atomic_write_bytes
from karl_verl.experiment.stats import mean_by_level

if TYPE_CHECKING:
    from karl_verl.experiment.runner import ExperimentReport


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(report: ExperimentReport, path: Path) -> Path:
    """Validation acc@0.5 over steps, one panel for all cases and one per initial mastery level, a line per arm."""
    plt = _pyplot()
    groups = ["all"] + [f"level_{k}" for k in range(1, 6) if k in set(report.initial_levels.values())]
    figure, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.4), dpi=110, sharey=True)
    axes = list(axes) if len(groups) > 1 else [axes]
    # Arms often coincide (the same greedy answers): each gets its own marker, size and dash so that
    # every line stays visible under the others.
    styles = [("o", 9, "-"), ("s", 6, "--"), ("^", 4, ":"), ("D", 3, "-.")]
    for index, (name, arm) in enumerate(report.arms.items()):
        curves = {step: mean_by_level(cases, report.initial_levels) for step, cases in sorted(arm.validations.items())}
        marker, size, dash = styles[index % len(styles)]
        for axis, group in zip(axes, groups, strict=True):
            points = [(step, values[group]) for step, values in curves.items() if group in values]
            if points:
                axis.plot(*zip(*points, strict=True), marker=marker, markersize=size, linestyle=dash, label=name)
    for axis, group in zip(axes, groups, strict=True):
        count = sum(1 for level in report.initial_levels.values() if f"level_{level}" == group)
        axis.set_title("all entities" if group == "all" else f"{group.replace('_', ' ')} ({count} entities)")
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("validation acc@0.5")
    axes[0].legend(fontsize=8)
    figure.suptitle("karl-verl experiment: validation acc@0.5 by initial mastery level", fontsize=10)
    return _save(figure, path)


def plot_refreshes(report: ExperimentReport, path: Path) -> Path:
    """Entities per mastery level at the initial probe and at each refresh, one panel per refreshing arm."""
    plt = _pyplot()
    arms = [(name, arm) for name, arm in report.arms.items() if arm.refreshes]
    figure, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 3.4), dpi=110, squeeze=False)
    initial = [sum(1 for level in report.initial_levels.values() if level == k) for k in range(1, 6)]
    for axis, (name, arm) in zip(axes[0], arms, strict=True):
        columns = [("start", initial)] + [
            (f"step {r['step']:.0f}\n+{r['up']:.0f}/-{r['down']:.0f}", [r.get(f"level_{k}", 0) for k in range(1, 6)])
            for r in arm.refreshes]
        bottom = [0.0] * len(columns)
        for k in range(5):
            heights = [counts[k] for _, counts in columns]
            axis.bar(range(len(columns)), heights, bottom=bottom, label=f"level {k + 1}")
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.set_xticks(range(len(columns)), [label for label, _ in columns], fontsize=7)
        axis.set_ylabel("entities")
        axis.set_title(f"{name}: mastery at each refresh (+up/-down)", fontsize=9)
    axes[0][-1].legend(fontsize=7)
    return _save(figure, path)
