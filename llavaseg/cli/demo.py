"""``llavaseg demo``: serve the web demo (segment, two routes side by side, chat with the frozen MLLM).

    llavaseg demo                                   # tiny-world preset (a toy), http://127.0.0.1:7860
    llavaseg demo --preset P | --pipeline DIR | --mllm ... --sam ... --clip ... [--adapters DIR]
    llavaseg demo --port 8080 [--host 0.0.0.0] [--share] [--preload]

Needs the ``demo`` extra (``pip install 'llavaseg[demo]'``, Gradio). The page binds 127.0.0.1 unless --host
says otherwise and is never shared unless --share is given. The component flags are those of ``llavaseg
segment`` and are checked before anything is served; the models load on the first request (or at start-up
with --preload), once, and every route shares them.

This module imports Gradio only when the command runs, so ``llavaseg segment`` never pays for it.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from llavaseg.cli.common import add_component_arguments, add_device_argument, check_device, components_from_args
from llavaseg.errors import InputError, UnsupportedError

__all__ = ["add_demo_parser", "demo_config", "run_demo"]


def add_demo_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``llavaseg`` command's subcommands (no Gradio import)."""
    demo = commands.add_parser("demo", help="serve the web demo (needs the [demo] extra: Gradio)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page to "
                           "your network)")
    demo.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    demo.add_argument("--preload", action="store_true", help="load the models before serving (fail fast)")
    demo.add_argument("--no-examples", action="store_true", help="do not offer the tiny-world example scenes")
    demo.add_argument("--max-file-mb", type=int, default=25, help="largest upload accepted, in MB (default 25)")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--prompts", type=Path, help="folder with your own prompt templates")
    demo.add_argument("--dtype", default="auto", help="model dtype: auto (fp32 on CPU, bf16 on GPU), fp32, bf16, "
                                                      "fp16")
    demo.add_argument("--quantization", choices=["4bit", "8bit"], help="load the MLLM through bitsandbytes")
    add_device_argument(demo)
    add_component_arguments(demo)
    return demo


def demo_config(args: argparse.Namespace):
    """The :class:`~llavaseg.demo.DemoConfig` the flags describe (checked, nothing loaded): the same component
    choice as ``llavaseg segment``, with the preset's or the pipeline's caveats."""
    from llavaseg.demo.session import DemoConfig
    from llavaseg.models.presets import get_preset

    choice = components_from_args(args)
    preset = get_preset(choice.preset)
    prompts, pipeline = choice.prompts_dir(args.prompts), None
    if choice.pipeline:
        from llavaseg.pipeline import read_pipeline

        folder = Path(choice.pipeline).expanduser()
        manifest, saved_spec = read_pipeline(folder)
        served, notices, label = None, tuple(manifest.notices), f"pipeline {choice.pipeline}"
        pipeline = folder if saved_spec == choice.spec else None  # flags replaced a part: nothing to compare
    elif preset.spec() == choice.spec:
        served, notices, label = preset, ((preset.notice,) if preset.notice else ()), f"preset {preset.name}"
    else:
        served, notices, label = None, (), f"preset {preset.name} with your components"
    return DemoConfig(spec=choice.spec, label=label, allow_untrained=choice.allow_untrained, preset=served,
                      notices=notices, device=check_device(args.device), dtype=args.dtype,
                      quantization=args.quantization, prompts_dir=prompts, pipeline=pipeline)


def _check_flags(args: argparse.Namespace) -> None:
    if args.port is not None and not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_file_mb < 1:
        raise InputError(f"--max-file-mb must be at least 1, got {args.max_file_mb}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if importlib.util.find_spec("gradio") is None:
        raise UnsupportedError("llavaseg demo needs Gradio: pip install 'llavaseg[demo]'")


def run_demo(args: argparse.Namespace) -> int:
    """Check the flags and the components, then serve until Ctrl-C."""
    _check_flags(args)
    config = demo_config(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from llavaseg.demo.app import serve

    return serve(config, host=args.host, port=args.port, share=args.share, max_file_mb=args.max_file_mb,
                 preload=args.preload, examples=not args.no_examples)
