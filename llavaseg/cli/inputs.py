"""What ``llavaseg segment`` is asked to do: one image, a folder, a glob, or a JSONL of (image, query) lines.

Everything is checked here, before any model loads: files exist, queries are non-empty, output names are unique.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from llavaseg.data.base import json_object_lines
from llavaseg.errors import InputError
from llavaseg.images import check_query

__all__ = ["IMAGE_SUFFIXES", "SegmentJob", "collect_jobs"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SegmentJob:
    """One image and query; ``name`` names its output files (unique within a run)."""

    image: Path
    query: str
    name: str


def _images_in(paths: list[Path], what: str) -> list[Path]:
    images = sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {what}")
    return images


def _unique_names(pairs: list[tuple[Path, str, str | None]]) -> list[SegmentJob]:
    jobs, seen = [], set()
    for image, query, wanted in pairs:
        base = _UNSAFE.sub("_", wanted or image.stem).strip("._") or "image"
        name, n = base, 1
        while name in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name)
        jobs.append(SegmentJob(image, query, name))
    return jobs


def _jsonl_jobs(path: Path) -> list[SegmentJob]:
    pairs = []
    for number, record in json_object_lines(path):
        if not isinstance(record.get("image"), str) or "query" not in record:
            raise InputError(f"{path} line {number}: needs string fields 'image' and 'query'")
        image = Path(record["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise InputError(f"{path} line {number}: image not found: {image}")
        try:
            query = check_query(record["query"])
        except InputError as exc:
            raise InputError(f"{path} line {number}: {exc}") from None
        pairs.append((image, query, str(record["id"]) if record.get("id") is not None else None))
    if not pairs:
        raise InputError(f"{path} has no (image, query) lines")
    return _unique_names(pairs)


def collect_jobs(source: str, query: str | None) -> tuple[list[SegmentJob], bool]:
    """The jobs ``source`` names, and whether it named a single image (the one-file output form)."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".jsonl" and path.is_file():
        if query is not None:
            raise InputError("a JSONL input carries its own queries; drop the QUERY argument")
        return _jsonl_jobs(path), False
    if query is None:
        raise InputError("a QUERY is required (or give a JSONL of {image, query} lines)")
    query = check_query(query)
    if path.is_file():
        return [SegmentJob(path, query, path.stem)], True
    if path.is_dir():
        images = _images_in(list(path.iterdir()), str(path))
    elif glob.has_magic(source):
        images = _images_in([Path(p) for p in glob.glob(str(path), recursive=True)], f"the pattern {source!r}")
    else:
        raise InputError(f"image file not found: {path}")
    return _unique_names([(image, query, None) for image in images]), False
