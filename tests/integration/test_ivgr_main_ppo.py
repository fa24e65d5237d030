"""iVGR through verl's real ``main_ppo`` on CPU (issue 20, point 6): both streams, the judge, a resume.

One small world (1 category, 3 of 4 entities known), a tiny Qwen3-VL warmed up on the two stream
templates (:func:`karl_verl.world.write_stream_warmup`: 100 steps of 4 examples, short templates
given to the run as ``karl.ivgr.templates_path``), a rule judge (:class:`RuleJudgeServer`), then
two ``main_ppo`` children sharing one checkpoint folder:

* the main run, 2 steps, a checkpoint at step 2, with ``karl.ivgr.judge_url=local`` (the trainer
  serves the rule judge itself): the teacher cache fills from correct grounded rollouts, the judge
  is asked, and the textual rows' reward is the KARL reward plus ``consistency_weight`` x the judge
  score, read back from TransferQueue by the trainer's metrics;
* the resume run (``trainer.resume_mode=auto``), steps 3 and 4 with a rule judge the test serves,
  which hangs past ``karl.ivgr.judge_budget_s`` at step 3 and answers HTTP 500 at step 4: the cache
  comes back from the checkpoint, both steps finish with every judgement counted as failed, no
  consistency term.

Each run validates once (``trainer.test_freq=2``) with another ``karl.ivgr.val_stream``: grounded in
the main run, textual in the resume run; verl's validation dump shows the prompts it rendered. The
resume run uses the package's built-in templates (no ``karl.ivgr.templates_path``): the long prompts
a GPU run renders go through verl's prompt handling too (the model, warmed up on the short ones,
answers them worse; the resume run's judge fails anyway).

Measured on the 2-core machine beside other jobs: 2 min 30 s at load ~5 (world, warm-up, probe and
main run 87 s, resume run 61 s), 4 min 13 s at load ~3-9 (warm-up 2 min 17 s, runs 53 s and 57 s);
7 min 30 s at load ~14, the warm-up (PyTorch on 2 threads) taking most of it. The assertions hold
whatever the sampled answers, as long as some grounded rollout is right (docs/ivgr.md, "Status").
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from karl_verl.config import LOCAL_JUDGE
from karl_verl.dryrun.launch import replace_overrides
from karl_verl.experiment.runner import ExperimentOptions, arm_overrides, prepare_stream_world
from karl_verl.ivgr import DEFAULT_TEMPLATES, TeacherCache
from karl_verl.judge import RuleJudgeServer
from karl_verl.world import WorldConfig

pytestmark = pytest.mark.slow

#: 8 training instances, 4 a step: steps 3 and 4 (the resume) see the instances steps 1 and 2 cached.
WORLD = WorldConfig(categories=1, known_per_category=3, train_images=8, val_images=4, warmup_images=16,
                    warmup_probe_per_entity=4, probe_images_per_entity=4)
#: Short stream templates: the warm-up's cost grows with the prompt (the built-in ones add ~200 tokens).
TEMPLATES = {"grounded": "{question}  Reason with boxes [x1,y1,x2,y2] in <think> </think>.",
             "textual": "{question}  Reason in words only in <think> </think>."}
#: 100 x 4 at 3e-3: 31 of 32 sampled answers well formed, half of the grounded ones right (IoU >= 0.5);
#: 50 x 4 gave 13 of 32 well formed. Temperature 0.7: at 1.0 a third of the answers were torn.
OPTIONS = dict(steps=2, test_freq=2, refresh_every_steps=0, batch_size=4, rollout_n=4, temperature=0.7,
               max_response_length=96, warmup_steps=100, warmup_batch_size=4, warmup_lr=3e-3, progress=False,
               timeout_s=900.0, world=WORLD)
WEIGHT, TAU, SAMPLES, BUDGET_S = 0.5, 0.3, 2, 3.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """World, stream warm-up, initial mastery table: the files both runs use."""
    options = ExperimentOptions(workdir=tmp_path_factory.mktemp("ivgr-main-ppo"), **OPTIONS)
    files, report = prepare_stream_world(options, TEMPLATES)
    return {"options": options, "files": files, "warmup_loss": report.warmup_loss}


def _run(setup: dict, name: str, judge_url: str, *changes: str, on_step=None, own_templates: bool = True):
    from karl_verl.dryrun.launch import run_main_ppo
    from karl_verl.dryrun.pipeline import CPU_RECIPE, training_environment

    options, files = setup["options"], setup["files"]
    run_dir = Path(options.workdir) / "run"
    overrides = replace_overrides(
        arm_overrides(options, "karl", files, run_dir),
        "trainer.test_freq=-1", "trainer.val_before_train=false", "trainer.save_freq=2",
        "karl.ivgr.enable=true", f"karl.ivgr.judge_url={judge_url}",
        *([f"karl.ivgr.templates_path={files['templates']}"] if own_templates else []),
        f"karl.ivgr.consistency_weight={WEIGHT}", f"karl.ivgr.tau={TAU}", f"karl.ivgr.judge_samples={SAMPLES}",
        f"karl.ivgr.judge_budget_s={BUDGET_S}", "karl.ivgr.judge_timeout_s=2", *changes)
    return run_main_ppo(CPU_RECIPE, overrides, metrics_path=run_dir / f"{name}.jsonl",
                        log_path=run_dir / f"{name}.log", env=training_environment(), timeout_s=options.timeout_s,
                        on_step=on_step, cwd=Path(options.workdir))


@pytest.fixture(scope="module")
def main_run(setup):
    """Steps 1 and 2 with ``karl.ivgr.judge_url=local``: the trainer serves the rule judge itself."""
    run = _run(setup, "main", LOCAL_JUDGE, "trainer.test_freq=2", "karl.ivgr.val_stream=grounded")
    return run, Path(setup["options"].workdir) / "run" / "checkpoints"


@pytest.fixture(scope="module")
def resume_run(setup, main_run):
    """Steps 3 and 4 from the step-2 checkpoint; the judge hangs at step 3 and answers HTTP 500 at step 4."""
    judge = RuleJudgeServer(delay_s=30.0).start()

    def after(step: int) -> None:
        if step == 3:  # step 4's judge call comes a rollout later (seconds): the switch is in place by then
            judge.delay_s, judge.mode = 0.0, "error500"

    try:
        run = _run(setup, "resume", judge.url, "trainer.resume_mode=auto", "trainer.total_training_steps=4",
                   "trainer.test_freq=2", "karl.ivgr.val_stream=textual", on_step=after, own_templates=False)
        requests = judge.requests
    finally:
        judge.stop()
    return run, requests


def _steps(run) -> dict[int, dict]:
    return {int(record["step"]): record["data"] for record in run.steps}


def _cache(checkpoints: Path, step: int) -> TeacherCache:
    return TeacherCache.load(checkpoints / f"global_step_{step}" / "karl_ivgr_cache.json")


def test_the_main_run_fills_the_cache_from_correct_grounded_rollouts(main_run, setup):
    run, checkpoints = main_run
    assert run.ok, run.log_tail(60)
    steps = _steps(run)
    assert sorted(steps) == [1, 2]
    cache = _cache(checkpoints, 2)
    assert len(cache) > 0 and steps[2]["ivgr/cache_size"] == len(cache)
    assert sum(s["ivgr/cache_updates"] for s in steps.values()) >= len(cache)
    entries = [cache.entry(str(index)) for index in range(WORLD.train_images)]
    for entry in filter(None, entries):
        # A grounded rollout: its reasoning writes a box, its answer is right.
        assert entry.correct and entry.iou >= TAU and "[" in entry.reasoning and "<answer>" in entry.response
    assert sum(entry is not None for entry in entries) == len(cache)  # keyed by extra_info["index"]


def test_both_streams_are_their_own_groups_with_uids_through_transfer_queue(main_run):
    run, _ = main_run
    for data in _steps(run).values():
        # 4 instances a step, each stream its own GRPO group: the "/<stream>" uids came back unchanged.
        assert data["ivgr/grounded/groups"] == data["ivgr/textual/groups"] == OPTIONS["batch_size"]
        assert data["ivgr/uid_mismatch"] == 0
        assert data["ivgr/textual_rollouts"] == OPTIONS["batch_size"] * OPTIONS["rollout_n"]
        for stream in ("grounded", "textual"):
            assert 0.0 <= data[f"ivgr/{stream}/acc@0.5"] <= 1.0 and math.isfinite(data[f"ivgr/{stream}/reward_mean"])
        assert "ivgr/cache_restored" not in data


def test_the_judge_is_asked_and_its_term_is_in_the_textual_rewards(main_run):
    run, _ = main_run
    steps = _steps(run)
    assert "karl: iVGR judge: a rule judge served by this process at http://127.0.0.1:" in \
        Path(run.log_path).read_text(errors="replace")
    assert sum(s["ivgr/judged_rollouts"] for s in steps.values()) > 0
    assert all(s["ivgr/judge_failures"] == 0 for s in steps.values())  # every judgement answered
    scored = [s for s in steps.values() if "ivgr/judge_score_mean" in s]
    assert scored and all(0.0 <= s["ivgr/judge_score_mean"] <= 1.0 for s in scored)
    for data in steps.values():
        # The term: weight x the mean judge score, over all textual rows (0 where none was judged) ...
        expected = WEIGHT * data.get("ivgr/judge_score_mean", 0.0) * data["ivgr/judged_rollouts"] / \
            data["ivgr/textual_rollouts"]
        assert data["ivgr/consistency_term_mean"] == pytest.approx(expected, abs=1e-6)
        # ... is in the rm_scores the advantage and the trainer's metrics read back from TransferQueue.
        assert data["ivgr/textual/reward_mean"] == pytest.approx(
            data["ivgr/textual/karl_reward_mean"] + data["ivgr/consistency_term_mean"], abs=1e-4)
    assert any(s["ivgr/consistency_term_mean"] > 0 for s in steps.values())


def test_a_resume_restores_the_cache_and_survives_a_hanging_then_failing_judge(main_run, resume_run):
    _, checkpoints = main_run
    run, requests = resume_run
    assert run.ok, run.log_tail(60)
    steps = _steps(run)
    assert sorted(steps) == [3, 4]
    saved = _cache(checkpoints, 2)
    assert steps[3]["ivgr/cache_restored"] == len(saved) > 0 and "ivgr/cache_restored" not in steps[4]
    assert steps[3]["ivgr/cache_size"] >= len(saved)
    final = _cache(checkpoints, 4)
    for key in (str(i) for i in range(WORLD.train_images)):
        if saved.entry(key) is not None:  # kept, or replaced by a better one
            assert final.entry(key) is not None and not saved.entry(key).beats(final.entry(key))
    assert requests > 0
    for step, data in steps.items():
        assert data["ivgr/judge_failures"] > 0 and data["ivgr/judged_rollouts"] == 0, step
        assert data["ivgr/consistency_term_mean"] == 0.0 and "ivgr/judge_score_mean" not in data
        assert data["ivgr/textual/reward_mean"] == pytest.approx(data["ivgr/textual/karl_reward_mean"], abs=1e-4)
    # The hanging judge cost the budget, not its 30 s delay (the upper bound is loose: a loaded machine is slow).
    assert BUDGET_S - 0.5 <= steps[3]["ivgr/judge_time_s"] < 15.0
    assert steps[4]["ivgr/judge_time_s"] < BUDGET_S
    # Each kind of failure is logged once: the hang (past the budget, or a request timed out) and the 500s.
    kinds = re.findall(r"karl: iVGR judge failed \(([^)]*)\)", Path(run.log_path).read_text(errors="replace"))
    assert "HTTP 500" in kinds and len(kinds) == len(set(kinds)) >= 2, kinds
    assert set(kinds) - {"HTTP 500"} <= {"over budget", "no reply"}, kinds


def test_the_warm_up_learned_the_stream_answers(setup):
    first, last = setup["warmup_loss"]
    assert last < 0.2 * first


def _validation(setup: dict, step: int) -> list[dict]:
    path = Path(setup["options"].workdir) / "run" / "validation" / f"{step}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_prompts_are_rendered_as_the_chosen_stream_and_never_expanded(setup, main_run, resume_run):
    import pyarrow.parquet as pq

    cases = pq.read_metadata(setup["files"]["val"]).num_rows
    def marks(templates: dict[str, str]) -> dict[str, str]:  # each template's text after the question
        return {stream: template.split("}", 1)[1].strip() for stream, template in templates.items()}

    # The main run renders the test's templates, the resume run the built-in ones.
    for step, stream, templates in ((2, "grounded", TEMPLATES), (4, "textual", dict(DEFAULT_TEMPLATES))):
        dumped = _validation(setup, step)
        assert len(dumped) == cases  # one greedy answer per case: validation prompts are never expanded
        other = "textual" if stream == "grounded" else "grounded"
        mark, other_mark = marks(templates)[stream], marks(templates)[other]
        assert all(mark in row["input"] and other_mark not in row["input"] for row in dumped), dumped[0]["input"]
