"""``llavaseg``: segment one image from the command line.

    llavaseg segment IMAGE "QUERY" --out mask.png [--overlay overlay.png] [--preset tiny-world]
    llavaseg presets

Errors caused by the input (missing image, empty query, broken template, wrong checkpoint) are printed as one
line and exit with status 2; nothing is written unless the whole run succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llavaseg.atomic import atomic_write
from llavaseg.errors import LlavasegError


def _save_atomic(image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavaseg", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment IMAGE for QUERY and write the mask")
    segment.add_argument("image", help="image file (any format Pillow reads)")
    segment.add_argument("query", help="the (possibly implicit) query, e.g. 'the thing a child uses to stay dry'")
    segment.add_argument("--out", required=True, type=Path, help="mask PNG to write (white = object)")
    segment.add_argument("--overlay", type=Path, help="overlay PNG (default: <out stem>_overlay.png)")
    segment.add_argument("--preset", default="tiny-world", help="model preset (see `llavaseg presets`)")
    segment.add_argument("--route", default="llavaseg", help="llavaseg, llavaseg-noattr, seg-token, training-free")
    segment.add_argument("--prompts", type=Path, help="folder with your own prompt templates")
    segment.add_argument("--adapters", type=Path, help="trained adapters folder (overrides the preset's)")
    segment.add_argument("--device", default="cpu")
    segment.add_argument("--quantization", choices=["4bit", "8bit"], help="load the MLLM through bitsandbytes")
    segment.add_argument("--json", action="store_true", help="print the full result as JSON")
    commands.add_parser("presets", help="list the model presets")
    return parser


def _segment(args: argparse.Namespace) -> int:
    from llavaseg.images import check_query, load_image
    from llavaseg.overlay import mask_image, overlay
    from llavaseg.segmenter import Segmenter

    image = load_image(args.image)  # fail on a bad image or query before loading any model
    query = check_query(args.query)
    segmenter = Segmenter.from_preset(args.preset, route=args.route, device=args.device, prompts_dir=args.prompts,
                                      adapters=args.adapters, quantization=args.quantization)
    result = segmenter(image, query)
    overlay_path = args.overlay or args.out.with_name(args.out.stem + "_overlay.png")
    _save_atomic(mask_image(result.mask), args.out)
    _save_atomic(overlay(image, result.mask), overlay_path)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(f"answer: {result.answer}")
        print(f"description: {result.description}")
        print(f"attributes: {json.dumps(dict(result.attributes.items()))} ({result.attribute_parse})")
        print(f"mask: {args.out} ({int(result.mask.sum())} px, score {result.score:.3f}); overlay: {overlay_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "presets":
            from llavaseg.models.presets import list_presets

            for name, description in list_presets().items():
                print(f"{name:16s} {description}")
            return 0
        return _segment(args)
    except LlavasegError as error:
        print(f"llavaseg: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
