"""Append-only JSONL stores that a killed benchmark can resume from.

Each finished query (or dialogue answer) is appended as one line and flushed to disk at once, so a run that
is interrupted (Ctrl-C, ``timeout``, SIGKILL, power loss) loses at most the batch in flight. A kill can
leave a *partial* last line; :func:`read_jsonl` drops it and truncates the file back to the last complete
line, so the next append starts on a clean line. Corruption anywhere else is not a crash artefact and is
reported rather than silently skipped.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from llavaseg.atomic import atomic_write
from llavaseg.errors import InputError

__all__ = ["read_jsonl", "append_jsonl", "write_atomic", "TruncatedLineWarning"]

ModelT = TypeVar("ModelT", bound=BaseModel)


class TruncatedLineWarning(UserWarning):
    """A partial last line (left by a killed run) was dropped from a JSONL store."""


def read_jsonl(path: Path, model: type[ModelT]) -> list[ModelT]:
    """Parse every complete line of ``path`` as ``model``; ``[]`` if the file does not exist.

    The last line is tolerated when it is incomplete or unparsable (the only damage an interrupted append
    can do): it is dropped, the file is truncated to the end of the previous line, and a
    :class:`TruncatedLineWarning` is issued. A bad line elsewhere raises :class:`InputError`.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    pieces = data.split(b"\n")
    complete, tail = pieces[:-1], pieces[-1]  # tail: bytes after the last newline (b"" if none)
    records: list[ModelT] = []
    good_end = 0
    dropped = bool(tail.strip())
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            good_end += len(raw) + 1
            continue
        try:
            records.append(model.model_validate(json.loads(raw)))
        except (ValueError, ValidationError) as exc:  # json.JSONDecodeError is a ValueError
            if number == len(complete) and not tail.strip():
                dropped = True  # a last line that is complete but garbled: also a crash artefact
                break
            first = str(exc).strip().splitlines()[0]
            raise InputError(f"{path}: line {number} is corrupt ({first}); use a new --out to start over") from None
        good_end += len(raw) + 1
    if dropped:
        warnings.warn(f"{path}: dropped an incomplete last line (interrupted run); it will be recomputed",
                      TruncatedLineWarning, stacklevel=2)
        with path.open("r+b") as handle:
            handle.truncate(good_end)
    return records


def append_jsonl(path: Path, records: Iterable[BaseModel]) -> None:
    """Append ``records`` as JSON lines, then flush and fsync so that they survive a kill right after."""
    body = "".join(record.model_dump_json() + "\n" for record in records)
    if not body:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``: never half-written."""
    body = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda tmp: tmp.write_bytes(body))
