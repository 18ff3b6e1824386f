"""The minimal interface shared by every dataset loader (ReasonSeg, RefCOCO, JSONL).

An evaluation loop needs nothing else from a dataset than an iterable of *queries*: one text, the image it
refers to, and the ground-truth mask. Keeping the interface this small lets the evaluator and the benchmark
scripts treat LISA's ReasonSeg, the refer-style RefCOCO family and a user's own JSONL file alike.

Ground-truth masks are ``uint8`` ``H x W`` arrays with values ``0`` (background), ``1`` (target) and
optionally ``255`` (ignored by the metric, LISA's convention). Images are ``uint8`` ``H x W x 3`` RGB arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from llavaseg.errors import DatasetFormatError
from llavaseg.images import MAX_ASPECT_RATIO, MAX_PIXELS, image_size, load_image

__all__ = ["SegQuery", "SegDataset", "read_rgb", "image_hw", "check_coordinates", "json_object_lines",
           "IGNORE_VALUE", "MAX_COORDINATE"]

IGNORE_VALUE = 255
"""Mask value excluded from the metric (LISA's ``ignore_index``)."""

MAX_COORDINATE = 2**17
"""Largest polygon coordinate (in pixels, either sign) a data file may hold: above the longest side an accepted
image can have (``sqrt(MAX_PIXELS * MAX_ASPECT_RATIO)`` = 80,000), far below what makes the rasterisers slow
(OpenCV takes seconds at 2**30) or pycocotools allocate gigabytes."""
assert math.sqrt(MAX_PIXELS * MAX_ASPECT_RATIO) < MAX_COORDINATE


def check_coordinates(values: object, where: str) -> None:
    """Refuse polygon coordinates that are not finite numbers within :data:`MAX_COORDINATE` (one line naming
    ``where``), before any rasteriser sees them."""
    for value in values:  # type: ignore[attr-defined]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DatasetFormatError(f"{where}: coordinate {value!r} is not a number")
        if not math.isfinite(value) or abs(value) > MAX_COORDINATE:
            raise DatasetFormatError(f"{where}: coordinate {value!r} is not finite or beyond "
                                     f"+-{MAX_COORDINATE} px")


@runtime_checkable
class SegQuery(Protocol):
    """One text query with its image and ground-truth mask.

    ``query_id`` is unique within its dataset and stable across runs (it names results files).
    ``is_sentence`` is ReasonSeg's long-query flag; loaders without the notion report ``False``.
    ``sample_id`` names the image-level sample the query belongs to and ``text_index`` is the query's
    position among that sample's texts; both only label results
    (:class:`llavaseg.evaluate.QueryRecord` ``sample`` / ``text_index``) and never change a metric.
    """

    @property
    def query_id(self) -> str: ...

    @property
    def sample_id(self) -> str: ...

    @property
    def text_index(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def is_sentence(self) -> bool: ...

    def load_image(self) -> np.ndarray: ...

    def load_mask(self) -> np.ndarray: ...


@runtime_checkable
class SegDataset(Protocol):
    """A deterministic, finite source of :class:`SegQuery` objects."""

    def queries(self) -> Iterator[SegQuery]: ...


def read_rgb(path: Path) -> np.ndarray:
    """Read an image as ``uint8 H x W x 3`` RGB, upright, with the one loader everything uses
    (:func:`llavaseg.images.load_image`): the API, the CLI and every data set see the same pixels.

    The EXIF orientation is applied, as LabelMe does when annotating and ``cv2.imread`` does in LISA's loader,
    so polygon coordinates match the image returned here.
    """
    return load_image(Path(path))


def image_hw(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image as :func:`read_rgb` returns it, from the header only (masks are
    rasterised at the image size; decoding the whole image for its size would double ``load_mask``'s cost)."""
    return image_size(Path(path))


def json_object_lines(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file (``text``, or ``path`` read as
    UTF-8); a line that is not a JSON object is one :class:`DatasetFormatError` naming the file and line."""
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DatasetFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{Path(path).name} line {number}: invalid JSON ({exc.msg} at column "
                                     f"{exc.colno})") from None
        if not isinstance(record, dict):
            raise DatasetFormatError(f"{Path(path).name} line {number}: expected a JSON object")
        yield number, record
