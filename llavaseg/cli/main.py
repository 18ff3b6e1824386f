"""``llavaseg``: segment images from the command line.

    llavaseg segment IMAGE "QUERY" --out mask.png [--overlay overlay.png] [component flags]
    llavaseg segment FOLDER|"GLOB"|LIST.jsonl ["QUERY"] --out DIR     (many images, models loaded once)
    llavaseg presets
    llavaseg demo [--preset P | --pipeline DIR | component flags] [--port N] [--share]   (web page; [demo] extra)

Many images: a folder or a glob takes one QUERY for every image; a JSONL file has one ``{"image", "query"}``
object per line (image paths relative to the file). The models load once, images are batched, progress is
shown, and ``DIR`` receives ``masks/``, ``overlays/`` and ``results.jsonl`` (one result per line, appended as
each batch finishes): re-running the same command resumes, skipping what is done.

Errors caused by the input (missing image, empty query, broken template, wrong checkpoint, a route whose
trained part is missing) are printed as one line and exit with status 2, before any model loads where
possible; nothing is written unless a result is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llavaseg.atomic import atomic_write
from llavaseg.cli.common import (add_component_arguments, add_device_argument, add_version_argument, check_device,
                                 components_from_args, writable_dir, writable_file)
from llavaseg.cli.demo import add_demo_parser  # argparse only: Gradio is imported when the demo runs
from llavaseg.cli.inputs import SegmentJob, collect_jobs
from llavaseg.errors import InputError, run_guarded

PROG = "llavaseg"


def _save_png(image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment images for queries and write masks",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    segment.add_argument("input", help="an image file, a folder, a glob pattern, or a JSONL of {image, query}")
    segment.add_argument("query", nargs="?", help="the (possibly implicit) query (not with a JSONL input)")
    segment.add_argument("--out", type=Path, help="mask PNG (one image) or output folder (many; default "
                                                  "segment-out)")
    segment.add_argument("--overlay", type=Path, help="overlay PNG for one image (default: <out stem>_overlay.png)")
    segment.add_argument("--route", default="llavaseg", help="llavaseg, llavaseg-noattr, seg-token, training-free")
    segment.add_argument("--prompts", type=Path, help="folder with your own prompt templates")
    segment.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    segment.add_argument("--dtype", default="auto", help="model dtype: auto (fp32 on CPU, bf16 on GPU), fp32, "
                                                         "bf16, fp16")
    segment.add_argument("--quantization", choices=["4bit", "8bit"], help="load the MLLM through bitsandbytes")
    segment.add_argument("--json", action="store_true", help="print the full result as JSON (one image)")
    add_device_argument(segment)
    add_component_arguments(segment)
    commands.add_parser("presets", help="list the model presets")
    add_demo_parser(commands)
    return parser


def _segmenter(args: argparse.Namespace, choice):
    from llavaseg.models.components import check_spec
    from llavaseg.routes.registry import route_needs

    check_spec(choice.spec, needs=route_needs([args.route]), allow_untrained=choice.allow_untrained)
    args.device = check_device(args.device)
    from llavaseg.segmenter import Segmenter

    return Segmenter.from_spec(choice.spec, route=args.route, allow_untrained=choice.allow_untrained,
                               device=args.device, dtype=args.dtype, quantization=args.quantization,
                               prompts_dir=choice.prompts_dir(args.prompts), batch_size=args.batch_size,
                               preset=None if choice.pipeline else _preset(choice.preset, choice.spec))


def _preset(name: str, spec):
    from llavaseg.models.presets import get_preset

    preset = get_preset(name)
    return preset if preset.spec() == spec else None


def _segment_one(args: argparse.Namespace, job: SegmentJob, choice) -> int:
    from llavaseg.images import load_image
    from llavaseg.overlay import mask_image, overlay

    image = load_image(job.image)  # fail on a bad image before loading any model
    segmenter = _segmenter(args, choice)
    result = segmenter(image, job.query)
    overlay_path = args.overlay or args.out.with_name(args.out.stem + "_overlay.png")
    _save_png(mask_image(result.mask), args.out)
    _save_png(overlay(image, result.mask), overlay_path)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print(f"answer: {result.answer}")
    print(f"description: {result.description}")
    print(f"attributes: {json.dumps(dict(result.attributes.items()))} ({result.attribute_parse})")
    print(f"mask: {args.out} ({int(result.mask.sum())} px, score {result.score:.3f}); overlay: {overlay_path}")
    if result.untrained:
        print(f"untrained: {', '.join(result.untrained)} (random weights: the mask is plumbing only)")
    return 0


def _segment(args: argparse.Namespace) -> int:
    jobs, single = collect_jobs(args.input, args.query)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    choice = components_from_args(args)
    if single:
        if args.out is None:
            raise InputError("--out MASK.png is required for one image")
        writable_file(args.out)
        if args.overlay is not None:
            writable_file(args.overlay, "--overlay")
        return _segment_one(args, jobs[0], choice)
    from llavaseg.cli.batch import run_jobs

    return run_jobs(jobs, writable_dir(args.out or Path("segment-out")), lambda: _segmenter(args, choice), args.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def action() -> int:
        if args.command == "presets":
            from llavaseg.models.presets import list_presets

            for name, description in list_presets().items():
                print(f"{name:16s} {description}")
            return 0
        if args.command == "demo":
            from llavaseg.cli.demo import run_demo

            return run_demo(args)
        return _segment(args)

    return run_guarded(PROG, action, interrupted_hint="finished images are saved; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
