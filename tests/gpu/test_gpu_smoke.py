"""The GPU smoke test on a GPU node: ``karl-verl dryrun --device cuda`` end to end (docs/gpu_smoke_test.md).

Runs only where CUDA sees a GPU and a GPU build of vLLM imports (verl[vllm]: ``pip install ".[gpu]"``);
elsewhere every test is skipped with the reason. One run of the command (5 to 10 minutes) that all
tests read: the verdict, the steps of both ``main_ppo`` runs, vLLM as the rollout, the attention
choice in the run's log, the FSDP ranks' checkpoint shards. Its every part that needs no GPU is
tested on CPU in tests/dryrun/test_gpu_mode.py.

    pytest tests/gpu
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from karl_verl.dryrun.gpu import ATTENTION_LOG_PREFIX, DEFAULT_MAX_GPUS, GPU_COUNTS, read_log_evidence
from karl_verl.dryrun.launch import read_step_metrics
from karl_verl.gpu_stack import choose_attention

CUDA = torch.cuda.is_available()


def _vllm() -> tuple[bool, str]:
    if not CUDA:
        return False, "not checked without CUDA"
    from karl_verl.dryrun.gpu import vllm_status

    return vllm_status()


VLLM_USABLE, VLLM_DETAIL = _vllm()

pytestmark = [
    pytest.mark.slow,
    # The command's own limit is 15 minutes per main_ppo run; two runs and start-up fit in 45.
    pytest.mark.timeout(2700),
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with verl[vllm]: run on your GPU node: pytest tests/gpu"),
    pytest.mark.skipif(CUDA and not VLLM_USABLE,
                       reason=f"needs vLLM on the GPU ({VLLM_DETAIL}): pip install \".[gpu]\", then pytest tests/gpu"),
]


def expected_gpus() -> int:
    visible = torch.cuda.device_count()
    return max(count for count in GPU_COUNTS if count <= min(visible, DEFAULT_MAX_GPUS))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpu-smoke")
    result = subprocess.run([sys.executable, "-m", "karl_verl", "dryrun", "--device", "cuda", "--workdir", str(workdir),
                             "--no-progress"], capture_output=True, text=True, timeout=2600, cwd=workdir)
    report_path = workdir / "dryrun_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    lines = result.stdout.strip().splitlines()
    return {"result": result, "workdir": workdir, "report": report, "verdict": lines[-1] if lines else "",
            "log": (workdir / "logs" / "run1.log").read_text(errors="replace")
            if (workdir / "logs" / "run1.log").is_file() else ""}


def test_the_verdict_passed(smoke):
    result = smoke["result"]
    assert smoke["verdict"].startswith("GPU smoke test PASSED: "), (smoke["verdict"] + "\n" + result.stdout[-6000:]
                                                                   + result.stderr[-4000:])
    assert result.returncode == 0 and smoke["report"]["ok"] and smoke["report"]["verdict"] == smoke["verdict"]
    gpus = expected_gpus()
    assert f" on {gpus} GPU{'' if gpus == 1 else 's'} (vLLM " in smoke["verdict"]


def test_both_runs_trained_every_step_and_the_second_resumed(smoke):
    workdir = smoke["workdir"]
    run1 = read_step_metrics(workdir / "metrics" / "run1.jsonl")
    run2 = read_step_metrics(workdir / "metrics" / "run2.jsonl")
    assert [int(r["step"]) for r in run1] == [1, 2, 3, 4] and [int(r["step"]) for r in run2] == [5]
    assert smoke["report"]["resume"] == {"from_step": 4, "first_step": 5, "table_continued": True}
    for record in run1 + run2:
        data = record["data"]
        assert sum(data[f"karl/level_{k}/count"] for k in range(1, 6)) == 16  # 4 prompts x n=4
        assert "actor/pg_loss" in data and "actor/grad_norm" in data
    assert run1[0]["data"]["karl/refresh/ok"] == 1  # the probe at train begin, through the rollout servers


def test_vllm_was_the_rollout_and_the_cpu_layer_was_off(smoke):
    report = smoke["report"]
    assert report["device"] == "cuda" and report["recipe"] == "karl_kvg"
    assert read_log_evidence(smoke["log"]).vllm_served and report["log"]["vllm_served"]
    assert "karl_verl.cpu.plugin" not in smoke["log"]  # the CPU layer never loaded


def test_the_attention_choice_is_in_the_log(smoke):
    choice = choose_attention("auto")
    assert f"{ATTENTION_LOG_PREFIX}attn_implementation={choice.implementation}" in smoke["log"]
    assert f", {choice.implementation}, NCCL" in smoke["verdict"]
    assert smoke["report"]["gpu"]["attention"] == choice.implementation


def test_every_fsdp_rank_saved_its_shard(smoke):
    gpus = expected_gpus()
    actor = Path(smoke["workdir"]) / "checkpoints" / "global_step_4" / "actor"
    for rank in range(gpus):
        assert (actor / f"model_world_size_{gpus}_rank_{rank}.pt").is_file()
