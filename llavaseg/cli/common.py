"""Helpers shared by the command-line tools: the ``--device`` flag and error reporting without tracebacks.

Errors caused by the user's input (:class:`~llavaseg.errors.LlavasegError`) are printed as one line,
``<prog>: error: <message>``, with exit status 2 (argparse's status for usage errors), so a typo in a path
or preset name never shows a traceback. Ctrl-C prints a one-line note and exits with 130; tools that can
resume say so in their ``interrupted_hint``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from llavaseg.errors import InputError, LlavasegError, UnsupportedError

__all__ = ["add_device_argument", "check_device", "print_error", "run_guarded", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


def print_error(prog: str, error: BaseException) -> None:
    message = str(error).strip().splitlines()
    print(f"{prog}: error: {message[0] if message else type(error).__name__}", file=sys.stderr)


def run_guarded(prog: str, action: Callable[[], int], *, interrupted_hint: str = "") -> int:
    """Run ``action``; user errors become one line + status 2, Ctrl-C one line + status 130."""
    try:
        return action()
    except LlavasegError as error:
        print_error(prog, error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
