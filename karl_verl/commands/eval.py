"""``karl-verl eval``: the KVG-Bench evaluator (the paper's Table 1 figures), and comparing two runs.

    karl-verl eval --bench BENCH.parquet --predictions PRED.jsonl --out DIR [--protocol released]
    karl-verl eval --bench BENCH.parquet --model PATH --out DIR [--backend vllm] [--knowledge-dir KDIR]
    karl-verl eval --compare RUN_A RUN_B --out DIR [--bench BENCH.parquet] [--knowledge-dir KDIR]

Prints Acc@0.5 per category, seen / unseen / overall beside the paper's rows, and writes
``metrics.json``, ``cases.jsonl`` and a PNG chart to DIR (``predictions.jsonl`` too with
``--model``). ``--protocol released`` scores exactly as the evaluator released with the paper (the
published figures' rules); the default ``karl`` protocol is ours (docs/EVALUATION.md lists the
differences). ``--compare`` pairs two runs (``--out`` folders or predictions files) case by case:
differences with paired bootstrap intervals and McNemar's exact test, ``compare.json`` and
``compare.png``. See :mod:`karl_verl.evaluation`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "evaluate on KVG-Bench (Acc@0.5 per category, seen/unseen/overall, as in the paper's Table 1) or compare runs"


def _categories(text: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from karl_verl.accuracy import add_box_arguments
    from karl_verl.data.prompts import PROMPT_STYLES
    from karl_verl.evaluation.compare import DEFAULT_BOOTSTRAP_SEED, DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES
    from karl_verl.evaluation.knowledge import KNOWLEDGE_FILES
    from karl_verl.evaluation.paper import (
        BENCH_MAX_NEW_TOKENS,
        BENCH_SEED,
        BENCH_TEMPERATURE,
        DEFAULT_PAPER_ROWS,
        PAPER_TABLE1,
        SEEN_CATEGORIES,
        UNSEEN_CATEGORIES,
    )
    from karl_verl.evaluation.released import PROTOCOLS
    from karl_verl.generation import add_inference_arguments

    parser.epilog = ("Reads the benchmark parquet, predictions JSONL and a mastery table; writes metrics.json, "
                     "cases.jsonl and a chart: docs/DATA_FORMATS.md ('Benchmark parquet', 'Predictions', "
                     "'Mastery table', 'metrics.json and cases.jsonl'); scoring protocols: docs/EVALUATION.md.")
    parser.add_argument("--bench", type=Path,
                        help="KVG-Bench parquet in the released format: question_id, question, image, answer, "
                             "category; needed except when comparing two --out folders")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help='JSONL of {"question_id": ..., "response": ...}')
    source.add_argument("--model", help="checkpoint to run on the benchmark instead")
    source.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"),
                        help="compare two runs on the same benchmark: eval --out folders or predictions files")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="karl: our scoring rules (default); released: exactly the evaluator released with the "
                             "paper, for figures comparable with its Table 1 (see docs/EVALUATION.md). With "
                             "--compare, the default is the protocol the --out folders were scored with")
    knowledge = parser.add_mutually_exclusive_group()
    knowledge.add_argument("--mastery", type=Path,
                           help="one mastery table (JSON, released or karl-verl format): adds the high (1-3) vs low "
                                "(4-5) split (karl protocol)")
    knowledge.add_argument("--knowledge-dir", type=Path, metavar="DIR",
                           help=f"the released knowledge split: a folder with {', '.join(KNOWLEDGE_FILES)}")
    add_box_arguments(parser)
    parser.add_argument("--seen", type=_categories, default=SEEN_CATEGORIES, metavar="CATS",
                        help=f"seen categories, comma list (default: {','.join(SEEN_CATEGORIES)})")
    parser.add_argument("--unseen", type=_categories, default=UNSEEN_CATEGORIES, metavar="CATS",
                        help=f"unseen categories, comma list (default: {','.join(UNSEEN_CATEGORIES)})")
    parser.add_argument("--name", default="this run", help="label of our row in the table")
    parser.add_argument("--paper-rows", default=",".join(DEFAULT_PAPER_ROWS), metavar="ROWS",
                        help=f"paper rows to show, comma list of {list(PAPER_TABLE1)} (default: "
                             f"{','.join(DEFAULT_PAPER_ROWS)}; empty for none)")
    compare = parser.add_argument_group("comparison (with --compare)")
    compare.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                         help=f"paired bootstrap resamples (default: {DEFAULT_RESAMPLES})")
    compare.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                         help=f"interval confidence level (default: {DEFAULT_CONFIDENCE})")
    compare.add_argument("--bootstrap-seed", type=int, default=DEFAULT_BOOTSTRAP_SEED,
                         help=f"bootstrap random seed (default: {DEFAULT_BOOTSTRAP_SEED})")
    # Defaults are the benchmark's released inference settings.
    group = add_inference_arguments(parser, temperature=BENCH_TEMPERATURE, max_new_tokens=BENCH_MAX_NEW_TOKENS,
                                    seed=BENCH_SEED)
    group.add_argument("--prompt-style", choices=PROMPT_STYLES, default="karl",
                       help="karl: query + think/answer suffix (default); json: Qwen3-VL's JSON request; plain. "
                            "--protocol released always uses the released inference's prompt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def released_inference_conflicts(args: argparse.Namespace) -> list[str]:
    """Options that would make a ``--protocol released`` run differ from the released inference."""
    from karl_verl.evaluation.paper import BENCH_MAX_NEW_TOKENS, BENCH_SEED, BENCH_TEMPERATURE

    expected = {"temperature": BENCH_TEMPERATURE, "top_p": 1.0, "max_new_tokens": BENCH_MAX_NEW_TOKENS,
                "seed": BENCH_SEED, "prompt_style": "karl"}
    return [f"--{key.replace('_', '-')} {getattr(args, key)} (the released inference uses "
            f"{'its own prompt' if key == 'prompt_style' else value})"
            for key, value in expected.items() if getattr(args, key) != value]


def _paper_rows(args: argparse.Namespace) -> list[str]:
    """The paper's rows to print beside ours: none when --seen / --unseen are not the paper's split.

    The paper's seen, unseen and overall figures average its own category split; beside another split
    they compare different things.
    """
    from karl_verl.evaluation.paper import SEEN_CATEGORIES, UNSEEN_CATEGORIES

    rows = [row.strip() for row in args.paper_rows.split(",") if row.strip()]
    if rows and (set(args.seen) != set(SEEN_CATEGORIES) or set(args.unseen) != set(UNSEEN_CATEGORIES)):
        print("karl-verl eval: note: the paper's rows are left out: --seen/--unseen are not the paper's split "
              f"(seen {','.join(SEEN_CATEGORIES)}; unseen {','.join(UNSEEN_CATEGORIES)})", file=sys.stderr)
        return []
    return rows


def run(args: argparse.Namespace) -> int:
    from karl_verl.backends.base import BackendError
    from karl_verl.commands.usage import first_line
    from karl_verl.data.schema import DataError
    from karl_verl.evaluation import released
    from karl_verl.mastery import MasteryError

    try:
        if args.compare is not None:
            from karl_verl.evaluation.runner import run_compare

            outcome = run_compare(
                *args.compare, args.out, bench=args.bench, protocol=args.protocol, knowledge_dir=args.knowledge_dir,
                mastery=args.mastery, seen_categories=args.seen, unseen_categories=args.unseen,
                box_format=args.box_format, abs_pixels=args.abs_pixels, resamples=args.resamples,
                confidence=args.confidence, seed=args.bootstrap_seed, progress=not args.no_progress)
            print(outcome.format())
            return 0
        if args.bench is None:
            raise ValueError("--bench is required with --predictions and --model")
        protocol = args.protocol or released.KARL_PROTOCOL
        if protocol == released.RELEASED_PROTOCOL and args.box_format != "qwen3_vl":
            raise ValueError(f"--box-format {args.box_format} does not apply under --protocol released, whose box "
                             "reader is the released one")
        generator = sampling = None
        if args.model is not None:
            from karl_verl.commands.usage import check_model_options
            from karl_verl.generation import generator_from_args

            vllm_kwargs = None
            if protocol == released.RELEASED_PROTOCOL:
                conflicts = released_inference_conflicts(args)
                if conflicts:
                    raise ValueError("--protocol released runs the released inference settings; drop "
                                     + "; ".join(conflicts))
                vllm_kwargs = {"max_model_len": released.RELEASED_MAX_MODEL_LEN}
            check_model_options(args.model, args.backend, args.device)
            generator, sampling = generator_from_args(args, n=1, vllm_kwargs=vllm_kwargs if args.backend == "vllm"
                                                      else None)
        from karl_verl.evaluation.runner import run_eval

        outcome = run_eval(
            args.bench,
            args.out,
            predictions=args.predictions,
            generator=generator,
            sampling=sampling,
            prompt_style=args.prompt_style,
            chunk_size=args.batch_size if args.backend == "hf" else None,
            box_format=args.box_format,
            abs_pixels=args.abs_pixels,
            mastery=args.mastery,
            knowledge_dir=args.knowledge_dir,
            protocol=protocol,
            seen_categories=args.seen,
            unseen_categories=args.unseen,
            name=args.name,
            paper_rows=_paper_rows(args),
            context={"model": args.model, "backend": args.backend if args.model else None},
            progress=not args.no_progress,
        )
    except (DataError, MasteryError, BackendError, ValueError) as err:  # UsageError is a ValueError
        print(f"karl-verl eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreadable input, an output that cannot be written, a Hub id offline
        print(f"karl-verl eval: error: {first_line(err)}", file=sys.stderr)
        return 2
    print(outcome.format())
    return 0
