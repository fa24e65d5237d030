"""The runs of tests/cpu/test_vllm_rollout.py, made by the vLLM environment's python (``.venv-vllm``).

The test suite runs in the default environment, which has no vLLM; this script runs in the one
``scripts/bootstrap.sh --vllm`` builds and writes what it measured to ``WORKDIR/vllm_runs.json``:

1. inputs: the dry run's built-in data and its tiny Qwen3-VL with 32-wide text heads, warmed up;
2. parity (its own child process, so vLLM's engine is gone before training): the same prompts
   through transformers (:class:`HFBackend`) and vLLM (:class:`VLLMBackend`, vLLM's offline engine on
   CPU) at temperature 0, and the probe in logprob and choice modes on both;
3. ``train``: ``main_ppo +recipe=karl_kvg_cpu_vllm`` for 2 epochs of 2 steps, the probe in choice
   mode at train begin and before epoch 2, knowledge injection for level-5 prompts through the
   inject agent loop, checkpoints at steps 2 and 4; the actor's learning rate is raised so that each
   step moves the policy well past the rollout-vs-actor bound (a stale vLLM would show);
4. ``resume``: a second ``main_ppo`` resumes from step 4 with the probe in logprob mode and trains step 5;
5. ``sync_failure``: a run whose vLLM cannot load synced weights (karl-verl's CPU weight fix off),
   with a 20 s weight-sync timeout: it must fail with the timeout's message, not hang.

    .venv-vllm/bin/python tests/_support/vllm_runs.py WORKDIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from references import write_references  # noqa: E402

#: Responses and probe answers compared between transformers and vLLM.
PARITY_PROMPTS, PARITY_TOKENS = 8, 48
#: Actor learning rate of the training runs (the dry run's is 1e-4).
LEARNING_RATE = 2e-3
#: The weight-sync timeout of the ``sync_failure`` run (seconds).
SYNC_TIMEOUT_S = 20


def _options(workdir: Path):
    from karl_verl.dryrun.pipeline import CPU_VLLM_RECIPE, DryRunOptions

    return DryRunOptions(workdir=workdir, progress=False, recipe=CPU_VLLM_RECIPE, rollout="vllm", timeout_s=600)


def _paths(workdir: Path) -> dict[str, Path]:
    return {"grounding": workdir / "data" / "grounding.parquet", "probe": workdir / "data" / "probe.parquet",
            "model": workdir / "tiny-qwen3-vl"}


def parity(workdir: Path) -> dict:
    """Greedy responses and probe answers of the same model through transformers and vLLM."""
    import numpy as np
    import pyarrow.parquet as pq

    from karl_verl.backends.base import GenerationRequest, SamplingSettings
    from karl_verl.backends.hf import HFBackend
    from karl_verl.backends.vllm_backend import VLLMBackend
    from karl_verl.probe.questions import build_questions, load_probe_set
    from karl_verl.probe.runner import run_probe

    paths = _paths(workdir)
    rows = pq.read_table(paths["grounding"]).to_pylist()[:PARITY_PROMPTS]
    requests = [GenerationRequest(messages=row["prompt"], images=list(row["images"])) for row in rows]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=PARITY_TOKENS)
    questions = build_questions(load_probe_set(paths["probe"]), per_entity=3, seed=0)
    backends = {"transformers": lambda: HFBackend.from_pretrained(paths["model"], progress=False),
                # On CPU, gpu_memory_utilization is the share of host memory vLLM may reserve.
                "vllm": lambda: VLLMBackend.create(str(paths["model"]), dtype="float32", enforce_eager=True,
                                                   max_model_len=2048, max_num_seqs=16, seed=0,
                                                   gpu_memory_utilization=0.2)}
    measured: dict[str, dict] = {}
    for name, make in backends.items():
        backend = make()
        start = time.perf_counter()
        texts = [outputs[0] for outputs in backend.generate(requests, greedy)]
        probes = {mode: run_probe(questions, backend, mode=mode, progress=False) for mode in ("logprob", "choice")}
        letter_probs = np.exp(backend.option_logprobs([_question_request(q) for q in questions], list("ABCD")))
        measured[name] = {"texts": texts, "seconds": time.perf_counter() - start,
                          "decisions": {mode: probe.decisions for mode, probe in probes.items()},
                          "letter_probs": (letter_probs / letter_probs.sum(axis=1, keepdims=True)).tolist()}
        tokenizer = backend.tokenizer
        measured[name]["token_ids"] = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        del backend
    return measured


def _question_request(question):
    from karl_verl.probe.runner import question_request

    return question_request(question)


def _train(workdir: Path, name: str, extra: list[str], *, total_epochs: int, steps: int,
           total_steps: int | None = None, env: dict[str, str] | None = None) -> dict:
    from karl_verl.dryrun.pipeline import train, training_overrides

    options = _options(workdir)
    paths = _paths(workdir)
    folder = "checkpoints" if name in ("train", "resume") else f"{name}_checkpoints"
    overrides = [*training_overrides(options, paths, checkpoints=workdir / folder, hydra_dir=workdir / "hydra" / name,
                                     total_epochs=total_epochs, total_steps=total_steps),
                 f"actor_rollout_ref.actor.optim.lr={LEARNING_RATE}", *extra]
    run = train(options, paths, name, overrides, steps, env=env)
    return {"returncode": run.returncode, "timed_out": run.timed_out, "seconds": run.seconds,
            "peak_memory_bytes": run.peak_memory_bytes, "metrics": str(run.metrics_path), "log": str(run.log_path),
            "shared_memory_removed": run.shared_memory_removed, "steps": len(run.steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--parity-only", action="store_true", help="(the parity child) measure and write parity.json")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    if args.parity_only:
        (workdir / "parity.json").write_text(json.dumps(parity(workdir)))
        return 0

    from karl_verl.dryrun.pipeline import DryRunReport, prepare_inputs

    report: dict = {"seconds": {}}
    start = time.perf_counter()
    prepare_inputs(_options(workdir), DryRunReport(), say=print)
    references = write_references(_paths(workdir)["grounding"], workdir / "references.jsonl")
    report["seconds"]["inputs"] = time.perf_counter() - start

    start = time.perf_counter()
    from karl_verl.cpu import VLLM_CPU_ENVIRONMENT
    from karl_verl.dryrun.launch import run_verl_child

    # The launcher also removes the shared memory vLLM's offline engine leaves in /dev/shm.
    child = run_verl_child([sys.executable, __file__, str(workdir), "--parity-only"], env=VLLM_CPU_ENVIRONMENT,
                           metrics_path=workdir / "metrics" / "parity.jsonl", log_path=workdir / "parity.log",
                           timeout_s=600, cwd=workdir)
    report["parity_returncode"] = child.returncode
    report["parity_shared_memory_removed"] = child.shared_memory_removed
    report["seconds"]["parity"] = time.perf_counter() - start

    inject = ["karl.inject.enable=true", f"karl.inject.responses_path={references}", "karl.inject.levels=[5]",
              "actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent"]
    report["train"] = _train(workdir, "train", [*inject, "karl.mastery.probe_mode=choice"], total_epochs=2, steps=4)
    if report["train"]["returncode"] == 0:
        report["resume"] = _train(workdir, "resume", ["karl.mastery.probe_mode=logprob"], total_epochs=3,
                                  steps=1, total_steps=5)
    report["sync_failure"] = _train(
        workdir, "sync_failure", ["trainer.total_training_steps=1"], total_epochs=1, steps=1,
        env={"KARL_VLLM_CPU_RESYNCABLE_WEIGHTS": "0", "KARL_WEIGHT_SYNC_TIMEOUT_S": str(SYNC_TIMEOUT_S)})
    (workdir / "vllm_runs.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
