"""Errors users are meant to read.

Every failure caused by the caller's input (a missing image, an empty query, a broken template, a checkpoint
for another model) is raised as a subclass of :class:`LlavasegError` with a one-line message that names the
problem and the offending file or value. The CLI prints ``str(error)`` and exits non-zero without a traceback;
library users can catch one base class.
"""

from __future__ import annotations


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


class DatasetFormatError(InputError):
    """A dataset file does not follow the format its loader expects (a kind of bad input)."""
