"""What one mastery refresh costs as the probe set grows, through the code path a GPU run takes.

The in-training probe builds every question's prompt with verl's agent-loop machinery in the
TaskRunner (:class:`~karl_verl.integration.rollout_probe.RolloutProbeBackend`) and sends it to the
rollout servers; each answer comes back as the server's ``TokenOutput``, shaped by verl's own
conversion (for ``prompt_logprobs``: ``extract_prompt_logprobs``'s layout, which the CPU rollout
server reproduces). Here the server is karl-verl's transformers rollout server on the tiny
Qwen3-VL, called in process (what Ray would ship is the pickled ``TokenOutput``, whose size is
measured). Per request kind:

* ``top20``: the former logprob request (top-20 log-probabilities at every prompt position);
* ``logprob``: today's logprob mode (one request per option, ``prompt_logprobs=0``);
* ``choice``: choice mode (one greedy token constrained to the option letters).

For 1,000 and 10,000 questions it measures, in a fresh process each, what the trainer does at a
refresh: loading the probe set lazily and building the questions, asking them in choice mode, the
wall time and the process's peak memory; then extrapolates linearly to the paper's scale (2,000
entities x 50 images = 100,000 questions).

Prompt building at the 8B's shapes: the trainer-side work of a refresh (reading and decoding each
image, verl's resize, the chat template and the processor's pass over the image: every step but the
server's) on 1024x768 JPEG photos with Qwen3-VL-8B's image processor (~800 prompt tokens a
question), against a server that answers at once, so only the trainer's time counts. Three refreshes
share :class:`~karl_verl.integration.rollout_probe.PromptCache` as in training: the first builds every
prompt, the later ones reuse them. Reported per question, with the cache's bytes, and extrapolated
to 100,000 questions.

    python benchmarks/bench_probe_scale.py                  # about 5 minutes on 2 cores
    python benchmarks/bench_probe_scale.py --sizes 200 1000 # quicker
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER_QUESTIONS = 2000 * 50


def write_probe_set(path: Path, num_questions: int, *, seed: int = 0, size: tuple[int, int] = (256, 256),
                    image_format: str = "PNG") -> Path:
    """A probe set of ``num_questions`` rows, 5 entities per category, 10 categories.

    By default each image is a 256x256 noisy PNG of about 190 KB, the order of a real probe photo's
    bytes, so that a loader holding every image shows in memory. ``size=(1024, 768),
    image_format="JPEG"`` gives photo-sized images (smooth shapes over mild noise).
    """
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    rows = {"entity": [], "category": [], "image": [], "image_id": []}
    width, height = size
    for i in range(num_questions):
        category = f"category{i % 10}"
        entity = f"{category} entity {(i // 10) % 5}"
        image = Image.frombytes("RGB", size, rng.randbytes(width * height * 3))
        if image_format == "JPEG":
            image = image.filter(ImageFilter.GaussianBlur(3))
        ImageDraw.Draw(image).ellipse((width // 8, height // 8, 7 * width // 8, 7 * height // 8),
                                      fill=tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        rows["entity"].append(entity)
        rows["category"].append(category)
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["image_id"].append(f"img{i}")
    pq.write_table(pa.table(rows), path, row_group_size=256)
    return path


def _config(model_dir: Path):
    from karl_verl.dryrun.pipeline import compose_recipe

    return compose_recipe("karl_kvg_cpu", [f"actor_rollout_ref.model.path={model_dir}", "data.train_files=/x",
                                           "data.val_files=/x", "trainer.default_local_dir=/tmp/x"])


class InProcessClient:
    """``LLMServerClient.generate`` against a server object in this process; records answer sizes."""

    def __init__(self, server) -> None:
        self.server = server
        self.sizes: list[int] = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **kwargs):
        output = await self.server.generate(request_id=request_id, prompt_ids=prompt_ids,
                                            sampling_params=sampling_params, image_data=image_data, **kwargs)
        self.sizes.append(len(pickle.dumps(output, protocol=5)))
        return output


def measure_request_kinds(model_dir: Path, probe_path: Path, num_questions: int) -> dict:
    """Bytes per question and seconds per question of each request kind, on ``num_questions`` questions."""
    from karl_verl.cpu import activate

    activate()
    from karl_verl.cpu.rollout import TransformersRolloutServer
    from karl_verl.integration.rollout_probe import RolloutProbeBackend
    from karl_verl.probe.questions import LETTERS, build_questions, load_probe_set
    from karl_verl.probe.runner import question_request

    config = _config(model_dir)
    server = TransformersRolloutServer(str(model_dir), replica_rank=0, response_length=48, prompt_length=1024,
                                       max_model_len=None, seed=0)
    questions = build_questions(load_probe_set(probe_path), per_entity=10**6, seed=0)[:num_questions]
    requests = [question_request(q) for q in questions]
    out = {}
    for kind in ("top20", "logprob", "choice"):
        client = InProcessClient(server)
        backend = RolloutProbeBackend(client, tokenizer=server.tokenizer, processor=server.processor, config=config,
                                      hf_model_type="qwen3_vl", max_concurrency=8)
        start = time.perf_counter()
        try:
            if kind == "choice":
                backend.choose_options(requests, list(LETTERS))
            elif kind == "logprob":
                backend.option_logprobs(requests, list(LETTERS))
            else:
                backend._run(_top20_all, backend, requests)
        finally:
            backend.close()
        seconds = time.perf_counter() - start
        out[kind] = {"bytes_per_question": sum(client.sizes) / len(requests),
                     "requests_per_question": len(client.sizes) / len(requests),
                     "seconds_per_question": seconds / len(requests)}
    return out


async def _top20_all(backend, requests):
    """The former logprob request: the first option appended, top-20 log-probabilities of every position."""
    from karl_verl.backends.hf import option_token_ids

    option = option_token_ids(backend.tokenizer, ["A"])[0]

    async def one(index, request):
        prompt_ids, images = await backend._encode(request, f"request {index}")
        sampling = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 20, "detokenize": False}
        return await backend._generate_one([*prompt_ids, option], images, sampling, f"request {index}")

    return await backend._gather([one(i, r) for i, r in enumerate(requests)])


def _memory_mib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` of this process from /proc: unlike ``ru_maxrss``, the peak starts
    afresh in a new program (Linux keeps ``ru_maxrss`` across the fork and exec that started it)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure_refresh(model_dir: Path, probe_path: Path) -> dict:
    """One refresh as the trainer runs it (questions built, then run_probe in choice mode); time and memory."""
    from karl_verl.cpu import activate

    activate()
    from karl_verl.cpu.rollout import TransformersRolloutServer
    from karl_verl.integration.rollout_probe import RolloutProbeBackend
    from karl_verl.probe.questions import build_questions, load_probe_set
    from karl_verl.probe.runner import run_probe

    config = _config(model_dir)
    server = TransformersRolloutServer(str(model_dir), replica_rank=0, response_length=48, prompt_length=1024,
                                       max_model_len=None, seed=0)
    before = _memory_mib("VmRSS")
    start = time.perf_counter()
    # As the karl trainer loads it: lazily (each question keeps its image's file and row).
    questions = build_questions(load_probe_set(probe_path, lazy=True), per_entity=10**6, seed=0)
    questions.sort(key=lambda q: q.image.index)
    load_s = time.perf_counter() - start
    backend = RolloutProbeBackend(InProcessClient(server), tokenizer=server.tokenizer, processor=server.processor,
                                  config=config, hf_model_type="qwen3_vl", max_concurrency=64)
    start = time.perf_counter()
    try:
        result = run_probe(questions, backend, mode="choice", progress=False)
    finally:
        backend.close()
    probe_s = time.perf_counter() - start
    peak = _memory_mib("VmHWM")
    return {"questions": result.num_questions, "load_s": load_s, "probe_s": probe_s,
            "peak_rss_mib": peak, "rss_growth_mib": peak - before}


class InstantClient:
    """A server that answers every choice-mode request at once: what is left of a refresh is the trainer's."""

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        return TokenOutput(token_ids=[sampling_params["allowed_token_ids"][0]], stop_reason="completed",
                           extra_fields={})


def measure_prompt_building(model_dir: Path, probe_path: Path, refreshes: int = 3) -> dict:
    """Trainer-side seconds of each of ``refreshes`` refreshes sharing a PromptCache, and the cache's size."""
    from karl_verl.cpu import activate

    activate()
    from transformers import AutoTokenizer

    from karl_verl.integration.rollout_probe import PromptCache, RolloutProbeBackend
    from karl_verl.probe.questions import LETTERS, build_questions, load_probe_set
    from karl_verl.probe.runner import question_request
    from karl_verl.testing.tiny_qwen3vl import load_tiny_processor

    config = _config(model_dir)
    tokenizer, processor = AutoTokenizer.from_pretrained(model_dir), load_tiny_processor(model_dir)
    questions = build_questions(load_probe_set(probe_path, lazy=True), per_entity=10**6, seed=0)
    questions.sort(key=lambda q: q.image.index)
    requests = [question_request(q) for q in questions]
    cache = PromptCache(256 * 2**20)
    seconds, hits = [], []
    for _ in range(refreshes):
        backend = RolloutProbeBackend(InstantClient(), tokenizer=tokenizer, processor=processor, config=config,
                                      hf_model_type="qwen3_vl", max_concurrency=64, prompt_cache=cache)
        start = time.perf_counter()
        try:
            backend.choose_options(requests, list(LETTERS))
        finally:
            backend.close()
        seconds.append(time.perf_counter() - start)
        hits.append(cache.take_counts()[0])
        if backend.question_failures:
            raise SystemExit(f"prompt building failed: {next(iter(backend.question_failures.values()))}")
    # the prompt length one question has (every image here has the same size)
    from karl_verl.integration.rollout_probe import prompt_key

    values, lengths, _ = cache._entries[prompt_key(requests[0])]
    return {"questions": len(requests), "seconds": seconds, "hits": hits, "cache_bytes": cache.nbytes,
            "prompt_tokens": int(lengths.sum()), "cached_runs": int(values.size)}


def _child(argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(argv: list[str] | None = None) -> dict[str, float] | None:
    """Run the benchmark and print its tables; its figures (None in a child process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--sample", type=int, default=64, help="questions per request-kind measurement")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--photos", type=int, default=200, help="1024x768 photos for the prompt-building measure")
    parser.add_argument("--child", choices=["kinds", "refresh", "prompts"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "kinds":
        print(json.dumps(measure_request_kinds(args.model, args.probe, args.sample)))
        return None
    if args.child == "refresh":
        print(json.dumps(measure_refresh(args.model, args.probe)))
        return None
    if args.child == "prompts":
        print(json.dumps(measure_prompt_building(args.model, args.probe)))
        return None

    from karl_verl.testing.tiny_qwen3vl import save_tiny_checkpoint, set_image_geometry

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="karl-bench-probe-"))
    model_dir = save_tiny_checkpoint(workdir / "model", seed=0)
    probes = {n: workdir / f"probe_{n}.parquet" for n in args.sizes}
    for n, path in probes.items():
        if not path.is_file():  # --workdir of an earlier run: its probe sets are reused
            write_probe_set(path, n)
    kinds = _child(["--child", "kinds", "--model", str(model_dir), "--probe", str(probes[min(args.sizes)]),
                    "--sample", str(args.sample)])
    refreshes = {n: _child(["--child", "refresh", "--model", str(model_dir), "--probe", str(path)])
                 for n, path in probes.items()}
    model_8b = workdir / "model_8b"
    if not model_8b.is_dir():
        set_image_geometry(save_tiny_checkpoint(model_8b, seed=0), "qwen3_vl_8b")
    photos = workdir / f"photos_{args.photos}.parquet"
    if not photos.is_file():
        write_probe_set(photos, args.photos, size=(1024, 768), image_format="JPEG")
    building = _child(["--child", "prompts", "--model", str(model_8b), "--probe", str(photos)])

    print(f"\nrequests per question kind (tiny Qwen3-VL, {args.sample} questions, prompt ~90 tokens)")
    print(f"{'kind':<10}{'requests/q':>12}{'bytes/q':>12}{'ms/q':>10}{'bytes vs top20':>16}")
    for kind, figures in kinds.items():
        print(f"{kind:<10}{figures['requests_per_question']:>12.1f}{figures['bytes_per_question']:>12,.0f}"
              f"{1000 * figures['seconds_per_question']:>10.1f}"
              f"{kinds['top20']['bytes_per_question'] / figures['bytes_per_question']:>15.0f}x")
    print("\none refresh in choice mode, probe set read lazily (a fresh process each; TaskRunner side + in-process "
          "server)")
    print(f"{'questions':>10}{'load+build s':>14}{'probe s':>10}{'peak RSS MiB':>14}{'growth MiB':>12}")
    for figures in refreshes.values():
        print(f"{figures['questions']:>10,}{figures['load_s']:>14.2f}{figures['probe_s']:>10.1f}"
              f"{figures['peak_rss_mib']:>14.0f}{figures['rss_growth_mib']:>12.0f}")
    largest = refreshes[max(refreshes)]
    scale = PAPER_QUESTIONS / largest["questions"]
    print(f"\nextrapolated linearly to {PAPER_QUESTIONS:,} questions (2,000 entities x 50 images):")
    for kind, figures in kinds.items():
        print(f"  {kind:<8} {figures['bytes_per_question'] * PAPER_QUESTIONS / 2**30:8.2f} GiB returned per refresh "
              "(grows with prompt length: a real image is ~1,000 prompt tokens, not ~90)" if kind != "choice" else
              f"  {kind:<8} {figures['bytes_per_question'] * PAPER_QUESTIONS / 2**20:8.1f} MiB returned per refresh "
              "(independent of prompt length)")
    smallest = refreshes[min(refreshes)]
    print(f"  load+build {largest['load_s'] * scale:.0f} s and refresh {largest['probe_s'] * scale / 60:.0f} min on "
          f"this tiny CPU model; peak memory {largest['peak_rss_mib']:.0f} MiB at {largest['questions']:,} questions "
          f"vs {smallest['peak_rss_mib']:.0f} MiB at {smallest['questions']:,} "
          f"({largest['peak_rss_mib'] / smallest['peak_rss_mib']:.2f}x; goal <= 1.2x)")
    first, *later = building["seconds"]
    later_s = sum(later) / len(later)
    per_question = building["cache_bytes"] / building["questions"]
    print(f"\nprompt building in the trainer, {building['questions']} 1024x768 JPEG photos, Qwen3-VL-8B's image "
          f"processor ({building['prompt_tokens']} prompt tokens a question), server answering at once")
    print(f"{'refresh':>8}{'s':>8}{'ms/q':>8}{'cache hits':>12}")
    for index, (seconds, hits) in enumerate(zip(building["seconds"], building["hits"], strict=True), start=1):
        print(f"{index:>8}{seconds:>8.1f}{1000 * seconds / building['questions']:>8.1f}{hits:>12,}")
    print(f"  later refreshes take {later_s / first:.2f}x the first's trainer time; the cache holds "
          f"{per_question:.0f} bytes a question ({building['cached_runs']} runs for {building['prompt_tokens']} "
          f"tokens): {per_question * PAPER_QUESTIONS / 2**20:.0f} MiB at {PAPER_QUESTIONS:,} questions")
    print(f"  at {PAPER_QUESTIONS:,} questions: {first / building['questions'] * PAPER_QUESTIONS / 60:.0f} min of "
          f"trainer time for the first refresh, {later_s / building['questions'] * PAPER_QUESTIONS / 60:.0f} min for "
          f"each later one (on {os.cpu_count()} cores; the trainer uses karl.mastery.probe_prepare_workers threads)")
    print(f"(inputs in {workdir}; machine: {os.cpu_count()} cores)")
    return {"probe_questions_small": smallest["questions"], "probe_questions_large": largest["questions"],
            "probe_peak_rss_ratio": largest["peak_rss_mib"] / smallest["peak_rss_mib"],
            "probe_refresh_min_paper_scale": largest["probe_s"] * scale / 60,
            "probe_load_s_paper_scale": largest["load_s"] * scale,
            "probe_choice_bytes_vs_top20": kinds["top20"]["bytes_per_question"] / kinds["choice"]["bytes_per_question"],
            "probe_prompt_build_later_over_first": later_s / first,
            "probe_prompt_cache_mib_paper_scale": per_question * PAPER_QUESTIONS / 2**20}


def main(argv: list[str] | None = None) -> int:
    measure(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
