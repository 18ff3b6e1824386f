"""Helpers shared by the command-line tools: the ``--device`` flag, checked before any model loads.

(How errors reach a user as one line, :func:`llavaseg.errors.run_guarded`, is shared with the recipes.)
"""

from __future__ import annotations

import argparse

from llavaseg.errors import InputError, UnsupportedError

__all__ = ["add_device_argument", "check_device"]


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N or mps")


def check_device(device: str) -> str:
    """Validate a device string now, rather than deep inside model loading."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"invalid --device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"--device {device} requested but CUDA is not available on this machine")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedError(f"--device {device} requested but MPS is not available on this machine")
    return str(parsed)
