"""Dataset kinds, registered in one place for training (``llavaseg-train``) and benchmarking (``llavaseg-bench``).

A :class:`DataSource` names a data set as plain data (kind, path, split, options), so configs and run records can
hold it; :func:`open_dataset` turns it into a loader with ``queries()``. Adding a format means adding one entry
to :data:`DATASET_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llavaseg.errors import InputError

__all__ = ["DatasetKind", "DataSource", "DATASET_KINDS", "open_dataset"]

DatasetKind = Literal["reasonseg", "refcoco", "jsonl"]


class DataSource(BaseModel):
    """One data set (and, in a training mixture, its sampling rate: LISA's ``--sample_rates``)."""

    model_config = ConfigDict(extra="forbid")

    kind: DatasetKind = "reasonseg"
    path: Path
    split: str = "train"
    rate: float = Field(1.0, gt=0)
    refcoco_dataset: str = "refcoco"
    split_by: str = "unc"
    image_dir: Path | None = None  # refcoco: where the COCO images are (default: refer's layout under path)
    first_text_only: bool = False


def _reasonseg(source: DataSource) -> Any:
    from llavaseg.data.reasonseg import ReasonSegDataset

    return ReasonSegDataset(source.path, source.split, first_text_only=source.first_text_only)


def _refcoco(source: DataSource) -> Any:
    from llavaseg.data.refcoco import RefCocoDataset

    return RefCocoDataset(source.path, source.refcoco_dataset, source.split_by, source.split,
                          image_dir=source.image_dir)


def _jsonl(source: DataSource) -> Any:
    from llavaseg.data.jsonl import JsonlDataset

    return JsonlDataset(source.path)


DATASET_KINDS: dict[str, Callable[[DataSource], Any]] = {"reasonseg": _reasonseg, "refcoco": _refcoco,
                                                         "jsonl": _jsonl}


def open_dataset(source: DataSource) -> Any:
    """The loader of ``source`` (anything with ``queries()``); a missing path is a one-line error."""
    if source.kind not in DATASET_KINDS:
        raise InputError(f"unknown dataset kind {source.kind!r}; known: {', '.join(DATASET_KINDS)}")
    if not Path(source.path).exists():
        raise InputError(f"{source.kind} data not found: {source.path}")
    return DATASET_KINDS[source.kind](source)
