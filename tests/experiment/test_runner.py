"""The experiment's main_ppo command line: greedy validation by default, sampled when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from karl_verl.experiment.runner import ExperimentOptions, arm_overrides

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
