"""Errors users are meant to read.

Every failure caused by the caller's input (a missing image, an empty query, a broken template, a checkpoint
for another model) is raised as a subclass of :class:`LlavasegError` with a one-line message that names the
problem and the offending file or value. The CLI prints ``str(error)`` and exits non-zero without a traceback;
library users can catch one base class.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USAGE = 2
"""Exit status of a command that failed on the user's input (argparse's status for usage errors)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


class LlavasegError(Exception):
    """Base class of all errors caused by user input or environment, with a readable one-line message."""


class InputError(LlavasegError, ValueError):
    """An image, query or data file the caller passed is missing, unreadable or empty."""


class TemplateError(LlavasegError, ValueError):
    """A prompt template file is missing, or names a placeholder its stage does not provide."""


class CheckpointMismatchError(LlavasegError, ValueError):
    """Weights were trained for, or belong to, a different model than the one they are loaded into."""


class UnsupportedError(LlavasegError, RuntimeError):
    """The requested feature (e.g. 4-bit loading) is unavailable on this platform or install."""


class UntrainedError(LlavasegError, ValueError):
    """A route's trainable part (adapters, a ``[SEG]`` model) is missing and random weights were not allowed."""


class DatasetFormatError(InputError):
    """A dataset file does not follow the format its loader expects (a kind of bad input)."""


def print_error(prog: str, error: BaseException) -> None:
    """``<prog>: error: <first line of the message>`` on stderr."""
    message = str(error).strip().splitlines()
    print(f"{prog}: error: {message[0] if message else type(error).__name__}", file=sys.stderr)


def run_guarded(prog: str, action: Callable[[], int], *, interrupted_hint: str = "") -> int:
    """Run ``action``; user errors (and failed file reads/writes) become one line + status 2, Ctrl-C one line +
    status 130."""
    try:
        return action()
    except LlavasegError as error:
        print_error(prog, error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:  # a file the command had to read or write (disk full, permissions...)
        where = f": {error.filename}" if error.filename else ""
        print(f"{prog}: error: {error.strerror or type(error).__name__}{where}", file=sys.stderr)
        return EXIT_USAGE
