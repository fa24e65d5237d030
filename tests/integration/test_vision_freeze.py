"""The vision freeze of the stage-1 SFT run: frozen parameters get no gradient and stay bitwise unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from karl_verl.integration.vision_freeze import (
    VisionFreezeCallback,
    VisionFreezeConfig,
    VisionFreezeError,
    freeze_vision,
    frozen_engine_class,
    install_vision_freeze,
)
from karl_verl.testing.tiny_qwen3vl import build_tiny_model

HELPER = Path(__file__).parent / "_helpers" / "vision_freeze_run.py"


def train_through_verl(tmp_path, tower: bool, projector: bool) -> dict:
    result = subprocess.run([sys.executable, str(HELPER), str(tmp_path), str(int(tower)), str(int(projector))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fsdp2_steps_leave_vision_tower_and_projector_bitwise_unchanged(tmp_path):
    run = train_through_verl(tmp_path, tower=True, projector=True)
    assert run["engine_class"] == "KarlVisionFrozenFSDPEngineWithLMHead"
    assert run["fsdp2"] and run["dtensor"]  # sharded by verl's apply_fsdp2 (fully_shard)
    visual = sorted(name for name in run["parameters"] if name.startswith("model.visual."))
    language = sorted(name for name in run["parameters"] if not name.startswith("model.visual."))
    assert any(".merger." in n for n in visual) and any(".deepstack_merger_list." in n for n in visual)
    assert run["frozen"] == visual
    # AdamW with weight decay 0.1 moves every parameter it steps: all of the language model, none of visual.
    assert run["changed"] == language
    assert run["with_optimizer_state"] == language
    for step in run["steps"]:
        assert step["with_grad"] == language  # frozen tensors never get a .grad: no gradient memory
    losses = [step["loss"] for step in run["steps"]]
    assert losses[-1] < losses[0]


def test_projector_only_freeze_trains_the_vision_tower(tmp_path):
    run = train_through_verl(tmp_path, tower=False, projector=True)
    merger = sorted(name for name in run["parameters"] if name.startswith("model.visual.merger."))
    assert run["frozen"] == merger
    assert set(run["changed"]) == set(run["parameters"]) - set(merger)


def test_freeze_mapping_on_the_tiny_model():
    model = build_tiny_model()
    report = freeze_vision(model)
    names = {name for name, _ in model.named_parameters()}
    visual = {name for name in names if name.startswith("model.visual.")}
    assert set(report.vision_tower) | set(report.projector) == visual
    assert set(report.projector) == {name for name in visual if name.startswith("model.visual.merger.")}
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == visual
    assert report.frozen_numel == sum(p.numel() for name, p in model.named_parameters() if name in visual)
    assert "froze 21 vision-tower and 6 projector tensors of qwen3_vl" in report.format()

    model = build_tiny_model()
    report = freeze_vision(model, VisionFreezeConfig(freeze_vision_tower=True, freeze_multi_modal_projector=False))
    assert report.projector == () and all(p.requires_grad for n, p in model.named_parameters() if ".merger." in n)
    untouched = build_tiny_model()
    assert freeze_vision(untouched, VisionFreezeConfig(False, False)).frozen_numel == 0
    assert all(p.requires_grad for p in untouched.parameters())


def test_unknown_architectures_and_renamed_modules_are_refused():
    model = build_tiny_model()
    model.config.model_type = "llava"
    with pytest.raises(VisionFreezeError, match="no vision-freeze mapping for model type 'llava'"):
        freeze_vision(model)
    model = build_tiny_model()
    model.model.visual.renamed_merger = model.model.visual.merger
    del model.model.visual.merger
    with pytest.raises(VisionFreezeError, match=r"no parameter under \['visual.merger'\]"):
        freeze_vision(model)


def test_config_section_checks():
    assert VisionFreezeConfig.from_section({"freeze_vision_tower": None}) == VisionFreezeConfig()
    with pytest.raises(VisionFreezeError, match="unknown keys"):
        VisionFreezeConfig.from_section({"freeze_vision": True})
    with pytest.raises(VisionFreezeError, match="expected true or false"):
        VisionFreezeConfig.from_section({"freeze_vision_tower": "yes"})
    with pytest.raises(SystemExit, match="karl.sft: unknown keys"):
        VisionFreezeCallback().on_job_start(OmegaConf.create({"karl": {"sft": {"freeze_everything": True}}}))


@pytest.fixture
def engine_table():
    from verl.workers.engine import EngineRegistry

    saved = {backend: dict(table) for backend, table in EngineRegistry._engines["language_model"].items()}
    yield EngineRegistry._engines["language_model"]
    for backend, table in saved.items():
        EngineRegistry._engines["language_model"][backend].clear()
        EngineRegistry._engines["language_model"][backend].update(table)


def test_install_replaces_fsdp_engines_and_can_be_undone(engine_table):
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    originals = {backend: dict(engine_table[backend]) for backend in ("fsdp", "fsdp2")}
    install_vision_freeze(VisionFreezeConfig())
    install_vision_freeze(VisionFreezeConfig(freeze_multi_modal_projector=False))  # again: no double wrapping
    for backend in ("fsdp", "fsdp2"):
        for key, engine_class in engine_table[backend].items():
            assert engine_class.karl_base_engine is originals[backend][key]
            assert engine_class.__mro__[2] is originals[backend][key]
            assert engine_class.karl_vision_freeze == VisionFreezeConfig(freeze_multi_modal_projector=False)
    assert issubclass(engine_table["fsdp2"]["cuda"], FSDPEngineWithLMHead)
    VisionFreezeCallback().on_job_start(OmegaConf.create({"karl": {"sft": {"freeze_vision_tower": False,
                                                                            "freeze_multi_modal_projector": False}}}))
    assert {b: dict(engine_table[b]) for b in ("fsdp", "fsdp2")} == originals


def test_fsdp1_flat_parameters_are_refused():
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(frozen_engine_class(FSDPEngineWithLMHead, VisionFreezeConfig()))
    engine.engine_config = FSDPEngineConfig(strategy="fsdp", use_orig_params=False)
    with pytest.raises(VisionFreezeError, match="needs engine.strategy=fsdp2"):
        engine._build_module()


def test_verls_sft_trainer_with_the_recipe_keeps_the_vision_weights_bitwise(tmp_path):
    """``python -m verl.trainer.sft_trainer +recipe=karl_cot_sft`` itself, on CPU (karl-verl's CPU layer),
    one process: the saved Hugging Face checkpoint has the vision tower and projector of the start, and
    a trained language model."""
    import torch
    from safetensors.torch import load_file

    from karl_verl.cpu import environment
    from karl_verl.data.cot import write_builtin_cot_set
    from karl_verl.data.sft import convert_sharegpt
    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    convert_sharegpt([write_builtin_cot_set(tmp_path / "data", num_images=4)], tmp_path / "sft.parquet",
                     progress=False)
    start = save_tiny_checkpoint(tmp_path / "tiny")
    env = {**os.environ, **environment(), "PYTHONPATH": str(HELPER.parent / "pillow_qwen_vl_utils"),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    overrides = [
        "+recipe=karl_cot_sft", f"data.train_files={tmp_path / 'sft.parquet'}", f"model.path={start}",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}", "trainer.n_gpus_per_node=1", "trainer.device=cpu",
        "data.train_batch_size=2", "data.micro_batch_size_per_gpu=1", "data.num_workers=0", "optim.lr=1e-3",
        "engine.use_torch_compile=false", "engine.mixed_precision.param_dtype=fp32", "model.use_remove_padding=false",
        "model.override_config.attn_implementation=sdpa",
    ]
    result = subprocess.run([sys.executable, "-m", "verl.trainer.sft_trainer", *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "karl-verl: froze 21 vision-tower and 6 projector tensors of qwen3_vl" in result.stdout

    before = load_file(start / "model.safetensors")
    (saved,) = (tmp_path / "ckpt").glob("global_step_*/huggingface/model.safetensors")
    after = load_file(saved)
    assert set(before) == set(after)
    visual = {name for name in before if name.startswith("model.visual.")}
    assert visual and all(torch.equal(before[name], after[name]) for name in visual)
    assert all(not torch.equal(before[name], after[name]) for name in set(before) - visual)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
