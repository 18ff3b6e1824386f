"""``llavaseg-bench``: score every route on the same data with the shared evaluator.

    llavaseg-bench reasonseg [--data DIR] [--split val|test|train] [--routes R1,R2] [--preset NAME]
                             [--limit N] [--out DIR] [--first-text-only] [--batch-size N]
                             [--prompts DIR] [--dialogue FILE | --no-dialogue] [--device DEV]
    llavaseg-bench refcoco --data ROOT [--dataset refcoco|refcoco+|refcocog] [--split-by unc|umd]
                           [--split val[,testA,...]] [--image-dir DIR] [same common flags]

Results go to ``--out``: ``run.json`` (the run's identity), ``queries-<route>.jsonl`` (one line per scored
query, appended as it finishes), ``dialogue-<model>.jsonl``, ``results.json``, ``results.csv`` and
``overlays.png``. Re-running the same command resumes: queries already scored are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from llavaseg.atomic import atomic_write_text
from llavaseg.cli.common import (add_component_arguments, add_device_argument, add_version_argument, check_device,
                                 components_from_args, writable_dir, writable_file)
from llavaseg.errors import InputError, run_guarded

PROG = "llavaseg-bench"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routes", help="comma-separated routes (default: every registered route whose trained "
                                         "parts the components have)")
    parser.add_argument("--limit", type=int, help="score only the first N queries (dialogue: first N images)")
    parser.add_argument("--out", type=Path, help="results folder (re-use it to resume)")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per route call (default 8)")
    parser.add_argument("--prompts", type=Path, help="folder with your own prompt templates")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_device_argument(parser)
    add_component_arguments(parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `llavaseg-bench <command> --help` for a command's options.")
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{reasonseg,refcoco,speed}")
    reason = commands.add_parser("reasonseg", help="ReasonSeg-format data (default: the embedded tiny world)")
    reason.add_argument("--data", type=Path, help="ReasonSeg root (default: the tiny world, generated once)")
    reason.add_argument("--split", default="val", choices=["val", "test", "train"])
    reason.add_argument("--first-text-only", action="store_true",
                        help="LISA-compatible: score only the first text of each image")
    dialogue = reason.add_mutually_exclusive_group()
    dialogue.add_argument("--dialogue", type=Path, help="JSONL of {image, question, answer} for dialogue "
                                                        "preservation (default: <split>/dialogue.jsonl if present)")
    dialogue.add_argument("--no-dialogue", action="store_true", help="skip the dialogue-preservation probe")
    _common(reason)
    refer = commands.add_parser("refcoco", help="refer-layout RefCOCO / RefCOCO+ / RefCOCOg")
    refer.add_argument("--data", type=Path, required=True, help="refer root (holding refcoco/, refcoco+/, ...)")
    refer.add_argument("--dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog", "refclef"])
    refer.add_argument("--split-by", default="unc", help="unc (refcoco, refcoco+), umd or google (refcocog)")
    refer.add_argument("--split", default="val", help="val, testA, testB, test; comma-separate several")
    refer.add_argument("--image-dir", type=Path, help="COCO train2014 images (default: refer's layout)")
    refer.add_argument("--dialogue", type=Path, help="optional dialogue JSONL (none by default)")
    _common(refer)
    speed = commands.add_parser("speed", help="per-stage timings and reuse ratios (see benchmarks/speed.py)")
    speed.add_argument("--preset", default="tiny-world", help="preset whose models are timed (default tiny-world)")
    speed.add_argument("--quick", action="store_true", help="skip the SAM ViT-B (1024 px) measurements")
    speed.add_argument("--repeats", type=int, default=2, help="best-of repeats per timing (default 2)")
    speed.add_argument("--out", type=Path, help="write the report JSON here")
    return parser


def _validate_common(args: argparse.Namespace) -> list[str] | None:
    """Check every flag (components included) before generating data or loading anything."""
    from llavaseg.bench.runner import check_preset_files
    from llavaseg.models.components import check_spec
    from llavaseg.routes.registry import check_route_names, route_needs

    choice = components_from_args(args)
    check_preset_files(choice.spec, args.preset)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    routes = None
    if args.routes is not None:
        routes = check_route_names([name.strip() for name in args.routes.split(",") if name.strip()])
        if not routes:
            raise InputError("--routes is empty")
    check_spec(choice.spec, needs=route_needs(routes) if routes else None, allow_untrained=choice.allow_untrained)
    if args.prompts is not None and not args.prompts.is_dir():
        raise InputError(f"prompt folder {args.prompts} does not exist")
    args.device = check_device(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    args.choice = choice
    return routes


def _run(settings, queries, **kwargs) -> int:
    from llavaseg.bench.report import make_console, render_table
    from llavaseg.bench.runner import run_benchmark

    writable_dir(Path(settings.out_dir))
    results = run_benchmark(settings, queries, **kwargs)
    console = make_console()
    render_table(results, console)
    console.print(f"wrote results.json, results.csv, overlays.png and per-query queries-<route>.jsonl in "
                  f"{settings.out_dir}")
    failed = [name for name, summary in results.routes.items() if summary.n_queries and
              summary.n_errors == summary.n_queries]
    if failed:  # a run whose every query failed measured nothing: say so in the exit status too
        print(f"{PROG}: error: every query failed for route(s) {', '.join(failed)}; see the 'error' field in "
              f"{settings.out_dir}/queries-<route>.jsonl", file=sys.stderr)
        return 1
    return 0


def _reasonseg(args: argparse.Namespace) -> int:
    from llavaseg.bench.runner import BenchSettings
    from llavaseg.data.annotations import DIALOGUE_FILE
    from llavaseg.data.registry import DataSource, open_dataset
    from llavaseg.tinyworld.generate import default_tiny_world_source

    routes = _validate_common(args)
    if args.data is None:
        source = default_tiny_world_source(args.split, first_text_only=args.first_text_only)
    else:
        if not args.data.expanduser().exists():
            raise InputError(f"--data {args.data} does not exist")
        source = DataSource(kind="reasonseg", path=args.data.expanduser(), split=args.split,
                            first_text_only=args.first_text_only)
    dataset = open_dataset(source)
    data = source.path
    queries = list(itertools.islice(dataset.queries(), args.limit))
    dialogue = None
    if not args.no_dialogue:
        dialogue = args.dialogue
        if dialogue is None and (dataset.split_dir / DIALOGUE_FILE).is_file():
            dialogue = dataset.split_dir / DIALOGUE_FILE
        if dialogue is None:
            print(f"note: no {dataset.split_dir / DIALOGUE_FILE}; dialogue preservation is skipped "
                  "(pass --dialogue FILE to measure it)", file=sys.stderr)
    settings = BenchSettings(
        benchmark="reasonseg", preset=args.preset,
        out_dir=args.out or Path("runs") / f"reasonseg-{args.preset}-{args.split}",
        data=str(Path(data).resolve()), split=args.split, routes=routes, spec=args.choice.spec,
        allow_untrained=args.choice.allow_untrained, device=args.device,
        batch_size=args.batch_size, limit=args.limit, prompts_dir=args.prompts,
        first_text_only=args.first_text_only, dialogue=dialogue,
    )
    return _run(settings, queries)


def _refcoco(args: argparse.Namespace) -> int:
    from llavaseg.bench.runner import BenchSettings
    from llavaseg.data.registry import DataSource, open_dataset

    routes = _validate_common(args)
    splits = list(dict.fromkeys(s.strip() for s in args.split.split(",") if s.strip()))
    if not splits:
        raise InputError("--split is empty")
    if not args.data.exists():
        raise InputError(f"--data {args.data} does not exist")
    queries, groups = [], {}
    for split in splits:
        dataset = open_dataset(DataSource(kind="refcoco", path=args.data, split=split, refcoco_dataset=args.dataset,
                                          split_by=args.split_by, image_dir=args.image_dir))
        for query in dataset.queries():
            queries.append(query)
            groups[query.query_id] = split
    queries = queries[: args.limit] if args.limit is not None else queries
    groups = {q.query_id: groups[q.query_id] for q in queries}
    split_label = ",".join(splits)
    out = args.out or Path("runs") / f"refcoco-{args.dataset}-{args.split_by}-{'_'.join(splits)}-{args.preset}"
    settings = BenchSettings(
        benchmark="refcoco", preset=args.preset, out_dir=out, data=str(args.data.resolve()), split=split_label,
        routes=routes, spec=args.choice.spec, allow_untrained=args.choice.allow_untrained, device=args.device, batch_size=args.batch_size, limit=args.limit, prompts_dir=args.prompts,
        dialogue=args.dialogue,
        extra={"dataset": args.dataset, "split_by": args.split_by,
               "image_dir": str(args.image_dir.resolve()) if args.image_dir else ""},
    )
    return _run(settings, queries, groups=groups)


def _speed(args: argparse.Namespace) -> int:
    from llavaseg.bench.runner import check_preset_files
    from llavaseg.bench.speed import format_report, run_speed
    from llavaseg.models.presets import PRESETS

    if args.preset not in PRESETS:
        raise InputError(f"unknown preset {args.preset!r}; available: {', '.join(PRESETS)}")
    check_preset_files(PRESETS[args.preset])
    if args.out is not None:
        writable_file(args.out)
    report = run_speed(args.preset, full=not args.quick, repeats=max(1, args.repeats))
    print(format_report(report))
    if args.out is not None:
        atomic_write_text(args.out, report.model_dump_json(indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    action = {"reasonseg": _reasonseg, "refcoco": _refcoco, "speed": _speed}[args.command]
    return run_guarded(PROG, lambda: action(args),
                       interrupted_hint="finished queries are saved; re-run the same command to resume")


if __name__ == "__main__":
    raise SystemExit(main())
