"""Knowledge-infused rollouts on the real CPU path: verl's main_ppo with ``karl.inject`` on, and without.

Two short runs of ``karl_kvg_cpu`` on the dry run's own data and warmed-up tiny model (same seed,
same prompts, 4 steps of 2 prompts, lr 1e-3 in both), one with a reference response injected into
every group (``karl.inject.levels`` = all five levels here, so that the probe's outcome on the tiny
model does not matter) and one without. Each saves its Hugging Face weights at the end; the test
then measures, in this process, the mean per-token log-probability of the 8 reference responses
under the starting model and under each run's final model.

The injection run also turns on verl's rejection sampling (``rollout_rs``), which must reject no
injected row. Measured when this test was written (2 cores): starting model -2.552; with injection -2.158
(+0.39); without -2.570 (-0.02). The assertions leave a wide margin: a rise of more than 0.15 with
injection, less than 0.1 without, and a gap of more than 0.15 between the two.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from karl_verl.backends.hf import response_logprobs as _response_logprobs
from karl_verl.dryrun.pipeline import (
    DryRunOptions,
    _images_of,
    compose_recipe,
    train,
    training_overrides,
)

pytestmark = pytest.mark.slow

STEPS = 4



def reference_logprob(model_dir: Path, paths: dict, references: Path, workdir: Path) -> float:
    """Mean over the references of their mean per-token log-probability (EOS included) after their prompt."""
    from transformers import Qwen3VLForConditionalGeneration
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from karl_verl.testing.tiny_qwen3vl import load_tiny_processor

    processor = load_tiny_processor(paths["model"])
    config = compose_recipe("karl_kvg_cpu", [f"data.train_files={paths['grounding']}"])
    os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "hf-datasets-cache"))
    dataset = RLHFDataset(data_files=[str(paths["grounding"])], tokenizer=processor.tokenizer, config=config.data,
                          processor=processor)
    texts = {str(r["key"]): r["response"] for r in map(json.loads, references.read_text().splitlines())}
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir).eval()
    means = []
    with torch.no_grad():
        for i in range(len(dataset)):
            row = dataset[i]
            messages = row["raw_prompt"]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(text=[text], images=_images_of(messages) or None, return_tensors="pt")
            ids = processor.tokenizer(texts[str(row["extra_info"]["index"])], add_special_tokens=False)["input_ids"]
            means.append(_response_logprobs(model, inputs, [*ids, processor.tokenizer.eos_token_id]).mean().item())
    return sum(means) / len(means)


def test_injected_references_rise_in_log_probability_and_without_injection_they_do_not(dry_run, tmp_path):
    paths = dry_run.paths
    references = tmp_path / "references.jsonl"
    dry_run.write_references(references)
    options = DryRunOptions(workdir=tmp_path, progress=False, num_prompts=8, steps_per_epoch=STEPS)
    runs = {}
    for name, extra in (("inject", ["karl.inject.enable=true", f"karl.inject.responses_path={references}",
                                    "karl.inject.levels=[1,2,3,4,5]",
                                    "actor_rollout_ref.rollout.agent.default_agent_loop=karl_inject_agent",
                                    # verl's rejection sampling on the rollout/actor ratio: an injected row
                                    # left with its placeholder rollout log-probs (0.0) would be rejected.
                                    "algorithm.rollout_correction.rollout_rs=seq_mean_k1",
                                    "algorithm.rollout_correction.rollout_rs_threshold='0.5_2.0'"]),
                        ("plain", [])):
        overrides = training_overrides(options, paths, checkpoints=tmp_path / name / "checkpoints",
                                       hydra_dir=tmp_path / name / "hydra", total_epochs=1)
        overrides += [f"trainer.save_freq={STEPS}", "actor_rollout_ref.actor.optim.lr=1e-3",
                      "actor_rollout_ref.actor.checkpoint.save_contents=[model,extra,hf_model]", *extra]
        runs[name] = train(options, paths, name, overrides, STEPS)
        assert runs[name].ok, runs[name].log_tail()
        assert [int(r["step"]) for r in runs[name].steps] == list(range(1, STEPS + 1))

    # Every step of the injection run trained on injected rows, which reached the loss with the shaping.
    for record in runs["inject"].steps:
        data = record["data"]
        assert data["karl/inject/rows"] == 2 and data["karl/inject/prompts"] == 2
        assert data["karl/inject/missing_references"] == 0 and data["karl/inject/fallbacks"] == 0
        assert data["karl/inject/reward_mean"] >= 1.9  # the correct box in the format: (nearly) full reward
        assert 0 < data["karl/inject/prob_mean"] < 1 and data["karl/inject/logprob_mean"] < 0
        assert 0 < data["actor/karl_offpolicy_ratio_mean"] < 1 and data["actor/karl_offpolicy_loss"] < 0
        assert data["karl/level/reward_level_mismatch"] == 0
        # Injected rows reach verl's rollout correction with the actor's log-probs: none rejected, and the
        # rollout-vs-actor diagnostics measure the sampled rows only (placeholders gave a max near 0.9).
        assert data["karl/inject/aligned_rollout_rows"] == 2
        assert data["rollout_corr/rollout_rs_seq_masked_fraction"] == 0.0
        assert data["training/rollout_probs_diff_max"] < 0.2
    assert not any(key.startswith(("karl/inject/", "actor/karl_offpolicy"))
                   for record in runs["plain"].steps for key in record["data"])

    start = reference_logprob(paths["model"], paths, references, tmp_path)
    final = {name: reference_logprob(tmp_path / name / "checkpoints" / f"global_step_{STEPS}" / "actor" / "huggingface",
                                     paths, references, tmp_path) for name in runs}
    rise = {name: value - start for name, value in final.items()}
    assert rise["inject"] > 0.15, (start, final)
    assert rise["plain"] < 0.1, (start, final)
    assert rise["inject"] - rise["plain"] > 0.15, (start, final)
