"""``run.json``: the identity of a results folder, so that a resumed run never mixes incompatible results.

Per-query results are reused on restart (see :mod:`llavaseg.bench.runner`). That is only sound when they were
produced by the same models, data, prompts and protocol; otherwise the summary would silently average two
different experiments. The folder's first run writes :class:`RunConfig`; every later run with the same
``--out`` must match it field by field or is refused with the list of differences.

Things that do not change a query's result (``--limit``, ``--batch-size``, ``--device``) are deliberately
not part of the identity: a run with ``--limit 2`` can be extended with ``--limit 4``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from llavaseg.bench.jsonl import write_atomic
from llavaseg.errors import InputError

__all__ = ["RunConfig", "RUN_FILE", "fingerprint", "file_fingerprint", "check_run_config", "write_run_config"]

RUN_FILE = "run.json"


def fingerprint(value: Any) -> str:
    """Short stable hash of any JSON-serialisable value (prompt texts, model identities...)."""
    blob = json.dumps(value, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Short content hash of a file (an edited dialogue file is a different benchmark)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class RunConfig(BaseModel):
    """What a results folder was produced with. ``models`` is filled in once the models are built."""

    model_config = ConfigDict(frozen=True)

    benchmark: str
    preset: str
    data: str
    split: str
    routes: list[str]
    prompts: str
    first_text_only: bool
    dialogue: str | None = None
    extra: dict[str, str] = {}
    models: str | None = None


def _differences(old: RunConfig, new: RunConfig, ignore: tuple[str, ...]) -> list[str]:
    diffs = []
    for key in RunConfig.model_fields:
        if key in ignore:
            continue
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            diffs.append(f"{key}: {before!r} -> {after!r}")
    return diffs


def check_run_config(out_dir: Path, config: RunConfig, *, ignore: tuple[str, ...] = ()) -> RunConfig | None:
    """Return the folder's stored config (``None`` for a new folder); raise :class:`InputError` if it differs.

    ``ignore`` names fields not yet known (``models`` before the models are loaded); a stored ``models``
    of ``None`` (a run interrupted while loading) also matches anything.
    """
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        stored = RunConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{path} is unreadable ({first}); use a new --out") from None
    skip = ignore + (("models",) if stored.models is None else ())
    diffs = _differences(stored, config, skip)
    if diffs:
        raise InputError(f"{out_dir} holds results of a different run ({'; '.join(diffs)}); "
                         "use a new --out to start a separate run")
    return stored


def write_run_config(out_dir: Path, config: RunConfig) -> None:
    write_atomic(Path(out_dir) / RUN_FILE, config.model_dump_json(indent=2) + "\n")
