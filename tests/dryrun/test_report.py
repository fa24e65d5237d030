"""The dry run's report from verl's file-logger records (karl_verl/dryrun/report.py), on hand-made records."""

from __future__ import annotations

import pytest

from karl_verl.dryrun.report import (
    RefreshRow,
    TrainingSummary,
    format_refreshes,
    format_steps,
    plot_level_rewards,
    summarize,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FIRST_RUN = [
    {
        "step": 1,
        "data": {
            "training/epoch": 0,
            "actor/pg_loss": 0.1234,
            "actor/kl_loss": 0.00123,
            "timing_s/step": 12.5,
            "karl/level_1/count": 4,
            "karl/level_1/reward_mean": 0.5,
            "karl/level_1/iou_mean": 0.4,
            "karl/level_1/acc@0.5": 0.25,
            "karl/level_1/adv_abs_mean": 0.8,
            "karl/level_3/count": 2,
            "karl/level_3/reward_mean": float("nan"),
            "karl/level_3/iou_mean": 0.1,
            "karl/refresh/ok": 1,
            "karl/refresh/probe_time_s": 3.25,
            "karl/mastery/level_1/entities": 5,
            "karl/mastery/level_2/entities": 3,
            "karl/mastery/level_5/entities": 1,
            "karl/refresh/entities_up": 0,
            "karl/refresh/entities_down": 0,
            "karl/refresh/entities_added": 9,
        },
    },
    {
        "step": 2,
        "data": {
            "training/epoch": 0,
            "actor/pg_loss": True,
            "actor/kl_loss": "0.1",  # not numbers: shown as missing
            "karl/level_2/count": 4,
            "karl/level_2/reward_mean": 1.0,
            "karl/level_4/count": 0,
        },
    },
]
SECOND_RUN = [
    {
        "step": 3,
        "data": {
            "training/epoch": 1,
            "karl/level_1/count": 3,
            "karl/level_1/reward_mean": 0.75,
            "karl/refresh/failed": 1,
            "karl/refresh/ok": 0,
        },
    },
]


@pytest.fixture
def summary() -> TrainingSummary:
    return summarize([("run1", FIRST_RUN), ("run2", SECOND_RUN)])


def test_summarize_reads_levels_losses_and_timing(summary):
    assert [(row.run, row.step, row.epoch) for row in summary.steps] == [("run1", 1, 0), ("run1", 2, 0), ("run2", 3, 1)]
    first, second, third = summary.steps
    assert first.levels[1] == {"count": 4.0, "reward_mean": 0.5, "iou_mean": 0.4, "acc@0.5": 0.25, "adv_abs_mean": 0.8}
    assert first.levels[3] == {"count": 2.0, "iou_mean": 0.1}  # NaN dropped
    assert first.levels[2] == {} and set(first.levels) == {1, 2, 3, 4, 5}
    assert (first.policy_loss, first.kl_loss, first.seconds) == (0.1234, 0.00123, 12.5)
    assert (second.policy_loss, second.kl_loss, second.seconds) == (None, None, None)
    assert second.levels[4] == {"count": 0.0}
    assert third.levels[1] == {"count": 3.0, "reward_mean": 0.75}


def test_summarize_reads_each_refresh(summary):
    assert summary.refreshes == [
        RefreshRow(
            step=1,
            run="run1",
            ok=True,
            seconds=3.25,
            distribution={1: 5, 2: 3, 3: 0, 4: 0, 5: 1},
            moved_up=0,
            moved_down=0,
            added=9,
        ),
        RefreshRow(
            step=3,
            run="run2",
            ok=False,
            seconds=None,
            distribution={1: 0, 2: 0, 3: 0, 4: 0, 5: 0},
            moved_up=0,
            moved_down=0,
            added=0,
        ),
    ]
    assert summarize([("run1", FIRST_RUN[1:])]).refreshes == []  # a step without refresh metrics


def test_format_steps_one_line_per_level_with_samples(summary):
    header, *lines = format_steps(summary)
    assert header.split() == [
        "run",
        "step",
        "epoch",
        "level",
        "samples",
        "reward",
        "IoU",
        "acc@0.5",
        "|adv|",
        "pg_loss",
        "kl_loss",
    ]
    assert len(lines) == 4  # step 1: levels 1 and 3; step 2: level 2 (level 4 had no samples); step 3: level 1
    assert lines[0].split() == [
        "run1",
        "1",
        "1",
        "1",
        "completely",
        "correct",
        "4",
        "0.500",
        "0.400",
        "0.250",
        "0.800",
        "0.1234",
        "0.00123",
    ]
    # A second level of the same step: no run/step/epoch and no losses again; a NaN reward shows as "-".
    assert lines[1].startswith(" " * 18) and lines[1].split() == [
        "3",
        "partially",
        "correct",
        "2",
        "-",
        "0.100",
        "-",
        "-",
    ]
    assert lines[2].split()[:4] == ["run1", "2", "1", "2"] and lines[2].split()[-2:] == ["-", "-"]
    assert lines[3].split()[:4] == ["run2", "3", "2", "1"]  # epochs are shown from 1
    assert format_steps(TrainingSummary()) == [header]


def test_format_refreshes(summary):
    assert format_refreshes(summary) == [
        "  before step 1 (train begin, run1): ok, 3.2 s; entities per level 1..5: 5 / 3 / 0 / 0 / 1; "
        "0 up, 0 down, 9 new",
        "  before step 3 (between epochs, run2): FAILED (previous table kept), - s; entities per level 1..5: "
        "0 / 0 / 0 / 0 / 0; 0 up, 0 down, 0 new",
    ]
    assert format_refreshes(TrainingSummary()) == []


def test_plot_level_rewards_writes_a_png(summary, tmp_path):
    path = plot_level_rewards(summary, tmp_path / "level_rewards.png")
    assert path == tmp_path / "level_rewards.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["level_rewards.png"]  # no temporary file left
    empty = plot_level_rewards(TrainingSummary(), tmp_path / "empty.png")
    assert empty.read_bytes().startswith(PNG_SIGNATURE)
