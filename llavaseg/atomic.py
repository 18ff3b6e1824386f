"""Atomic file writes: a reader sees the old file or the whole new one, never half a file.

Every result, checkpoint and weight file the project writes goes through :func:`atomic_write`, so a killed job
leaves no truncated file behind for a later resume (or a user) to trip over.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from llavaseg.errors import InputError

__all__ = ["atomic_write", "atomic_write_text", "writable_dir", "writable_file"]


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


def writable_dir(path: Path, flag: str = "--out", *, create: bool = True) -> Path:
    """Check a job can write its outputs in folder ``path`` before it starts (before any model loads): a folder
    that is a file, cannot be created or is read-only is one line, not a late traceback. ``create=False`` leaves
    a missing folder missing (a job that writes it only at its end) and checks its nearest existing parent."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file; give a folder (new or holding an earlier run of this command)")
    if not create:
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write to {flag} {path}: {parent} is not a writable folder")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to {flag} {path}: {exc.strerror or type(exc).__name__}") from None
    return path


def writable_file(path: Path, flag: str = "--out") -> Path:
    """Check ``path`` can be written as a file (not a folder; its folder creatable and writable)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give the file to write")
    writable_dir(path.parent if str(path.parent) else Path("."), f"{flag}'s folder")
    return path
