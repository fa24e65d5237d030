"""``karl-verl data``: build KVG training data for verl.

* ``convert``: annotations (JSONL, CSV, parquet or a ``datasets`` folder) -> verl RL parquet;
* ``compose``: single-entity images -> multi-entity composites (grounding set + probe set);
* ``filter``: keep instances with 1..k-1 of k sampled responses correct;
* ``sft-convert``: LLaMA-Factory sharegpt CoT-SFT files -> the parquet verl's SFT trainer reads;
* ``cot``: knowledge-guided CoT rationales from a teacher model, kept when their box is right.

Bad input exits with status 2 and one line naming the file, row and field; no output is left
behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = ("build KVG training data: convert annotations, compose multi-entity images, filter by difficulty, "
        "make and convert CoT-SFT data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from karl_verl.accuracy import add_box_arguments
    from karl_verl.data.compose import IMAGE_FORMATS, LAYOUTS
    from karl_verl.data.filter import FILTER_TEMPERATURE
    from karl_verl.data.schema import COORDINATE_SYSTEMS
    from karl_verl.generation import add_inference_arguments

    sub = parser.add_subparsers(dest="data_command", metavar="STEP")
    sub.required = True

    def reading(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", type=Path, metavar="ANNOTATIONS",
                       help="annotation files (.jsonl, .csv, .parquet) or folders written by datasets' save_to_disk: "
                            "image, entity, category, boxes, coords (docs/DATA_FORMATS.md, 'Annotations')")
        p.add_argument("--coords", choices=COORDINATE_SYSTEMS,
                       help="coordinate system of the boxes, for rows without a 'coords' field")
        p.add_argument("--split", default=None,
                       help="split of rows without a 'split' field (default: --hf-split if given, else train)")
        p.add_argument("--image-root", type=Path,
                       help="folder relative image paths start from (default: the annotation file's folder)")
        p.add_argument("--field", action="append", metavar="FIELD=COLUMN",
                       help="read a field from a differently named column, e.g. entity=label (repeatable)")
        p.add_argument("--hf-split", help="split of a saved datasets DatasetDict")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    convert = sub.add_parser("convert", help="annotations -> verl RL parquet",
                             description="Annotations -> verl RL parquet (the schema verl's RLHFDataset reads).",
                             epilog="Reads annotations, writes RL parquet; both formats, with examples: "
                                    "docs/DATA_FORMATS.md ('Annotations', 'RL parquet').")
    reading(convert)
    convert.add_argument("--out", required=True, type=Path, help="output parquet file")

    compose = sub.add_parser("compose", help="single-entity images -> multi-entity composites",
                             description="Compose multi-entity images from single-entity ones; writes "
                                         "grounding.parquet (verl RL rows) and probe.parquet (the probe set).",
                             epilog="Reads a single-entity set (annotations whose boxes may be missing), writes RL "
                                    "parquet and a probe set: docs/DATA_FORMATS.md ('Single-entity set', "
                                    "'RL parquet', 'Probe set').")
    reading(compose)
    compose.add_argument("--out", required=True, type=Path, help="output folder")
    compose.add_argument("--num-images", type=int, default=1000, help="composites to make (default: 1000)")
    compose.add_argument("--k-dist", default="2:1,3:1,4:1,5:1,6:1", metavar="K:W,...",
                         help="relative weights of the entity count k in [2, 6] (default: uniform)")
    compose.add_argument("--layouts", default=",".join(LAYOUTS),
                         help=f"comma list of {', '.join(LAYOUTS)} (default: all)")
    compose.add_argument("--tile-size", type=int, default=336, help="tile scale in pixels (default: 336)")
    compose.add_argument("--queries-per-image", type=int, default=1,
                         help="target entities (rows) per composite; 0: all of them (default: 1)")
    compose.add_argument("--probe-images-per-entity", type=int, default=50,
                         help="single-entity images per entity in the probe set (default: 50)")
    compose.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    compose.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpeg", help="composite encoding")

    filt = sub.add_parser("filter", help="keep instances with 1..k-1 of k responses correct",
                          description="Keep RL instances with between 1 and k-1 of k sampled responses correct "
                                      "(IoU >= 0.5); report those dropped as trivial or too hard.",
                          epilog="Reads RL parquet and responses JSONL ({\"index\": N, \"responses\": [...]}, keyed "
                                 "by extra_info.index), writes RL parquet: docs/DATA_FORMATS.md ('RL parquet', "
                                 "'Responses').")
    filt.add_argument("data", type=Path, help="verl RL parquet (from convert or compose)")
    source = filt.add_mutually_exclusive_group(required=True)
    source.add_argument("--responses", type=Path,
                        help="JSONL of sampled responses keyed by extra_info.index (docs/DATA_FORMATS.md, 'Responses')")
    source.add_argument("--model", help="checkpoint to sample the responses with")
    filt.add_argument("--out", required=True, type=Path, help="output parquet file (kept rows)")
    filt.add_argument("-k", "--k", type=int, default=4, help="responses per instance (default: 4)")
    add_box_arguments(filt)
    filt.add_argument("--report", type=Path, help="also write counts and per-instance scores to this JSON file")
    filt.add_argument("--save-responses", type=Path,
                      help="where sampled responses go with --model (default: OUT with suffix .responses.jsonl)")
    add_inference_arguments(filt, temperature=FILTER_TEMPERATURE, max_new_tokens=4096, seed=20)
    filt.add_argument("--no-progress", action="store_true", help="no progress bars")

    _add_sft_convert(sub)
    _add_cot(sub)


def _add_sft_convert(sub: argparse._SubParsersAction) -> None:
    from karl_verl.data.sft import IMAGE_MAX_PIXELS

    sft = sub.add_parser("sft-convert", help="sharegpt CoT-SFT files -> parquet for verl's SFT trainer",
                         description="LLaMA-Factory sharegpt files (messages role/content, or conversations "
                                     "from/value; <image> placeholders; images relative to --images-dir) -> the "
                                     "parquet verl's MultiTurnSFTDataset reads. Every row is checked first; any "
                                     "problem stops the conversion with nothing written, unless --skip-bad.")
    sft.add_argument("inputs", nargs="+", type=Path, metavar="SHAREGPT",
                     help="sharegpt files: .json (an array of records) or .jsonl")
    sft.add_argument("--images-dir", type=Path,
                     help="folder the 'images' paths are relative to (default: each file's own folder)")
    sft.add_argument("--out", required=True, type=Path, help="output parquet file")
    sft.add_argument("--max-pixels", type=int, default=IMAGE_MAX_PIXELS,
                     help=f"max_pixels of every image: the resize bound at training time "
                          f"(default: {IMAGE_MAX_PIXELS}, the released stage-1 value)")
    sft.add_argument("--image-paths", action="store_true",
                     help="store each image's absolute path instead of its bytes (a smaller parquet; the "
                          "images must then be readable at that path on every training node)")
    sft.add_argument("--skip-bad", action="store_true", help="drop bad rows (and say how many) instead of stopping")
    sft.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_cot(sub: argparse._SubParsersAction) -> None:
    from karl_verl.accuracy import ACC_THRESHOLD
    from karl_verl.data.cot import COT_MAX_NEW_TOKENS, COT_TEMPERATURE, DEFAULT_CONCURRENCY, DEFAULT_TRIES
    from karl_verl.data.teacher import DEFAULT_RETRIES
    from karl_verl.generation import add_inference_arguments

    cot = sub.add_parser("cot", help="knowledge-guided CoT rationales from a teacher model -> sharegpt",
                         description="Ask a teacher model for knowledge-guided rationales of grounding instances "
                                     "(recall the entity's features, compare the candidates, answer in the KARL "
                                     "format); keep a rationale when its format is right and its box has IoU >= "
                                     "--threshold. Writes sharegpt (what sft-convert reads) incrementally: a killed "
                                     "run, started again, continues where it stopped.")
    cot.add_argument("data", type=Path, help="verl RL parquet of grounding instances (from convert or compose)")
    cot.add_argument("--teacher", required=True, metavar="URL_OR_PATH",
                     help="an OpenAI-compatible endpoint (http://host:8000/v1, as vllm serve exposes) or a local "
                          "checkpoint")
    cot.add_argument("--out", required=True, type=Path,
                     help="output sharegpt file (.json or .jsonl); images go to <out stem>_images/ beside it")
    cot.add_argument("--teacher-model", help="served model name (default: the endpoint's first model)")
    cot.add_argument("--api-key", default=None,
                     help="bearer token for the endpoint (default: the OPENAI_API_KEY environment variable)")
    cot.add_argument("--template", type=Path,
                     help="teacher prompt template file with {entity}, {category}, {candidates} "
                          "(default: the built-in one, also in docs/cot_teacher_template.txt)")
    cot.add_argument("--tries", type=int, default=DEFAULT_TRIES,
                     help=f"replies asked per instance before it is rejected (default: {DEFAULT_TRIES})")
    cot.add_argument("--threshold", type=float, default=ACC_THRESHOLD,
                     help=f"IoU a kept rationale's box needs with the ground truth (default: {ACC_THRESHOLD})")
    cot.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                     help=f"endpoint requests in flight at once (default: {DEFAULT_CONCURRENCY}; a local model "
                          "runs one at a time)")
    cot.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                     help=f"retries of a failed endpoint request, with exponential backoff (default: "
                          f"{DEFAULT_RETRIES})")
    group = add_inference_arguments(cot, temperature=COT_TEMPERATURE, max_new_tokens=COT_MAX_NEW_TOKENS, seed=0)
    group.title = "teacher sampling (--backend, --device and --batch-size: local teachers only)"
    cot.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_cot(args: argparse.Namespace) -> tuple[object, int]:
    import os

    from karl_verl.backends.base import SamplingSettings
    from karl_verl.data.cot import CotSettings, generate_cot, read_template
    from karl_verl.data.teacher import describe_teacher, is_endpoint, load_teacher

    settings = CotSettings(template=read_template(args.template), tries=args.tries, threshold=args.threshold)
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
    teacher = load_teacher(args.teacher, model=args.teacher_model,
                           api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), retries=args.retries,
                           backend=args.backend, device=args.device, batch_size=args.batch_size, seed=args.seed)
    endpoint = is_endpoint(args.teacher)
    summary = generate_cot(args.data, args.out, teacher, settings=settings, sampling=sampling,
                           concurrency=args.concurrency if endpoint else 1,
                           teacher_name=describe_teacher(teacher, args.teacher), progress=not args.no_progress)
    return summary, 1 if summary.pending else 0


def _read_options(args: argparse.Namespace):
    from karl_verl.data.annotations import ReadOptions, parse_field_map

    return ReadOptions(coords=args.coords, split=args.split or args.hf_split or "train", image_root=args.image_root,
                       field_map=parse_field_map(args.field), hf_split=args.hf_split)


def run(args: argparse.Namespace) -> int:
    from karl_verl.backends.base import BackendError
    from karl_verl.commands.usage import first_line
    from karl_verl.data.schema import DataError

    try:
        if args.data_command == "convert":
            from karl_verl.data.convert import convert_annotations

            summary = convert_annotations(args.inputs, args.out, _read_options(args), progress=not args.no_progress)
        elif args.data_command == "compose":
            from karl_verl.data.compose import ComposeConfig, compose_dataset, parse_k_distribution

            config = ComposeConfig(
                num_images=args.num_images,
                k_weights=parse_k_distribution(args.k_dist),
                layouts=tuple(name.strip() for name in args.layouts.split(",") if name.strip()),
                tile_size=args.tile_size,
                queries_per_image=args.queries_per_image,
                probe_images_per_entity=args.probe_images_per_entity,
                seed=args.seed,
                split=args.split,
                image_format=args.image_format,
            )
            summary = compose_dataset(args.inputs, args.out, config, _read_options(args),
                                      progress=not args.no_progress)
        elif args.data_command == "sft-convert":
            from karl_verl.data.sft import convert_sharegpt

            summary = convert_sharegpt(args.inputs, args.out, images_dir=args.images_dir, max_pixels=args.max_pixels,
                                       embed_images=not args.image_paths, skip_bad=args.skip_bad,
                                       progress=not args.no_progress)
        elif args.data_command == "cot":
            summary, status = _run_cot(args)
            print(summary.format())
            return status
        else:
            summary = _run_filter(args)
    except (DataError, BackendError, ValueError) as err:  # UsageError is a ValueError
        print(f"karl-verl data {args.data_command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreadable input, an output that cannot be written, a Hub id offline
        print(f"karl-verl data {args.data_command}: error: {first_line(err)}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def _run_filter(args: argparse.Namespace):
    from karl_verl.data.filter import filter_dataset

    generator = sampling = None
    if args.model is not None:
        from karl_verl.commands.usage import check_model_options
        from karl_verl.generation import generator_from_args

        check_model_options(args.model, args.backend, args.device)
        generator, sampling = generator_from_args(args, n=args.k)
    return filter_dataset(
        args.data, args.out, k=args.k, responses=args.responses, generator=generator, sampling=sampling,
        box_format=args.box_format, abs_pixels=args.abs_pixels, responses_out=args.save_responses, report=args.report,
        progress=not args.no_progress,
    )
