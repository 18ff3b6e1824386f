"""The minimal interface shared by every dataset loader (ReasonSeg, RefCOCO, JSONL).

An evaluation loop needs nothing else from a dataset than an iterable of *queries*: one text, the image it
refers to, and the ground-truth mask. Keeping the interface this small lets the evaluator and the benchmark
scripts treat LISA's ReasonSeg, the refer-style RefCOCO family and a user's own JSONL file alike.

Ground-truth masks are ``uint8`` ``H x W`` arrays with values ``0`` (background), ``1`` (target) and
optionally ``255`` (ignored by the metric, LISA's convention). Images are ``uint8`` ``H x W x 3`` RGB arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image

from llavaseg.errors import InputError

__all__ = ["SegQuery", "SegDataset", "read_rgb", "image_hw", "IGNORE_VALUE"]

IGNORE_VALUE = 255
"""Mask value excluded from the metric (LISA's ``ignore_index``)."""


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
    """Read an image as ``uint8 H x W x 3`` RGB exactly as LISA does (``cv2.imread`` then BGR->RGB).

    ``cv2.imread`` applies the EXIF orientation tag, and so does LabelMe when annotating, so polygon
    coordinates match the image returned here. Grayscale and RGBA files come back as 3-channel RGB.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        # cv2 cannot open some paths (e.g. non-ASCII on Windows) or formats; fall back to Pillow.
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the same user-facing problem
            raise InputError(f"cannot decode image {path}: {exc}") from None
    return np.ascontiguousarray(bgr[:, :, ::-1])


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90/270 degrees


def image_hw(path: Path) -> tuple[int, int]:
    """Return ``(height, width)`` of an image as :func:`read_rgb` would return it, reading only the header.

    Masks are rasterised at the image size; decoding the full image just for its size would double the
    cost of ``load_mask``. The EXIF orientation is honoured so the result agrees with ``cv2.imread``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read image header of {path}: {exc}") from None
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return int(height), int(width)
