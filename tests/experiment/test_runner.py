"""The experiment's main_ppo command line (greedy validation by default, sampled when asked) and its verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from karl_verl.experiment.runner import ArmResult, ExperimentOptions, arm_overrides, rises
from karl_verl.experiment.stats import Case

FILES = {name: Path(f"/w/{name}") for name in ("train", "val", "model", "table", "probe")}


def _val_kwargs(options: ExperimentOptions) -> dict[str, str]:
    prefix = "actor_rollout_ref.rollout.val_kwargs."
    return dict(o[len(prefix):].split("=", 1) for o in arm_overrides(options, "karl", FILES, Path("/w/run"))
                if o.startswith(prefix))


def test_validation_is_greedy_with_one_answer_per_case():
    assert _val_kwargs(ExperimentOptions(workdir=Path("/w"))) == {}  # verl's default: greedy


def test_sampled_validation_asks_verl_for_n_answers_at_the_validation_temperature():
    options = ExperimentOptions(workdir=Path("/w"), val_samples=8, val_temperature=1.0, temperature=1.2)
    assert _val_kwargs(options) == {"n": "8", "do_sample": "true", "temperature": "1.0", "top_p": "1.0",
                                    "top_k": "-1"}
    assert _val_kwargs(ExperimentOptions(workdir=Path("/w"), val_samples=4))["temperature"] == "1.2"


@pytest.mark.parametrize(("field", "value"), [("val_samples", 0), ("val_temperature", 0.0)])
def test_impossible_validation_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ExperimentOptions(workdir=Path("/w"), **{field: value}).check()


def test_an_unknown_check_group_is_refused():
    with pytest.raises(ValueError, match="check_group: expected one of all, known"):
        ExperimentOptions(workdir=Path("/w"), check_group="level_2").check()


def _cases(accs: dict[str, tuple[str, float]]) -> dict[str, Case]:
    return {truth: Case(entity=entity, acc=acc, iou=acc) for truth, (entity, acc) in accs.items()}


def test_the_check_group_decides_learned():
    """Known entities rise on every case while the others fall: LEARNED on ``known``, not on ``all``."""
    first = _cases({f"k{i}": ("Kavo", 0.25) for i in range(20)} | {f"u{i}": ("Mirel", 0.5) for i in range(20)})
    last = _cases({f"k{i}": ("Kavo", 0.5) for i in range(20)} | {f"u{i}": ("Mirel", 0.125) for i in range(20)})
    levels = {"Kavo": 2, "Mirel": 4}
    acc, iou = (rises(last, first, levels, ["Kavo"], metric=m) for m in ("acc", "iou"))
    assert [d.group for d in acc] == ["all", "known", "level_2", "level_4"]
    assert acc[1].difference == pytest.approx(0.25) and acc[1].low > 0 and acc[0].difference < 0
    verdicts = {}
    for group in ("all", "known"):
        arm = ArmResult("karl", 0, 1.0, validations={0: first, 40: last}, rise=acc, rise_iou=iou, check_group=group)
        verdicts[group] = (arm.learned, arm.checked().group)
    assert verdicts == {"all": (False, "all"), "known": (True, "known")}
    assert [d.group for d in rises(last, first, levels)] == ["all", "level_2", "level_4"]  # no known entities given
