"""``llavaseg-train``: train the LLaVASeg adapters on cached frozen features.

    llavaseg-train --preset tiny-world --data DIR --steps 2000 --out adapters/tiny-world
    llavaseg-train --config run.json [--steps 500 ...]      (command-line flags override the file)

A JSON config can also train on a mixture of datasets with LISA-style sampling rates, e.g.
``{"mixture": [{"kind": "reasonseg", "path": "ReasonSeg", "rate": 1}, {"kind": "refcoco", "path": "refer_seg",
"rate": 3}], "val_data": "ReasonSeg"}``.

The first run builds the feature cache (frozen MLLM stage outputs, SAM features, text embeddings; resumable),
then trains; rerunning the same command resumes from the last checkpoint. Input errors (missing data, a cache
or checkpoint made for other models) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from llavaseg.cli.common import add_version_argument, prompts_for
from llavaseg.errors import LlavasegError, run_guarded

# flag -> TrainConfig field, for the simple scalar options (None default = keep the config's value)
_SCALARS: dict[str, tuple[type, str]] = {
    "preset": (str, "model preset whose frozen models are used (default tiny-world)"),
    "data": (Path, "ReasonSeg-format root with train/ and val/ (tiny world: generate_tinyworld output)"),
    "split": (str, "training split (default train)"),
    "val_data": (Path, "ReasonSeg-format root for validation (default: --data)"),
    "val_split": (str, "validation split (default val; 'none' disables validation)"),
    "steps": (int, "optimiser steps"),
    "batch_size": (int, "queries per step"),
    "lr": (float, "peak learning rate (AdamW)"),
    "weight_decay": (float, "AdamW weight decay"),
    "warmup_steps": (int, "linear warm-up steps"),
    "schedule": (str, "decay after warm-up: cosine or linear"),
    "grad_clip": (float, "gradient-norm clip (LISA: 1.0)"),
    "bce_weight": (float, "BCE weight (LISA: 2.0)"),
    "dice_weight": (float, "Dice weight (LISA: 0.5)"),
    "attribute_dropout": (float, "probability of training a sample with its description only"),
    "seed": (int, "random seed"),
    "eval_every": (int, "validate every N steps (0: only at the end)"),
    "checkpoint_every": (int, "checkpoint every N steps"),
    "out": (Path, "output folder for the trained adapters"),
    "device": (str, "cpu (default), cuda, cuda:N"),
    "stage_source": (str, "mllm (frozen MLLM outputs, default) or teacher (ground-truth stages.jsonl)"),
    "cache_dir": (Path, "feature cache directory (default ~/.cache/llavaseg/features)"),
    "checkpoint_dir": (Path, "training checkpoint directory (default ~/.cache/llavaseg/runs/<out>-<hash>)"),
    "threads": (int, "torch CPU threads"),
    "cache_batch_size": (int, "queries per MLLM batch while building the cache"),
}


PROG = "llavaseg-train"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavaseg-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_version_argument(parser)
    parser.add_argument("--config", type=Path, help="JSON file with TrainConfig fields")
    for field, (kind, help_text) in _SCALARS.items():
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=None, help=help_text)
    parser.add_argument("--cache-namespace", dest="cache_namespace", action="store_true", default=None,
                        help="if the cache dir belongs to other models, build a separate namespace inside it")
    parser.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                        help="ignore an existing checkpoint and start over")
    parser.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bars")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (with a checkpoint) after N steps of this invocation; rerun to resume")
    group = parser.add_argument_group("components", "the frozen models (each replaces the preset's source)")
    group.add_argument("--pipeline", help="take the frozen models (and, with --adapters unset, the adapters to start "
                                          "from) from a Segmenter.save_pretrained folder")
    group.add_argument("--mllm", help="MLLM: a Hugging Face id or a local save_pretrained folder")
    group.add_argument("--sam", help="SAM: a segment_anything checkpoint (.pth/.safetensors)")
    group.add_argument("--clip", help="text encoder: open_clip NAME, NAME:TAG, NAME:FILE or local-dir:DIR")
    group.add_argument("--adapters", type=Path, help="start from these trained adapters (fine-tuning)")
    group.add_argument("--prompts", type=Path, help="prompt templates folder (for stage_source mllm)")
    return parser


def _components(args: argparse.Namespace, preset: str):
    from llavaseg.models.presets import get_preset

    if args.pipeline:
        from llavaseg.pipeline import read_pipeline

        _, spec = read_pipeline(Path(args.pipeline).expanduser())
        if args.adapters is None and spec.adapters is not None:
            args.adapters = Path(spec.adapters)
    else:
        spec = get_preset(preset).spec()
    return spec.with_sources(mllm=args.mllm, sam=args.sam, clip=args.clip).model_copy(update={"adapters": None,
                                                                                          "seg_token": None})


def build_config(args: argparse.Namespace) -> "TrainConfig":  # noqa: F821 - imported lazily
    from llavaseg.train import TrainConfig

    values: dict = {}
    if args.config is not None:
        try:
            values = json.loads(args.config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LlavasegError(f"config file not found: {args.config}") from None
        except ValueError as exc:
            raise LlavasegError(f"{args.config}: invalid JSON ({exc})") from None
        if not isinstance(values, dict):
            raise LlavasegError(f"{args.config}: expected a JSON object of TrainConfig fields")
    for field in [*_SCALARS, "cache_namespace", "resume", "progress"]:
        value = getattr(args, field)
        if value is not None:
            values[field] = value
    if any(getattr(args, name) for name in ("pipeline", "mllm", "sam", "clip")):
        values["components"] = _components(args, values.get("preset", "tiny-world")).model_dump(mode="json")
    if args.adapters is not None:
        values["init_adapters"] = args.adapters
    prompts = prompts_for(args.pipeline, args.prompts)
    if prompts is not None:
        values["prompts_dir"] = prompts
    if isinstance(values.get("val_split"), str) and values["val_split"].lower() == "none":
        values["val_split"] = None
    return TrainConfig.model_validate(values)


def _report(result) -> int:
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
    if first and last:
        print(f"loss {first.loss:.4f} (step {first.step}) -> {last.loss:.4f} (step {last.step})")
    if not result.completed:
        print(f"stopped at step {result.step}/{result.steps}; checkpoint in {result.checkpoint_dir} (rerun to resume)")
        return 0
    if result.val is not None and result.val.giou is not None:
        print(f"val gIoU {result.val.giou:.4f} cIoU {result.val.ciou:.4f} ({result.val.n_queries} queries); "
              f"description only: gIoU {result.val.giou_noattr:.4f} cIoU {result.val.ciou_noattr:.4f}")
    print(f"adapters: {result.out} ({result.parameter_count:,} parameters, {result.train_seconds:.0f} s training, "
          f"{result.cache_seconds:.0f} s cache)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def action() -> int:
        try:
            config = build_config(args)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise LlavasegError(f"invalid setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        from llavaseg.distributed import world
        from llavaseg.train import train_adapters

        result = train_adapters(config, stop_after=args.stop_after)
        return _report(result) if world(config.device).is_main else 0  # one report per run, from rank 0

    return run_guarded(PROG, action, interrupted_hint="the last complete step is checkpointed (the feature cache "
                                                      "keeps every finished chunk); re-run the same command to resume")


if __name__ == "__main__":
    raise SystemExit(main())
