"""Flags shared by the command-line tools, each checked before any model loads.

* ``--version``; ``--device`` (a CUDA device without CUDA is one line, not a traceback);
* the component flags: ``--preset``, ``--pipeline DIR``, ``--mllm``, ``--sam``, ``--clip``, ``--adapters``,
  ``--seg-token``, ``--vision-tower``, ``--allow-untrained`` (see :mod:`llavaseg.models.components`).

(How errors reach a user as one line, :func:`llavaseg.errors.run_guarded`, is shared with the recipes.)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from llavaseg import __version__
from llavaseg.atomic import writable_dir, writable_file  # noqa: F401 - the CLI's output checks
from llavaseg.errors import InputError, UnsupportedError
from llavaseg.models.components import ComponentSpec
from llavaseg.models.presets import PRESETS, get_preset

__all__ = ["add_version_argument", "add_device_argument", "check_device", "add_component_arguments",
           "ComponentChoice", "components_from_args", "prompts_for"]

_DEVICE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N or mps")


def check_device(device: str) -> str:
    """Validate a device string now, rather than deep inside model loading."""
    if not _DEVICE.match(device):
        raise InputError(f"invalid --device {device!r}; use cpu, cuda, cuda:N or mps")
    if device == "cpu":
        return device
    import torch

    parsed = torch.device(device)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"--device {device} requested but CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UnsupportedError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedError(f"--device {device} requested but MPS is not available on this machine")
    return str(parsed)


def add_component_arguments(parser: argparse.ArgumentParser, *, seg_token: bool = True) -> None:
    group = parser.add_argument_group("components", "where the models come from (each flag replaces the preset's "
                                                    "source; `llavaseg presets` lists the presets)")
    group.add_argument("--preset", default="tiny-world", help="model preset (default tiny-world, a toy; 'tiny' = "
                                                              "random weights for plumbing)")
    group.add_argument("--pipeline", help="a folder written by Segmenter.save_pretrained (all components at once)")
    group.add_argument("--mllm", help="MLLM: a Hugging Face id or a local save_pretrained folder")
    group.add_argument("--sam", help="SAM: a segment_anything checkpoint (.pth/.safetensors; ViT type read from it)")
    group.add_argument("--clip", help="text encoder: open_clip NAME, NAME:TAG, NAME:FILE or local-dir:DIR")
    group.add_argument("--adapters", help="trained adapters folder (llavaseg-train output)")
    if seg_token:
        group.add_argument("--seg-token", help="[SEG] model folder: ours, or a LISA release (needs --vision-tower)")
        group.add_argument("--vision-tower", help="CLIP vision folder a LISA release was trained with")
        group.add_argument("--seg-token-cot", help="[SEG] model folder trained to write attributes before [SEG] "
                                                   "(the seg-token-cot route)")
    group.add_argument("--allow-untrained", action="store_true",
                       help="run routes whose trained parts are missing with random weights (plumbing only; "
                            "results say so)")


class ComponentChoice:
    """What the component flags chose: the preset (name, for records), the spec, whether untrained parts
    may run, and the pipeline folder they came from (if any)."""

    def __init__(self, preset: str, spec: ComponentSpec, allow_untrained: bool, pipeline: str | None) -> None:
        self.preset, self.spec, self.allow_untrained, self.pipeline = preset, spec, allow_untrained, pipeline

    def prompts_dir(self, explicit: Path | None) -> Path | None:
        return prompts_for(self.pipeline, explicit)


def prompts_for(pipeline: str | Path | None, explicit: Path | None) -> Path | None:
    """The templates to use: ``--prompts`` when given, else those saved with the pipeline (as
    ``Segmenter.from_pretrained`` reads them), else the packaged ones (``None``). Why: a pipeline folder is the
    whole pipeline, so its prompts travel with it in every command, not only in the Python API."""
    if explicit is not None or not pipeline:
        return explicit
    saved = Path(pipeline).expanduser() / "prompts"
    return saved if saved.is_dir() else None


def components_from_args(args: argparse.Namespace) -> ComponentChoice:
    """The component spec the flags describe (a pipeline folder's, or the preset's, with flags replacing
    sources); nothing is loaded."""
    if args.preset not in PRESETS:
        raise InputError(f"unknown preset {args.preset!r}; available: {', '.join(PRESETS)}")
    preset = get_preset(args.preset)
    allow = bool(getattr(args, "allow_untrained", False)) or preset.plumbing
    if getattr(args, "pipeline", None):
        from llavaseg.pipeline import read_pipeline

        manifest, spec = read_pipeline(Path(args.pipeline).expanduser())
        allow = allow or bool(manifest.untrained)
    else:
        spec = preset.spec()
    spec = spec.with_sources(mllm=args.mllm, sam=args.sam, clip=args.clip, adapters=args.adapters,
                             seg_token=getattr(args, "seg_token", None), vision_tower=getattr(args, "vision_tower", None),
                             seg_token_cot=getattr(args, "seg_token_cot", None))
    return ComponentChoice(args.preset, spec, allow, getattr(args, "pipeline", None))
