"""The in-training probe on the CPU rollout server and the tiny model: choice and logprob mode agree.

The same path as a training refresh (``RolloutProbeBackend``: verl's prompt builder, the rollout
server's answers in verl's layout), with the server called in process instead of through Ray.
"""

import pickle

import pytest

from karl_verl.integration.rollout_probe import RolloutProbeBackend
from karl_verl.probe.questions import build_questions, load_probe_set
from karl_verl.probe.runner import run_probe


class InProcessClient:
    """``LLMServerClient.generate`` on a server object in this process; records what each answer weighs."""

    def __init__(self, server):
        self.server = server
        self.sizes = []
        self.prompt_lengths = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **kwargs):
        self.prompt_lengths.append(len(prompt_ids))
        output = await self.server.generate(request_id=request_id, prompt_ids=prompt_ids,
                                            sampling_params=sampling_params, image_data=image_data, **kwargs)
        self.sizes.append(len(pickle.dumps(output, protocol=5)))
        return output


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # No karl_verl.cpu.activate() here: it would set the CPU layer's variables for the rest of the test
    # session (and its subprocesses); the server, the processor fix and the dataset class need none.
    from karl_verl.cpu.rollout import TransformersRolloutServer
    from karl_verl.data.annotations import ReadOptions
    from karl_verl.data.compose import PROBE_FILE, ComposeConfig, compose_dataset
    from karl_verl.dryrun.pipeline import compose_recipe
    from karl_verl.synthetic_images import write_single_entity_images
    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint

    workdir = tmp_path_factory.mktemp("probe-on-server")
    annotations = write_single_entity_images(workdir / "sources", seed=0)
    compose_dataset([annotations], workdir / "data",
                    ComposeConfig(num_images=16, tile_size=64, probe_images_per_entity=2, k_weights={2: 1.0, 3: 1.0},
                                  seed=0, image_format="png"), ReadOptions(), progress=False)
    model = save_tiny_checkpoint(workdir / "model", seed=0)
    config = compose_recipe("karl_kvg_cpu", [f"actor_rollout_ref.model.path={model}", "data.train_files=/x"])
    server = TransformersRolloutServer(str(model), replica_rank=0, response_length=8, prompt_length=1024,
                                       max_model_len=None, seed=0)
    questions = build_questions(load_probe_set(workdir / "data" / PROBE_FILE, lazy=True), per_entity=3, seed=0)
    return server, config, questions


def _probe(setup, mode, questions=None, **kwargs):
    server, config, all_questions = setup
    client = InProcessClient(server)
    backend = RolloutProbeBackend(client, tokenizer=server.tokenizer, processor=server.processor, config=config,
                                  hf_model_type="qwen3_vl", max_concurrency=4, prepare_workers=2)
    try:
        return run_probe(questions or all_questions, backend, mode=mode, progress=False, **kwargs), client
    finally:
        backend.close()


def test_choice_and_logprob_give_the_same_table_on_the_tiny_model(setup):
    _, _, questions = setup
    (by_choice, choice_client), (by_logprob, logprob_client) = _probe(setup, "choice"), _probe(setup, "logprob")
    choice_sizes, logprob_sizes = choice_client.sizes, logprob_client.sizes
    assert by_choice.decisions == by_logprob.decisions
    assert by_choice.table.entries == by_logprob.table.entries and len(by_choice.table) > 1
    assert by_logprob.per_entity_expected_accuracy is not None and by_choice.per_entity_expected_accuracy is None
    # one request per question against four; each choice answer weighs a few hundred bytes
    assert len(choice_sizes) == len(questions) and len(logprob_sizes) == 4 * len(questions)
    assert max(choice_sizes) < 1000 < min(logprob_sizes)


def test_a_prompt_the_server_refuses_and_an_unreadable_image_cost_one_question_each(setup, tmp_path):
    """The transformers rollout server's own refusal of a prompt over its max_model_len, and a probe
    set row whose image is not one (read lazily, as in training): two questions skipped, the rest answered."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from karl_verl.probe.questions import ParquetImage

    server, _, questions = setup
    asked = list(questions[:8])
    corrupt_path = tmp_path / "corrupt.parquet"
    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": b"\x89PNG\r\n\x1a\ntruncated", "path": None}}]),
                   corrupt_path)
    asked[4] = dataclasses.replace(asked[4], image=ParquetImage(str(corrupt_path), 0))
    asked[1] = dataclasses.replace(asked[1], prompt=asked[1].prompt + " Think about it." * 60)
    reference, client = _probe(setup, "choice", [q for i, q in enumerate(asked) if i != 4])
    long_prompt = max(client.prompt_lengths)
    assert long_prompt > max(n for n in client.prompt_lengths if n != long_prompt) + 100
    saved = server.max_model_len
    server.max_model_len = long_prompt - 50  # every other prompt fits
    try:
        result, _ = _probe(setup, "choice", asked, min_answered_share=0.75)
    finally:
        server.max_model_len = saved
    assert {qid: f.kind for qid, f in result.skipped.items()} == {
        asked[1].question_id: "prompt too long", asked[4].question_id: "unreadable image"}
    assert "leaves no room within max_model_len" in result.skipped[asked[1].question_id].detail
    assert f"{corrupt_path}: row 1" in result.skipped[asked[4].question_id].detail
    assert result.decisions == {qid: c for qid, c in reference.decisions.items() if qid != asked[1].question_id}
