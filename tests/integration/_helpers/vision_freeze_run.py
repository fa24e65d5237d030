"""A few optimizer steps on the tiny Qwen3-VL built by verl's own FSDP engine code, with the vision freeze.

Runs in its own process (verl monkey-patches the Qwen3-VL forward when it builds the model, and a
gloo process group is process-wide): ``python vision_freeze_run.py WORKDIR TOWER PROJECTOR`` prints
one JSON object on its last line.

The path is verl's: :func:`install_vision_freeze` (what the recipe's Hydra callback calls), verl's
``EngineRegistry.get_engine_cls`` (what ``TrainingWorker`` asks), the engine's ``_build_module``
(the hook point), verl's ``apply_fsdp2`` (single-process gloo, CPU mesh) and verl's
``build_optimizer`` (AdamW, weight decay 0.1 so that a step would move any parameter it touched).
What verl's engine does around them on a GPU (moving to the device, broadcasting rank 0's weights)
needs an accelerator and is left out.
"""

import json
import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    workdir, tower, projector = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        print(json.dumps(run(workdir, tower, projector)))
    finally:
        dist.destroy_process_group()


def run(workdir: Path, tower: bool, projector: bool) -> dict:
    import torch
    from PIL import Image
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
    from verl.utils.fsdp_utils import apply_fsdp2
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.config.optimizer import build_optimizer
    from verl.workers.engine import EngineRegistry

    from karl_verl.integration.vision_freeze import VisionFreezeConfig, install_vision_freeze
    from karl_verl.testing.tiny_qwen3vl import load_tiny_processor, save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(workdir / "tiny")
    install_vision_freeze(VisionFreezeConfig(freeze_vision_tower=tower, freeze_multi_modal_projector=projector))
    engine_class = EngineRegistry.get_engine_cls("language_model", "fsdp2")

    engine = object.__new__(engine_class)  # the attributes _build_module reads, without the device setup
    engine.model_config = HFModelConfig(path=str(checkpoint), override_config={"attn_implementation": "sdpa"},
                                        use_remove_padding=False, enable_gradient_checkpointing=True)
    engine.engine_config = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False)
    engine.device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    engine.use_remove_padding = False
    engine.ulysses_sequence_parallel_size = 1
    module = engine._build_module()

    apply_fsdp2(module, {"mesh": engine.device_mesh, "reshard_after_forward": True,
                         "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)},
                engine.engine_config)
    optimizer = build_optimizer(module.parameters(), FSDPOptimizerConfig(lr=1e-2, weight_decay=0.1))
    module.train()

    processor = load_tiny_processor(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the car"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "<think>red</think><answer>(1,2),(3,4)"
                                                                           "</answer>"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[Image.new("RGB", (64, 64), (200, 30, 30))], return_tensors="pt")

    def full(parameter):
        return parameter.detach().full_tensor().clone()

    before = {name: full(p) for name, p in module.named_parameters()}
    steps = []
    for _ in range(3):
        # verl's patched Qwen3-VL forward returns logits only; next-token cross-entropy as verl's sft_loss.
        logits = module(**batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        loss.backward()
        steps.append({"loss": loss.item(),
                      "with_grad": sorted(name for name, p in module.named_parameters() if p.grad is not None)})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    names = {id(p): name for name, p in module.named_parameters()}
    return {
        "engine_class": engine_class.__name__,
        "fsdp2": isinstance(module, FSDPModule),
        "dtensor": all(type(p).__name__ == "DTensor" for p in module.parameters()),
        "parameters": sorted(before),
        "frozen": sorted(name for name, p in module.named_parameters() if not p.requires_grad),
        "changed": sorted(name for name, p in module.named_parameters() if not torch.equal(before[name], full(p))),
        "with_optimizer_state": sorted(names[id(p)] for p in optimizer.state),
        "steps": steps,
    }


if __name__ == "__main__":
    main()
