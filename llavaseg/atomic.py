"""Atomic file writes: a reader sees the old file or the whole new one, never half a file.

Every result, checkpoint and weight file the project writes goes through :func:`atomic_write`, so a killed job
leaves no truncated file behind for a later resume (or a user) to trip over.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: Path | str, write: Callable[[Path], None], *, suffix: str = ".tmp") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    The temporary file lives in the target's directory (a rename is atomic only within one file system) and is
    removed if ``write`` fails. Its mode follows the umask like any new file (``mkstemp`` and safetensors create
    0600 files; shipped weights, data sets and results are meant to be shared). ``suffix`` is for writers that
    infer the format from the file name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as written:  # on disk before the rename makes it visible: survives a power cut too
            os.fsync(written.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
