"""Probe speed: ``logprob`` mode (one forward pass) against ``generate`` mode, on the same questions.

Runs on CPU with the tiny random Qwen3-VL (no download), in about ten seconds::

    .venv/bin/python benchmarks/bench_probe.py [--questions 48] [--max-new-tokens 16 64]

Prints the wall times, the ratio generate / logprob for each reply cap (target: logprob at least
5x faster) and how often the two modes choose the same letter where the generated reply names one
(the tiny model's replies are random text, so few parse: the agreement figure means something only
with a real model). On the tiny model a decoding step costs little next to the fixed cost of
preprocessing and the prefill, so the ratio here understates the gap on a real model.
``main()`` returns the figures as a flat dict for scripts that aggregate benchmarks; ``speedup``
and ``generate_s`` are those of the first reply cap.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

TARGET_SPEEDUP = 5.0


def _questions(num_questions: int, seed: int) -> list[Any]:
    """Questions over 3 categories x 4 entities, Pillow images of a few sizes."""
    from PIL import Image

    from karl_verl.probe.questions import ProbeItem, build_questions

    categories = {"aircraft": 4, "car": 4, "bird": 4}
    entities = [(c, f"{c} model {i}") for c, count in categories.items() for i in range(count)]
    per_entity = max(1, math.ceil(num_questions / len(entities)))
    items = []
    for index in range(per_entity * len(entities)):
        category, entity = entities[index % len(entities)]
        buffer = io.BytesIO()
        size = (40 + 8 * (index % 4), 36 + 6 * (index % 3))  # a few image sizes: real left padding
        Image.new("RGB", size, ((37 * index) % 256, (91 * index) % 256, 80)).save(buffer, format="PNG")
        items.append(ProbeItem(entity, category, buffer.getvalue(), f"img{index}"))
    return build_questions(items, per_entity=per_entity, seed=seed)[:num_questions]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return ``{"questions", "logprob_s", "generate_s", "speedup", ...}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[64, 16],
                        help="reply caps of generate mode to time; the first is the headline figure "
                             "(default: 64 16; 64 is the probe's default cap)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per mode (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads while timing (default 1: steady on a busy machine; 0: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    threads_before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        figures = _run(args, torch.get_num_threads())
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside an aggregating script
    print(format_figures(figures))
    return figures


def _run(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    from karl_verl.backends.base import SamplingSettings
    from karl_verl.backends.hf import HFBackend
    from karl_verl.probe.runner import run_probe
    from karl_verl.testing.tiny_qwen3vl import build_tiny_model, build_tiny_processor, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    backend = HFBackend(build_tiny_model(args.seed, tokenizer), build_tiny_processor(tokenizer),
                        batch_size=args.batch_size, progress=False)
    questions = _questions(args.questions, args.seed)
    caps = list(dict.fromkeys(args.max_new_tokens))

    def settings(cap: int) -> SamplingSettings:
        return SamplingSettings(temperature=0.0, max_new_tokens=cap, seed=20)  # greedy, as the probe's default

    # Warm up both paths (first-call allocations, kernel selection) outside the timed runs.
    run_probe(questions[:2], backend, mode="logprob", progress=False)
    run_probe(questions[:2], backend, mode="generate", sampling=settings(caps[0]), progress=False)

    # Interleaved repeats, median per mode: machine noise hits every mode alike.
    results: dict[str, Any] = {}

    def timed(name: str, **kwargs: Any) -> None:
        started = time.perf_counter()
        results[name] = run_probe(questions, backend, progress=False, **kwargs)
        samples.setdefault(name, []).append(time.perf_counter() - started)

    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        timed("logprob", mode="logprob")
        for cap in caps:
            timed(f"generate_{cap}", mode="generate", sampling=settings(cap))
    scored = results["logprob"]
    logprob_s = statistics.median(samples["logprob"])
    figures: dict[str, Any] = {
        "questions": len(questions),
        "batch_size": args.batch_size,
        "torch_threads": threads,
        "repeats": args.repeats,
        "logprob_s": logprob_s,
        "logprob_ms_per_question": 1000 * logprob_s / len(questions),
        "target_speedup": TARGET_SPEEDUP,
        "max_new_tokens": caps,
    }
    for cap in caps:
        generated = results[f"generate_{cap}"]
        generate_s = statistics.median(samples[f"generate_{cap}"])
        parsed = [qid for qid, letter in generated.decisions.items() if letter is not None]
        agree = sum(generated.decisions[qid] == scored.decisions[qid] for qid in parsed)
        figures.update({
            f"generate_s_{cap}": generate_s,
            f"generate_ms_per_question_{cap}": 1000 * generate_s / len(questions),
            f"speedup_{cap}": generate_s / logprob_s,
            f"parsed_replies_{cap}": len(parsed),
            f"agreeing_decisions_{cap}": agree,
            f"agreement_{cap}": agree / len(parsed) if parsed else None,
        })
    first = caps[0]
    figures.update({
        "generate_s": figures[f"generate_s_{first}"],
        "speedup": figures[f"speedup_{first}"],
        "meets_target": figures[f"speedup_{first}"] >= TARGET_SPEEDUP,
        "agreement": figures[f"agreement_{first}"],
    })
    return figures


def format_figures(figures: dict[str, Any]) -> str:
    lines = [
        f"probe benchmark: tiny Qwen3-VL on CPU ({figures['torch_threads']} threads), "
        f"{figures['questions']} questions, batch {figures['batch_size']}",
        f"{'mode':<24}{'wall s':>8}{'ms/question':>13}{'ratio':>8}  agreement (parsed replies)",
        f"{'logprob':<24}{figures['logprob_s']:>8.2f}{figures['logprob_ms_per_question']:>13.1f}{1:>8.1f}",
    ]
    for cap in figures["max_new_tokens"]:
        agreement = figures[f"agreement_{cap}"]
        lines.append(
            f"{f'generate (max {cap} tokens)':<24}{figures[f'generate_s_{cap}']:>8.2f}"
            f"{figures[f'generate_ms_per_question_{cap}']:>13.1f}{figures[f'speedup_{cap}']:>8.1f}  "
            f"{figures[f'agreeing_decisions_{cap}']}/{figures[f'parsed_replies_{cap}']}"
            + ("" if agreement is None else f" ({agreement:.0%})")
        )
    lines.append(
        f"logprob is {figures['speedup']:.1f}x faster than generate (max {figures['max_new_tokens'][0]} tokens); "
        f"target >= {figures['target_speedup']:.0f}x: {'met' if figures['meets_target'] else 'NOT met'}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
