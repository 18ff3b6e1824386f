"""``llavaseg-bench``: score every route on the same data with the shared evaluator.

    llavaseg-bench reasonseg [--data DIR] [--split val|test|train] [--routes R1,R2] [--preset NAME]
                             [--limit N] [--out DIR] [--first-text-only | --lisa-compat] [--batch-size N]
                             [--prompts DIR] [--dialogue FILE | --no-dialogue] [--device DEV]
                             [--bootstrap N] [--seed N]
    llavaseg-bench refcoco --data ROOT [--dataset refcoco|refcoco+|refcocog|grefcoco] [--split-by unc|umd]
                           [--split val[,testA,...]] [--image-dir DIR] [same common flags]
    llavaseg-bench score --data PATH [--kind reasonseg|refcoco|jsonl] [--split val] --pred [NAME=]PATH
                         [--pred ...] [--first-text-only | --lisa-compat] [--bootstrap N] [--seed N] [--out DIR]

Results go to ``--out``: ``run.json`` (the run's identity), ``queries-<route>.jsonl`` (one line per scored
query, appended as it finishes), ``dialogue-<model>.jsonl``, ``results.json``, ``results.csv``,
``overlays.png``, ``iou_histogram.png``, ``metrics_by_split.png``, ``metrics_by_route.png`` and
``report.html``. Re-running the same command resumes: queries already scored are skipped. ``score`` reads
predictions made by any system (a folder of ``<image stem>_<text index>.png`` masks, or a JSONL) and writes
the same files, one "route" per prediction set (``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from llavaseg.atomic import atomic_write_text
from llavaseg.cli.common import (
    add_component_arguments,
    add_device_argument,
    add_version_argument,
    check_device,
    components_from_args,
    writable_dir,
    writable_file,
)
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


_LISA_HELP = ("LISA's validate(): first text per image and its accumulation (gIoU = sum / (count + 1e-5), "
              "float32); see docs/evaluation.md")
_LISA_REFER_HELP = ("LISA's validate() accumulation (gIoU = sum / (count + 1e-5), float32) over every sentence, "
                    "grouped by image, as LISA's refer validation does")


def _statistics(parser: argparse.ArgumentParser, lisa_help: str = _LISA_HELP) -> None:
    from llavaseg.bench.summaries import DEFAULT_BOOTSTRAP

    group = parser.add_argument_group("statistics")
    group.add_argument("--lisa-compat", action="store_true", help=lisa_help)
    group.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                       help=f"bootstrap resamples behind the 95%% intervals (default {DEFAULT_BOOTSTRAP}; 0: none)")
    group.add_argument("--seed", type=int, default=0, help="seed of the resamples and permutations (default 0)")


def _score_parser(commands) -> None:
    from llavaseg.data.refcoco import DATASETS

    score = commands.add_parser("score", help="score predictions made by any system (mask PNGs or a JSONL)")
    score.add_argument("--data", type=Path, required=True, help="ReasonSeg root or split folder, refer root, or "
                                                                "a JSONL data set")
    score.add_argument("--kind", choices=["auto", "reasonseg", "refcoco", "jsonl"], default="auto",
                       help="data set format (default: a .jsonl file is jsonl, --dataset means refcoco, else "
                            "reasonseg)")
    score.add_argument("--split", help="reasonseg: val (default), test or train; refcoco: val (default), testA, "
                                       "...; comma-separate several; not for JSONL data")
    score.add_argument("--pred", action="append", required=True, metavar="[NAME=]PATH",
                       help="a folder of <image stem>_<text index>.png masks (or <image stem>.png: first text "
                            "only) or a JSONL of {sample_id, text_index, rle|png}; repeat to compare systems")
    score.add_argument("--dataset", choices=DATASETS, help="refcoco: which refer data set (default refcoco)")
    score.add_argument("--split-by", default="unc", help="refcoco: unc, umd or google")
    score.add_argument("--image-dir", type=Path, help="refcoco: COCO train2014 images (default: refer's layout)")
    score.add_argument("--first-text-only", action="store_true", help="score only the first text of each image")
    score.add_argument("--out", type=Path, help="results folder (default runs/score-<first prediction set>-<split>)")
    score.add_argument("--overlay-rows", type=int, default=6, help="queries shown in overlays.png (default 6)")
    _statistics(score)


def _parser() -> argparse.ArgumentParser:
    from llavaseg.tinyworld.generate import SELECTION_STARTS

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `llavaseg-bench <command> --help` for a command's options.")
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{reasonseg,refcoco,score,speed}")
    reason = commands.add_parser("reasonseg", help="ReasonSeg-format data (default: the embedded tiny world)")
    reason.add_argument("--data", type=Path, help="ReasonSeg root (default: the tiny world, generated once)")
    reason.add_argument("--split", default="val",
                        choices=["val", "test", "train", *SELECTION_STARTS],
                        help=f"{', '.join(SELECTION_STARTS)}: the tiny world's selection splits (train-stream "
                             "scenes no recipe trained on)")
    reason.add_argument("--first-text-only", action="store_true",
                        help="score only the first text of each image (as LISA does; see also --lisa-compat)")
    dialogue = reason.add_mutually_exclusive_group()
    dialogue.add_argument("--dialogue", type=Path, help="JSONL of {image, question, answer} for dialogue "
                                                        "preservation (default: <split>/dialogue.jsonl if present)")
    dialogue.add_argument("--no-dialogue", action="store_true", help="skip the dialogue-preservation probe")
    _common(reason)
    _statistics(reason)
    refer = commands.add_parser("refcoco", help="refer-layout RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO")
    refer.add_argument("--data", type=Path, required=True, help="refer root (holding refcoco/, refcoco+/, ...)")
    refer.add_argument("--dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog", "refclef",
                                                                "grefcoco"])
    refer.add_argument("--split-by", default="unc", help="unc (refcoco, refcoco+), umd or google (refcocog)")
    refer.add_argument("--split", default="val", help="val, testA, testB, test; comma-separate several")
    refer.add_argument("--image-dir", type=Path, help="COCO train2014 images (default: refer's layout)")
    refer.add_argument("--dialogue", type=Path, help="optional dialogue JSONL (none by default)")
    _common(refer)
    _statistics(refer, _LISA_REFER_HELP)
    _score_parser(commands)
    speed = commands.add_parser("speed", help="per-stage timings and reuse ratios (see benchmarks/speed.py)")
    speed.add_argument("--preset", default="tiny-world", help="preset whose models are timed (default tiny-world)")
    speed.add_argument("--quick", action="store_true", help="skip the SAM ViT-B (1024 px) measurements")
    speed.add_argument("--repeats", type=int, default=2, help="best-of repeats per timing (default 2)")
    speed.add_argument("--out", type=Path, help="write the report JSON here")
    speed.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
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
    args.prompts = choice.prompts_dir(args.prompts)  # a pipeline's own templates unless --prompts is given
    args.device = check_device(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    args.choice = choice
    return routes


def _check_statistics(args: argparse.Namespace) -> None:
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be 0 (no intervals) or more, got {args.bootstrap}")
    if args.seed < 0:
        raise InputError(f"--seed must be 0 or more, got {args.seed}")


def _statistics_settings(args: argparse.Namespace) -> dict[str, object]:
    return {"lisa_compat": args.lisa_compat, "bootstrap": args.bootstrap, "seed": args.seed}


def _run(settings, queries, **kwargs) -> int:
    from llavaseg.bench.runner import run_benchmark

    writable_dir(Path(settings.out_dir))
    results = run_benchmark(settings, queries, **kwargs)
    if results is None:  # another rank of a torchrun run: rank 0 reports
        return 0
    return _report(results, settings.out_dir)


def _report(results, out_dir: Path) -> int:
    """Print the tables; exit status 1 when some route (or prediction set) failed on every query."""
    from llavaseg.bench.report import make_console, render_table

    console = make_console()
    render_table(results, console)
    console.print(f"wrote results.json, results.csv, overlays.png, charts, report.html and per-query "
                  f"queries-<route>.jsonl in {out_dir}")
    failed = [name for name, summary in results.routes.items() if summary.n_queries and
              summary.n_errors == summary.n_queries]
    if failed:  # a run whose every query failed measured nothing: say so in the exit status too
        print(f"{PROG}: error: every query failed for route(s) {', '.join(failed)}; see the 'error' field in "
              f"{out_dir}/queries-<route>.jsonl", file=sys.stderr)
        return 1
    return 0


def _reasonseg(args: argparse.Namespace) -> int:
    from llavaseg.bench.runner import BenchSettings
    from llavaseg.data.annotations import DIALOGUE_FILE
    from llavaseg.data.registry import DataSource, open_dataset
    from llavaseg.tinyworld.generate import default_tiny_world_source

    routes = _validate_common(args)
    _check_statistics(args)
    first_text_only = args.first_text_only or args.lisa_compat
    if args.data is None:
        source = default_tiny_world_source(args.split, first_text_only=first_text_only)
    else:
        if not args.data.expanduser().exists():
            raise InputError(f"--data {args.data} does not exist")
        source = DataSource(kind="reasonseg", path=args.data.expanduser(), split=args.split,
                            first_text_only=first_text_only)
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
        out_dir=args.out or Path("runs") / f"reasonseg-{args.preset}-{args.split}{'-lisa' if args.lisa_compat else ''}",
        data=str(Path(data).resolve()), split=args.split, routes=routes, spec=args.choice.spec,
        allow_untrained=args.choice.allow_untrained, device=args.device,
        batch_size=args.batch_size, limit=args.limit, prompts_dir=args.prompts,
        first_text_only=first_text_only, dialogue=dialogue, **_statistics_settings(args),
    )
    return _run(settings, queries)


def _refer_queries(data: Path, split_arg: str, dataset: str, split_by: str, image_dir: Path | None
                   ) -> tuple[list, dict[str, str], list[str]]:
    """Every query of the comma-separated refer splits, with the split each belongs to (its metric group)."""
    from llavaseg.data.registry import DataSource, open_dataset

    splits = list(dict.fromkeys(s.strip() for s in split_arg.split(",") if s.strip()))
    if not splits:
        raise InputError("--split is empty")
    if not data.exists():
        raise InputError(f"--data {data} does not exist")
    queries, groups = [], {}
    for split in splits:
        source = DataSource(kind="refcoco", path=data, split=split, refcoco_dataset=dataset, split_by=split_by,
                            image_dir=image_dir)
        for query in open_dataset(source).queries():
            queries.append(query)
            groups[query.query_id] = split
    return queries, groups, splits


def _score_data(args: argparse.Namespace) -> tuple[str, list, dict[str, str] | None, str, dict[str, str]]:
    """``(kind, queries, groups, split label, extra)`` of ``score``'s data set; a split that does not fit the
    data is one line."""
    from llavaseg.data.registry import DataSource, open_dataset

    data = args.data.expanduser()
    if not data.exists():
        raise InputError(f"--data {args.data} does not exist")
    kind = args.kind
    if kind == "auto":
        kind = "jsonl" if data.is_file() else "refcoco" if args.dataset else "reasonseg"
    if kind == "jsonl":
        if args.split is not None:
            raise InputError("a JSONL data set has no splits: leave --split out (the file is the selection)")
        return kind, list(open_dataset(DataSource(kind="jsonl", path=data)).queries()), None, "-", {}
    if kind == "refcoco":
        dataset = args.dataset or "refcoco"
        queries, groups, _ = _refer_queries(data, args.split or "val", dataset, args.split_by, args.image_dir)
        return kind, queries, groups, args.split or "val", {"dataset": dataset, "split_by": args.split_by}
    split = args.split or "val"
    if "," in split:
        raise InputError("ReasonSeg data is scored one split at a time")
    return kind, list(open_dataset(DataSource(kind="reasonseg", path=data, split=split)).queries()), None, split, {}


def _score(args: argparse.Namespace) -> int:
    from llavaseg.bench.predictions import parse_pred_arg
    from llavaseg.bench.score import ScoreSettings, run_score

    _check_statistics(args)
    if args.overlay_rows < 0:
        raise InputError(f"--overlay-rows must be 0 or more, got {args.overlay_rows}")
    predictions: dict[str, Path] = {}
    for value in args.pred:
        name, path = parse_pred_arg(value)
        if name in predictions:
            raise InputError(f"two prediction sets are named {name!r}; name them: --pred NAME=PATH")
        if not path.exists():
            raise InputError(f"--pred {path} does not exist")
        predictions[name] = path
    kind, queries, groups, split, extra = _score_data(args)
    first_text_only = args.first_text_only or (args.lisa_compat and kind != "refcoco")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{next(iter(predictions))}-{split}")
    out = args.out or Path("runs") / f"score-{safe}"
    writable_dir(Path(out))
    settings = ScoreSettings(kind=kind, data=str(args.data.expanduser().resolve()), split=split,
                             predictions=predictions, out_dir=Path(out), first_text_only=first_text_only,
                             overlay_rows=args.overlay_rows, extra=extra, **_statistics_settings(args))
    return _report(run_score(settings, queries, groups=groups), Path(out))


def _refcoco(args: argparse.Namespace) -> int:
    from llavaseg.bench.runner import BenchSettings

    routes = _validate_common(args)
    _check_statistics(args)
    queries, groups, splits = _refer_queries(args.data, args.split, args.dataset, args.split_by, args.image_dir)
    queries = queries[: args.limit] if args.limit is not None else queries
    groups = {q.query_id: groups[q.query_id] for q in queries}
    split_label = ",".join(splits)
    out = args.out or Path("runs") / f"refcoco-{args.dataset}-{args.split_by}-{'_'.join(splits)}-{args.preset}"
    settings = BenchSettings(
        benchmark="refcoco", preset=args.preset, out_dir=out, data=str(args.data.resolve()), split=split_label,
        routes=routes, spec=args.choice.spec, allow_untrained=args.choice.allow_untrained, device=args.device,
        batch_size=args.batch_size, limit=args.limit, prompts_dir=args.prompts, dialogue=args.dialogue,
        **_statistics_settings(args),
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
    report = run_speed(args.preset, full=not args.quick, repeats=max(1, args.repeats), device=check_device(args.device))
    print(format_report(report))
    if args.out is not None:
        atomic_write_text(args.out, report.model_dump_json(indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    action = {"reasonseg": _reasonseg, "refcoco": _refcoco, "score": _score, "speed": _speed}[args.command]
    return run_guarded(PROG, lambda: action(args),
                       interrupted_hint="finished queries are saved; re-run the same command to resume")


if __name__ == "__main__":
    raise SystemExit(main())
