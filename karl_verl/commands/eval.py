"""``karl-verl eval``: the KVG-Bench evaluator (the paper's Table 1 figures).

    karl-verl eval --bench BENCH.parquet --predictions PRED.jsonl --out DIR
    karl-verl eval --bench BENCH.parquet --model PATH --out DIR [--backend vllm] [--mastery TABLE]

Prints Acc@0.5 per category, seen / unseen / overall beside the paper's rows, and writes
``metrics.json``, ``cases.jsonl`` and a PNG chart to DIR (``predictions.jsonl`` too with
``--model``). See :mod:`karl_verl.evaluation`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "evaluate on KVG-Bench: Acc@0.5 and IoU per category, seen/unseen/overall, as in the paper's Table 1"


def _categories(text: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from karl_verl.data.prompts import PROMPT_STYLES
    from karl_verl.evaluation.inference import add_inference_arguments
    from karl_verl.evaluation.metrics import add_box_arguments
    from karl_verl.evaluation.paper import (
        BENCH_MAX_NEW_TOKENS,
        BENCH_SEED,
        BENCH_TEMPERATURE,
        DEFAULT_PAPER_ROWS,
        PAPER_TABLE1,
        SEEN_CATEGORIES,
        UNSEEN_CATEGORIES,
    )

    parser.epilog = ("Reads the benchmark parquet, predictions JSONL and a mastery table; writes metrics.json, "
                     "cases.jsonl and a chart: docs/DATA_FORMATS.md ('Benchmark parquet', 'Predictions', "
                     "'Mastery table', 'metrics.json and cases.jsonl').")
    parser.add_argument("--bench", required=True, type=Path,
                        help="KVG-Bench parquet in the released format: question_id, question, image, answer, category")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help='JSONL of {"question_id": ..., "response": ...}')
    source.add_argument("--model", help="checkpoint to run on the benchmark instead")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--mastery", type=Path,
                        help="mastery table (JSON, released or karl-verl format): adds the high (1-3) vs low (4-5) "
                             "split")
    add_box_arguments(parser)
    parser.add_argument("--seen", type=_categories, default=SEEN_CATEGORIES, metavar="CATS",
                        help=f"seen categories, comma list (default: {','.join(SEEN_CATEGORIES)})")
    parser.add_argument("--unseen", type=_categories, default=UNSEEN_CATEGORIES, metavar="CATS",
                        help=f"unseen categories, comma list (default: {','.join(UNSEEN_CATEGORIES)})")
    parser.add_argument("--name", default="this run", help="label of our row in the table")
    parser.add_argument("--paper-rows", default=",".join(DEFAULT_PAPER_ROWS), metavar="ROWS",
                        help=f"paper rows to show, comma list of {list(PAPER_TABLE1)} (default: "
                             f"{','.join(DEFAULT_PAPER_ROWS)}; empty for none)")
    # Defaults are the benchmark's released inference settings.
    group = add_inference_arguments(parser, temperature=BENCH_TEMPERATURE, max_new_tokens=BENCH_MAX_NEW_TOKENS,
                                    seed=BENCH_SEED)
    group.add_argument("--prompt-style", choices=PROMPT_STYLES, default="karl",
                       help="karl: query + think/answer suffix (default); json: Qwen3-VL's JSON request; plain")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    from karl_verl.evaluation.runner import run_eval
    from karl_verl.mastery import MasteryError

    try:
        generator = sampling = None
        if args.model is not None:
            from karl_verl.commands.usage import check_model_options
            from karl_verl.evaluation.inference import generator_from_args

            check_model_options(args.model, args.backend, args.device)
            generator, sampling = generator_from_args(args, n=1)
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
