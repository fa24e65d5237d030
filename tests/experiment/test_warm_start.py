"""``karl-verl experiment --warm-start DIR``: which earlier experiments a new one may start from."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from karl_verl.experiment.runner import ExperimentOptions, ExperimentReport, read_warm_start
from karl_verl.experiment.runner import _copy_warm_start as copy_warm_start


def _earlier(folder: Path, options: ExperimentOptions, *, levels=None) -> Path:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "initial_mastery.json").write_text('{"entities": {}}')
    report = {"options": json.loads(json.dumps(asdict(options), default=str)), "warmup_loss": [6.0, 0.1],
              "initial_levels": {"Kavo": 1, "Mirel": 5} if levels is None else levels}
    (folder / "experiment.json").write_text(json.dumps(report))
    return folder


def test_a_warm_start_from_the_same_settings_gives_its_model_table_and_levels(tmp_path):
    earlier = _earlier(tmp_path / "earlier", ExperimentOptions(workdir=tmp_path / "earlier", steps=20, arms=("karl",)))
    # Steps, arms and the RL settings may differ: they do not touch the warm-up.
    options = ExperimentOptions(workdir=tmp_path / "new", steps=4, test_freq=4, actor_lr=1e-3, warm_start=earlier)
    warm = read_warm_start(options)
    assert warm.model == earlier / "model" and warm.table == earlier / "initial_mastery.json"
    assert warm.initial_levels == {"Kavo": 1, "Mirel": 5} and warm.warmup_loss == (6.0, 0.1)

    report = ExperimentReport(options=options)
    (tmp_path / "new").mkdir()
    model = copy_warm_start(warm, report, tmp_path / "new", tmp_path / "new" / "initial_mastery.json")
    assert model == tmp_path / "new" / "model" and (model / "config.json").is_file()
    assert (tmp_path / "new" / "initial_mastery.json").read_text() == '{"entities": {}}'
    assert report.initial_levels == {"Kavo": 1, "Mirel": 5} and report.warmup_loss == (6.0, 0.1)


@pytest.mark.parametrize("change, named", [
    ({"warmup_steps": 100}, "warmup_steps (300 there, 100 here)"),
    ({"seed": 1}, "seed (0 there, 1 here)"),
    ({"world_val_images": 64}, "world ("),
])
def test_other_warm_up_settings_are_refused_naming_each(tmp_path, change, named):
    base = ExperimentOptions(workdir=tmp_path / "earlier")
    earlier = _earlier(tmp_path / "earlier", base)
    if "world_val_images" in change:
        options = replace(base, world=replace(base.world, val_images=change["world_val_images"]))
    else:
        options = replace(base, **change)
    with pytest.raises(ValueError, match="warmed up with other settings") as error:
        read_warm_start(replace(options, workdir=tmp_path / "new", warm_start=earlier))
    assert named in str(error.value) and str(earlier / "experiment.json") in str(error.value)


def test_a_folder_that_is_no_experiment_or_lacks_its_model_is_refused(tmp_path):
    options = ExperimentOptions(workdir=tmp_path / "new", warm_start=tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"nothing/experiment.json not found"):
        read_warm_start(options)
    earlier = _earlier(tmp_path / "earlier", ExperimentOptions(workdir=tmp_path / "earlier"))
    (earlier / "model" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"lacks .*model/config.json"):
        read_warm_start(replace(options, warm_start=earlier))
    (earlier / "model" / "config.json").write_text("{}")
    (earlier / "experiment.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_warm_start(replace(options, warm_start=earlier))


def test_the_command_refuses_a_bad_warm_start_before_any_work(tmp_path, capsys):
    from karl_verl.cli import main

    assert main(["experiment", "--warm-start", str(tmp_path / "nothing"), "--workdir", str(tmp_path / "w")]) == 2
    assert "experiment.json not found" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
