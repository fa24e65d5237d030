"""Pre-flight checks (karl_verl/dryrun/preflight.py) on a valid built-in run and broken variants."""

import json
from pathlib import Path

import pandas as pd
import pytest

from karl_verl.dryrun.pipeline import DryRunOptions, DryRunReport, prepare_inputs
from karl_verl.dryrun.preflight import run_preflight
from karl_verl.mastery import MasteryTable


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("preflight")
    report = DryRunReport()
    paths = prepare_inputs(DryRunOptions(workdir=workdir, num_prompts=16, warmup_steps=0, progress=False), report,
                           say=lambda _: None)
    # A measured table of the probe set's entities (the offline probe on the tiny model).
    from karl_verl.backends.hf import HFBackend
    from karl_verl.probe.questions import build_questions, load_probe_set
    from karl_verl.probe.runner import run_probe
    from karl_verl.testing.tiny_qwen3vl import build_tiny_model, load_tiny_processor

    processor = load_tiny_processor(paths["model"])
    backend = HFBackend(build_tiny_model(seed=0, tokenizer=processor.tokenizer), processor, batch_size=8,
                        progress=False)
    probe = run_probe(build_questions(load_probe_set(paths["probe"]), per_entity=3, seed=0), backend,
                      mode="logprob", epoch=0, progress=False)
    report.outputs["mastery"] = str(probe.table.save(workdir / "mastery.json"))
    return workdir, report.outputs


def overrides(outputs, workdir, **changes):
    values = {
        "data.train_files": outputs["grounding"],
        "data.val_files": outputs["grounding"],
        "actor_rollout_ref.model.path": outputs["model"],
        "trainer.default_local_dir": str(workdir / "ckpt"),
        "karl.mastery.table_path": outputs["mastery"],
        "karl.mastery.probe_data": outputs["probe"],
    }
    values.update(changes)
    return [f"{key}={value}" for key, value in values.items() if value is not None]


def messages(report):
    return [str(problem) for problem in report.problems]


def test_valid_configuration_has_no_problem(built):
    workdir, outputs = built
    report = run_preflight("karl_kvg", overrides(outputs, workdir))
    assert report.problems == [], report.format()
    assert report.rows_checked == 32 and report.entities > 0


def test_every_problem_is_reported_at_once(built, tmp_path):
    workdir, outputs = built
    frame = pd.read_parquet(outputs["grounding"])
    # Row 1: two <image> placeholders for one image; row 2: no box; row 3: no entity marker.
    prompt = [dict(m) for m in frame.at[0, "prompt"]]
    prompt[0]["content"] = "<image><image>" + prompt[0]["content"].replace("<image>", "")
    frame.at[0, "prompt"] = prompt
    frame.at[1, "reward_model"] = {"style": "rule", "ground_truth": "<|object_ref_start|>X<|object_ref_end|>"}
    info = dict(frame.at[2, "extra_info"])
    info.pop("entity")
    frame.at[2, "extra_info"] = info
    frame.at[2, "reward_model"] = {"style": "rule", "ground_truth": "<|box_start|>(1,2),(3,4)<|box_end|>"}
    # Row 4: no entity marker either, though extra_info names the entity (the reward reads the marker).
    frame.at[3, "reward_model"] = {"style": "rule", "ground_truth": "<|box_start|>(1,2),(3,4)<|box_end|>"}
    broken = tmp_path / "broken.parquet"
    frame.to_parquet(broken)
    # A mastery table that misses entities, and a probe set whose category has 3 entities.
    table = MasteryTable.load(outputs["mastery"])
    MasteryTable({name: entry for name, entry in list(table.entries.items())[:1]}).save(tmp_path / "small.json")
    probe = pd.read_parquet(outputs["probe"])
    category = probe["category"].iloc[0]
    keep = sorted(probe.loc[probe["category"] == category, "entity"].unique())[:3]
    probe[(probe["category"] != category) | probe["entity"].isin(keep)].to_parquet(tmp_path / "probe.parquet")

    report = run_preflight("karl_kvg", overrides(
        outputs, workdir, **{"data.train_files": str(broken), "karl.mastery.table_path": str(tmp_path / "small.json"),
                             "karl.mastery.probe_data": str(tmp_path / "probe.parquet"),
                             "data.max_prompt_length": 40, "actor_rollout_ref.actor.optim.learning_rate": 1,
                             "karl.reward.tau": "abc", "reward.reward_model.rollout.name": "vllm"}))
    found = "\n".join(messages(report))
    assert "actor_rollout_ref.actor.optim.learning_rate: no such key" in found
    assert "reward.reward_model.rollout.name" not in found  # a "???" value in verl's config: the key exists
    assert "karl.reward.tau: expected a number, got 'abc'" in found
    assert ("broken.parquet row 1: <image> placeholders in field 'prompt' differ from the images in field "
            "'images': 2 vs 1") in found
    assert "broken.parquet row 2: ground truth has no readable" in found
    assert "broken.parquet row 3: ground truth has no <|object_ref_start|>" in found
    assert "broken.parquet row 4: ground truth has no <|object_ref_start|>" in found
    assert "above data.max_prompt_length=40" in found
    assert "absent from the mastery table" in found
    assert f"category {category!r} has 3 entities" in found


def test_unset_required_keys_and_missing_files(built, tmp_path):
    workdir, outputs = built
    report = run_preflight("karl_kvg", overrides(outputs, workdir, **{
        "actor_rollout_ref.model.path": None, "data.val_files": str(tmp_path / "nope.parquet")}))
    found = "\n".join(messages(report))
    assert "actor_rollout_ref.model.path: required by the recipe but not set" in found
    assert "file not found" in found and "nope.parquet" in found


def test_no_mastery_source(built):
    workdir, outputs = built
    report = run_preflight("karl_kvg", overrides(outputs, workdir, **{
        "karl.mastery.table_path": None, "karl.mastery.probe_data": None}))
    assert any("karl.mastery.source='probe' needs karl.mastery.table_path (a mastery table) or "
               "karl.mastery.probe_data" in m for m in messages(report))


def test_unknown_karl_key_is_a_problem_not_a_crash(built):
    workdir, outputs = built
    report = run_preflight("karl_kvg", overrides(outputs, workdir) + ["+karl.reward.tauu=1"])
    assert any("unknown key; did you mean karl.reward.tau?" in m for m in messages(report)), report.format()


def test_entities_absent_from_the_probe_set_when_there_is_no_table(built, tmp_path):
    workdir, outputs = built
    full = run_preflight("karl_kvg", overrides(outputs, workdir, **{"karl.mastery.table_path": None}))
    assert not any("absent from the probe set" in m for m in messages(full)), full.format()

    trained = sorted(set(pd.read_parquet(outputs["grounding"])["extra_info"].map(lambda info: info["entity"])))
    probe = pd.read_parquet(outputs["probe"])
    probe[probe["entity"] != trained[0]].to_parquet(tmp_path / "probe.parquet")
    report = run_preflight("karl_kvg", overrides(outputs, workdir, **{
        "karl.mastery.table_path": None, "karl.mastery.probe_data": str(tmp_path / "probe.parquet")}))
    assert any("1 training entity absent from the probe set" in m and repr(trained[0]) in m
               for m in messages(report)), report.format()


def test_prompt_lengths_without_torchvision_build_the_processor_part_by_part(built, tmp_path):
    """A Qwen3-VL checkpoint that is not the fixture: AutoProcessor gives no image processor here."""
    import shutil

    workdir, outputs = built
    model = tmp_path / "model"
    shutil.copytree(outputs["model"], model, ignore=shutil.ignore_patterns("karl_tiny_fixture.json"))
    report = run_preflight("karl_kvg", overrides(outputs, workdir, **{
        "actor_rollout_ref.model.path": str(model), "data.max_prompt_length": 40}))
    assert any("built part by part" in note for note in report.notes), report.format()
    assert any("above data.max_prompt_length=40" in m for m in messages(report)), report.format()


def test_command_exits_non_zero_on_problems(built, tmp_path):
    import subprocess
    import sys

    workdir, outputs = built
    args = overrides(outputs, workdir, **{"data.max_prompt_length": 10})
    result = subprocess.run([sys.executable, "-m", "karl_verl", "dryrun", *args], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "problem(s)" in result.stdout
    json.dumps(result.stdout)  # printable text


def test_rows_are_streamed_up_to_max_rows_and_a_bad_file_is_one_problem(built, tmp_path):
    workdir, outputs = built
    report = run_preflight("karl_kvg", overrides(outputs, workdir), max_rows=5)
    assert report.rows_checked == 10 and report.problems == []  # 5 from train_files, 5 from val_files
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    report = run_preflight("karl_kvg", overrides(outputs, workdir, **{"data.val_files": str(tmp_path / "bad.parquet")}))
    found = [m for m in messages(report) if "bad.parquet" in m]
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'bad.parquet'}: not a readable parquet file")


def test_prompt_lengths_of_8b_sized_prompts(tmp_path):
    """A tiny checkpoint with Qwen3-VL-8B's image geometry and photo-sized rows: 448x448 to 1600x1200 fit
    karl_kvg's data.max_prompt_length; the 3000x3000 row (8,836 image tokens, more than the rollout's
    max_model_len) is reported with its file, row and token count."""
    from omegaconf import OmegaConf
    from sized_data import expected_prompt_lengths, write_sized_grounding_parquet, write_sized_probe_parquet

    from karl_verl.synthetic_images import REALISTIC_IMAGE_SIZES
    from karl_verl.testing.tiny_qwen3vl import load_tiny_processor, save_tiny_checkpoint

    assert REALISTIC_IMAGE_SIZES[-1] == (3000, 3000)
    model = save_tiny_checkpoint(tmp_path / "tiny-8b", image_geometry="qwen3_vl_8b")
    train = write_sized_grounding_parquet(tmp_path / "train.parquet")
    val = write_sized_grounding_parquet(tmp_path / "val.parquet", sizes=[(448, 448)])
    probe = write_sized_probe_parquet(tmp_path / "probe.parquet", sizes=[(448, 448)] * 4)
    report = run_preflight("karl_kvg", [
        f"data.train_files={train}", f"data.val_files={val}", f"actor_rollout_ref.model.path={model}",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}", f"karl.mastery.probe_data={probe}"])
    assert report.rows_checked == 5 and report.problems, report.format()
    assert not any("cannot encode" in m for m in messages(report)), report.format()
    [problem] = [p for p in report.problems if p.kind is not None and "max_prompt_length" in p.kind]
    assert (problem.file, problem.row) == (str(train), 4)
    assert problem.kind == "prompt above data.max_prompt_length=4800 after image expansion"
    lengths = expected_prompt_lengths(load_tiny_processor(model), train)
    assert max(lengths[:3]) <= 4800 < lengths[3]
    expected = lengths[3]
    assert problem.detail == f"{expected} tokens"
    # The recipe file itself, not compose_recipe: a composition costs seconds.
    recipe = OmegaConf.load(Path(__file__).parents[2] / "recipes" / "recipe" / "karl_kvg.yaml")
    assert expected > recipe.actor_rollout_ref.rollout.max_model_len == 8192
    assert f"{train} row 4: prompt above data.max_prompt_length=4800" in report.format()


def test_a_probe_question_over_max_model_len_is_refused_with_the_budget_that_fits(tmp_path):
    """Qwen3-VL-8B's geometry: a 3000x3000 probe photo is a ~8,900-token question, over karl_kvg's max_model_len
    8192, so every refresh would skip it; the pre-flight names its row and a karl.mastery.probe_max_pixels under
    which it fits, and with that budget the same probe set passes, its longest question reported."""
    from sized_data import write_sized_grounding_parquet, write_sized_probe_parquet

    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny-8b", image_geometry="qwen3_vl_8b")
    data = write_sized_grounding_parquet(tmp_path / "train.parquet", sizes=[(448, 448)])
    probe = write_sized_probe_parquet(tmp_path / "probe.parquet", sizes=[(448, 448)] * 3 + [(3000, 3000)])
    base = [f"data.train_files={data}", f"data.val_files={data}", f"actor_rollout_ref.model.path={model}",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}", f"karl.mastery.probe_data={probe}"]
    report = run_preflight("karl_kvg", base)
    [problem] = [m for m in messages(report) if "probe question" in m]
    assert problem.startswith(f"{probe}: 1 probe question leaves no room under max_model_len 8192 "
                              "(actor_rollout_ref.rollout.max_model_len), so it would be skipped at every refresh: ")
    assert f"{probe}: row 4, field 'image' (entity " in problem
    budget = int(problem.rsplit("probe_max_pixels to at most ", 1)[1].split()[0])
    assert 1600 * 1200 < budget < 3000 * 3000
    [note] = [n for n in report.notes if n.startswith("longest probe question")]
    assert "row 4" in note and int(note.split()[3]) > 8192

    report = run_preflight("karl_kvg", [*base, f"karl.mastery.probe_max_pixels={budget}"])
    assert not [m for m in messages(report) if "probe question" in m], report.format()
    [note] = [n for n in report.notes if n.startswith("longest probe question")]
    assert "row 4" in note and 8000 < int(note.split()[3]) <= 8192 - 2
    assert f"probe_max_pixels={budget}" in note
