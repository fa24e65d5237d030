"""``karl-verl dryrun --stages 1,2``: verl's SFT trainer (stage 1, ``karl_cot_sft_cpu``) then ``main_ppo``
(stage 2, ``karl_kvg_cpu``) from the stage-1 checkpoint, on one CPU machine (about 1.5 minutes on 2
cores). Without the resumed run (``--resume-steps 0``): the session's dry run tests resuming."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import run_command


@pytest.mark.slow
def test_dryrun_stages_1_2_trains_sft_then_rl_from_its_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file

    result = run_command([sys.executable, "-m", "karl_verl", "dryrun", "--stages", "1,2", "--resume-steps", "0",
                             "--workdir", str(tmp_path), "--no-progress"],
                            timeout=1200, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "dryrun_report.json").read_text())
    assert report["ok"]
    losses = report["sft"]["losses"]
    assert len(losses) == 9 and losses[-1] < losses[0]
    assert "stage 1: verl's sft_trainer +recipe=karl_cot_sft_cpu: 9 steps" in result.stdout

    # The stage-1 checkpoint: vision tower and projector bitwise the start's (the freeze), language model trained.
    stage1 = Path(report["outputs"]["model"])
    assert stage1 == tmp_path / "sft_checkpoints" / "global_step_9" / "huggingface"
    start = load_file(tmp_path / "tiny-qwen3-vl" / "model.safetensors")
    trained = load_file(stage1 / "model.safetensors")
    visual = {name for name in start if name.startswith("model.visual.")}
    assert visual and all(torch.equal(start[name], trained[name]) for name in visual)
    assert all(not torch.equal(start[name], trained[name]) for name in set(start) - visual)

    # Stage 2 started from it: main_ppo's composed configuration names it, and both RL runs ran.
    config = (tmp_path / "logs" / "run1.log").read_text(encoding="utf-8", errors="replace")
    assert str(stage1) in config
    assert report["runs"]["run1"]["returncode"] == 0 and report["runs"]["run1"]["steps"] == 4
    assert "run2" not in report["runs"] and "resume" not in report["stage_seconds"]
    # Stage 2 reaches a reward: some stage-1 answers end inside the 48-token cap in the format (with
    # the long built-in rationales from a random model every stage-2 reward was exactly 0).
    rewards = [stats["reward_mean"] for step in report["steps"] if step["run"] == "run1"
               for stats in step["levels"].values() if "reward_mean" in stats]
    assert rewards and max(rewards) > 0.1, rewards
    # No process of either run is left (each child's session is killed after it ends).
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
