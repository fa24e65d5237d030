"""The trainer's mastery bookkeeping (karl_verl/mastery_state.py): diffs, schedule, state file, metrics."""

import doctest
import json

import numpy as np
import pytest

from karl_verl import mastery_state as state_module
from karl_verl.mastery import MasteryError, MasteryTable
from karl_verl.mastery_state import (
    LevelStats,
    MasteryState,
    RefreshRecord,
    RefreshSchedule,
    diff_tables,
    distribution_metrics,
    refresh_metrics,
    sample_entity,
)
from karl_verl.online import OnlineMastery


def test_doctests():
    result = doctest.testmod(state_module)
    assert result.attempted > 0 and result.failed == 0


def test_diff_counts_mastery_direction():
    old = MasteryTable.from_scores({"up": 0.05, "down": 0.9, "same": 0.5, "gone": 0.5})
    new = MasteryTable.from_scores({"up": 0.5, "down": 0.2, "same": 0.6, "new": 0.1})
    assert diff_tables(old, new).__dict__ == {"moved_up": 1, "moved_down": 1, "unchanged": 1, "added": 1,
                                              "removed": 1}
    assert diff_tables(None, new).added == 4


class TestSchedule:
    def plain(self, every_epochs, every_steps, steps_per_epoch, steps):
        """The schedule written out: which steps start a new epoch / a new block of N steps."""
        due = []
        for step in range(2, steps + 1):
            done = step - 1
            if every_steps:
                hit = done % every_steps == 0
            elif every_epochs:
                hit = done % steps_per_epoch == 0 and (done // steps_per_epoch) % every_epochs == 0
            else:
                hit = False
            if hit:
                due.append(step)
        return due

    @pytest.mark.parametrize("every_epochs", [0, 1, 2, 3])
    @pytest.mark.parametrize("every_steps", [0, 1, 4])
    @pytest.mark.parametrize("steps_per_epoch", [1, 3, 5])
    def test_matches_the_plain_rule(self, every_epochs, every_steps, steps_per_epoch):
        schedule = RefreshSchedule(every_epochs, every_steps)
        got = [step for step in range(1, 31) if schedule.is_due(step, steps_per_epoch)]
        assert got == self.plain(every_epochs, every_steps, steps_per_epoch, 30)

    def test_step_one_is_never_a_refresh_and_steps_win(self):
        assert not RefreshSchedule(1, 1).is_due(1, 1)
        assert RefreshSchedule(1, 2).trigger == "step" and RefreshSchedule(1, 0).trigger == "epoch"
        assert [RefreshSchedule(e, s).describe() for e, s in [(0, 0), (1, 0), (2, 0), (1, 5)]] == [
            "off", "every epoch", "every 2 epochs", "every 5 steps"]
        assert not RefreshSchedule(0, 0).enabled


def full_state():
    online = OnlineMastery(prior_alpha=1.5, decay=0.8)
    online.observe(["Su-30", "F-16"], [1.0, 0.0])
    table = MasteryTable.from_scores({"Su-30": 0.8, "F-16": 0.2}, num_questions={"Su-30": 50, "F-16": 50}, epoch=1)
    history = [
        RefreshRecord(step=1, epoch=0, trigger="train_begin", source="probe", wall_time_s=12.5, num_entities=2,
                      distribution=table.distribution(), num_questions=100, num_unparseable=0, probe_mode="logprob",
                      num_skipped=4, skipped_by_kind={"unreadable image": 3, "prompt too long": 1},
                      carried_over=["MiG-29"]),
        RefreshRecord(step=5, epoch=1, trigger="epoch", source="probe", status="failed", error="ProbeTimeout: late"),
    ]
    return MasteryState(table=table, base_table=table, history=history, online=online, unknown_entities={"Tu-160"})


class TestState:
    def test_round_trip_through_a_file(self, tmp_path):
        state = full_state()
        path = state.save(tmp_path / "sub" / "state.json")
        again = MasteryState.load(path)
        assert again.to_json() == state.to_json()
        assert again.table.get("Su-30") == state.table.get("Su-30") and again.history == state.history
        assert again.online == state.online and again.unknown_entities == {"Tu-160"}
        assert json.loads(path.read_text())["format"] == "karl-verl/mastery-state-v1"
        assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left

    def test_a_record_written_before_the_skipped_fields_round_trips_unchanged(self):
        old = {"step": 5, "epoch": 1, "trigger": "epoch", "source": "probe", "status": "ok", "error": None,
               "wall_time_s": 1.0, "num_entities": 2, "distribution": {}, "moved_up": 0, "moved_down": 0, "added": 0,
               "removed": 0, "num_questions": 10, "num_unparseable": 0, "probe_mode": "choice"}
        assert RefreshRecord.from_json(old).to_json() == old
        skipped = RefreshRecord.from_json({**old, "num_skipped": 0})
        assert skipped.to_json() == {**old, "num_skipped": 0}  # 0 skipped is a measurement: kept

    def test_counts_and_initialized(self):
        assert not MasteryState().initialized and full_state().initialized
        assert full_state().num_failures == 1

    @pytest.mark.parametrize("text", ["[]", '{"format": "other"}', '{"format": "karl-verl/mastery-state-v1", '
                                      '"history": {}}', "{not json"])
    def test_bad_files_raise_with_the_path(self, tmp_path, text):
        path = tmp_path / "state.json"
        path.write_text(text)
        with pytest.raises(MasteryError, match="state.json"):
            MasteryState.load(path)

    def test_missing_file_raises(self, tmp_path):
        with pytest.raises(MasteryError, match="not found"):
            MasteryState.load(tmp_path / "nope.json")


class TestLevelStats:
    @pytest.mark.parametrize("seed", range(10))
    def test_matches_a_plain_loop_over_several_adds(self, seed):
        rng = np.random.default_rng(seed)
        stats, rows = LevelStats(), []
        for _ in range(rng.integers(1, 4)):
            n = int(rng.integers(0, 30))
            levels = rng.integers(1, 6, size=n)
            values = [rng.normal(size=n) for _ in range(4)]
            values[1][rng.random(n) < 0.2] = np.nan  # a sample without IoU
            stats.add(levels, *values)
            rows += list(zip(levels, *values, strict=True))
        metrics = stats.metrics()
        names = ("reward_mean", "iou_mean", "acc@0.5", "adv_mean")
        for level in range(1, 6):
            mine = [row for row in rows if row[0] == level]
            assert metrics[f"karl/level_{level}/count"] == len(mine)
            for k, name in enumerate(names, start=1):
                values = [row[k] for row in mine if not np.isnan(row[k])]
                key = f"karl/level_{level}/{name}"
                if values:
                    assert metrics[key] == pytest.approx(sum(values) / len(values))
                else:
                    assert key not in metrics

    def test_none_values_and_optional_quantities(self):
        stats = LevelStats()
        stats.add([3, 3], rewards=[1.0, 0.0], ious=[None, 0.5])
        metrics = stats.metrics()
        assert metrics["karl/level_3/iou_mean"] == 0.5 and "karl/level_3/adv_mean" not in metrics
        assert not stats.empty and LevelStats().empty

    @pytest.mark.parametrize("levels", [[0], [6]])
    def test_levels_out_of_range_raise(self, levels):
        with pytest.raises(ValueError, match="levels"):
            LevelStats().add(levels, [1.0])


def test_refresh_and_distribution_metrics():
    record = full_state().history[0]
    record.moved_up, record.moved_down = 3, 1
    metrics = refresh_metrics(record, failures_total=2, time_share=0.1)
    assert metrics["karl/refresh/ok"] == 1.0 and metrics["karl/refresh/failures_total"] == 2.0
    assert metrics["karl/refresh/entities_up"] == 3.0 and metrics["karl/refresh/probe_time_share"] == 0.1
    assert metrics["karl/refresh/skipped_questions"] == 4.0 and metrics["karl/refresh/answered_share"] == 0.96
    failed = refresh_metrics(full_state().history[1], failures_total=1, time_share=None)
    assert failed["karl/refresh/failed"] == 1.0 and "karl/refresh/entities_up" not in failed
    assert "karl/refresh/probe_time_share" not in failed
    # no probe counts (a timeout): no skipped/answered metrics rather than made-up ones
    assert "karl/refresh/answered_share" not in failed and "karl/refresh/skipped_questions" not in failed
    short = RefreshRecord(step=5, epoch=1, trigger="epoch", source="probe", status="failed", error="TooFewAnswers",
                          num_questions=20, num_skipped=5)
    assert refresh_metrics(short, failures_total=1, time_share=None)["karl/refresh/answered_share"] == 0.75
    dist = distribution_metrics(full_state().table)
    assert dist["karl/mastery/level_1/entities"] == 1.0 and dist["karl/mastery/level_4/share"] == 0.5


def test_sample_entity_prefers_extra_info():
    gt = {"ground_truth": "<|object_ref_start|>B<|object_ref_end|>"}
    assert sample_entity({"entity": "A"}, gt) == "A"
    assert sample_entity({"entity": "  "}, gt) == "B"
    assert sample_entity(None, "<|object_ref_start|>C<|object_ref_end|>") == "C"
    assert sample_entity({}, {}) is None


def test_sample_level_precedence():
    from karl_verl.mastery import MasteryEntry, MasteryTable
    from karl_verl.mastery_state import sample_level

    table = MasteryTable({"Su-30": MasteryEntry(level=2)})
    gt = {"ground_truth": "<|object_ref_start|>Su-30<|object_ref_end|>(1,2),(3,4)"}
    # The refreshed table wins over a level the dataset carries; then that level; then the default.
    assert sample_level({"knowledge_level": 5}, gt, table, 4) == (2, "Su-30", True)
    assert sample_level({"entity": "A380", "knowledge_level": "mostly correct"}, gt, table, 4) == (2, "A380", True)
    assert sample_level({"entity": "A380"}, gt, table, 4) == (4, "A380", False)
    assert sample_level(None, {"ground_truth": "(1,2),(3,4)"}, table, 5) == (5, None, False)
