"""A simple user dataset format: one JSON object per line.

Each line describes one query::

    {"image": "imgs/cat.jpg", "query": "the animal that is sleeping", "mask": "masks/cat.png"}
    {"image": "imgs/cat.jpg", "query": "the cushion", "polygons": [[[10, 10], [50, 10], [50, 40]]],
     "is_sentence": false, "id": "cat-cushion"}

* ``image``: path, relative to the JSONL file's folder (absolute paths are kept as they are);
* ``query``: the text;
* exactly one of ``mask`` (a PNG/any image: nonzero = target; with ``ignore_value`` set, pixels equal to
  it become 255 = ignored by the metric) or ``polygons`` (a list of ``[[x, y], ...]`` point lists, or of
  LabelMe shapes ``{"label": ..., "points": ...}`` so that ``"ignore"`` regions can be drawn too);
  polygons are rasterised exactly like ReasonSeg's (see :func:`~llavaseg.data.reasonseg.polygons_to_mask`);
* optional ``is_sentence`` (default ``false``) and ``id`` (default ``"<file stem>:<line number>"``).

Several targets or none (gRefCOCO-style): ``"mask"`` may be a list of mask files, one per instance (the ground
truth is their union, ``n_targets`` their number), and ``"no_target": true`` (with neither ``mask`` nor
``polygons``) is a query whose answer is "nothing": its ground truth is empty, so only an empty prediction
scores (IoU 1, counted by N-acc).

The file is validated line by line when the dataset is opened, so a typo is reported with its line number
before any model runs; masks and images are only decoded on ``load_mask`` / ``load_image``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from llavaseg.data.base import IGNORE_VALUE, image_hw, json_object_lines, read_rgb
from llavaseg.data.reasonseg import _validate_shape, polygons_to_mask
from llavaseg.errors import DatasetFormatError

__all__ = ["JsonlQuery", "JsonlDataset", "read_mask_image"]


def read_mask_image(path: Path, ignore_value: int | None = None) -> np.ndarray:
    """Read a mask image as ``uint8`` 0/1/255: nonzero -> 1, ``ignore_value`` -> 255 (if given).

    Colour masks are reduced with the per-pixel maximum over channels (alpha dropped), so any coloured
    pixel counts as target; palette PNGs are read as their indices (index 0 = background).
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetFormatError(f"mask file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001
        raise DatasetFormatError(f"cannot decode mask {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    arr = arr.astype(np.int64)
    out = (arr != 0).astype(np.uint8)
    if ignore_value is not None:
        out[arr == ignore_value] = IGNORE_VALUE
    return out


class JsonlQuery(BaseModel):
    """One line of a JSONL dataset. Implements :class:`~llavaseg.data.base.SegQuery`."""

    model_config = ConfigDict(frozen=True)

    query_id: str
    text: str
    is_sentence: bool = False
    image_path: Path
    mask_path: Path | None = None
    mask_paths: list[Path] | None = None  # several instance masks (their union is the ground truth)
    no_target: bool = False
    shapes: list[dict[str, Any]] | None = None
    ignore_value: int | None = None
    sample_id: str
    text_index: int = 0
    line: int

    def load_image(self) -> np.ndarray:
        return read_rgb(self.image_path)

    @property
    def n_targets(self) -> int | None:
        """Annotated instances when the line says (a list of masks, or ``no_target``), else ``None``."""
        if self.no_target:
            return 0
        return len(self.mask_paths) if self.mask_paths is not None else None

    def load_mask(self) -> np.ndarray:
        """``uint8`` 0/1(/255) mask at the image's size; a mask file of another size is an error."""
        height, width = image_hw(self.image_path)
        if self.no_target:
            return np.zeros((height, width), dtype=np.uint8)
        if self.shapes is not None:
            return polygons_to_mask(self.shapes, height, width)
        paths = self.mask_paths if self.mask_paths is not None else [self.mask_path]
        union = np.zeros((height, width), dtype=np.uint8)
        for path in paths:
            assert path is not None
            mask = read_mask_image(path, self.ignore_value)
            if mask.shape != (height, width):
                raise DatasetFormatError(
                    f"line {self.line}: mask {path.name} is {mask.shape[1]}x{mask.shape[0]} "
                    f"but image {self.image_path.name} is {width}x{height}"
                )
            # a target pixel of any instance wins over an ignore pixel of another
            union = np.where(mask == 1, 1, np.where((union == 0) & (mask == IGNORE_VALUE), IGNORE_VALUE, union))
        return union.astype(np.uint8)


def _shapes_from_polygons(polygons: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(polygons, list) or not polygons:
        raise DatasetFormatError(f"{where}: 'polygons' must be a non-empty list")
    shapes = []
    for i, poly in enumerate(polygons):
        shape = poly if isinstance(poly, dict) else {"label": "target", "points": poly}
        _validate_shape(shape, f"{where}: polygons[{i}]")
        shapes.append({"label": shape["label"], "points": shape["points"]})
    return shapes


class JsonlDataset:
    """Queries from a JSONL file, in file order. ``len()`` is the number of queries (non-blank lines)."""

    def __init__(self, path: Path | str, *, ignore_value: int | None = None) -> None:
        self.path = Path(path)
        self.ignore_value = ignore_value
        if not self.path.is_file():
            raise DatasetFormatError(f"JSONL dataset not found: {self.path}")
        self._queries = self._parse()

    def _resolve(self, value: Any, key: str, where: str) -> Path:
        if not isinstance(value, str) or not value:
            raise DatasetFormatError(f"{where}: '{key}' must be a non-empty path string")
        p = Path(value)
        p = p if p.is_absolute() else self.path.parent / p
        if not p.is_file():
            raise DatasetFormatError(f"{where}: {key} file not found: {p}")
        return p

    def _ground_truth(self, rec: dict[str, Any], where: str) -> dict[str, Any]:
        """The line's ground-truth fields: exactly one of ``mask`` (a file or a list of instance files),
        ``polygons`` or ``"no_target": true``."""
        no_target = rec.get("no_target", False)
        if not isinstance(no_target, bool):
            raise DatasetFormatError(f"{where}: 'no_target' must be true or false")
        given = [key for key in ("mask", "polygons") if key in rec] + (["no_target"] if no_target else [])
        if len(given) != 1:
            raise DatasetFormatError(f"{where}: give exactly one of 'mask' or 'polygons' (or \"no_target\": true)")
        if no_target:
            return {"no_target": True}
        if "polygons" in rec:
            return {"shapes": _shapes_from_polygons(rec["polygons"], where)}
        if isinstance(rec["mask"], list):
            if not rec["mask"]:
                raise DatasetFormatError(f"{where}: 'mask' is an empty list (use \"no_target\": true)")
            return {"mask_paths": [self._resolve(m, "mask", where) for m in rec["mask"]]}
        return {"mask_path": self._resolve(rec["mask"], "mask", where)}

    def _parse(self) -> list[JsonlQuery]:
        queries: list[JsonlQuery] = []
        seen_ids: set[str] = set()
        per_image: dict[str, int] = {}
        for lineno, rec in json_object_lines(self.path):
            where = f"{self.path.name} line {lineno}"
            for key in ("image", "query"):
                if key not in rec:
                    raise DatasetFormatError(f"{where}: missing key '{key}'")
            text = rec["query"]
            if not isinstance(text, str) or not text.strip():
                raise DatasetFormatError(f"{where}: 'query' must be a non-empty string")
            is_sentence = rec.get("is_sentence", False)
            if not isinstance(is_sentence, bool):
                raise DatasetFormatError(f"{where}: 'is_sentence' must be true or false")
            image_path = self._resolve(rec["image"], "image", where)
            ground_truth = self._ground_truth(rec, where)
            qid = str(rec.get("id", f"{self.path.stem}:{lineno}"))
            if qid in seen_ids:
                raise DatasetFormatError(f"{where}: duplicate id {qid!r}")
            seen_ids.add(qid)
            sample_id = rec["image"]
            text_index = per_image.get(sample_id, 0)
            per_image[sample_id] = text_index + 1
            queries.append(JsonlQuery(
                query_id=qid, text=text, is_sentence=is_sentence, image_path=image_path, **ground_truth,
                ignore_value=self.ignore_value, sample_id=sample_id, text_index=text_index, line=lineno,
            ))
        if not queries:
            raise DatasetFormatError(f"{self.path}: no queries (the file is empty)")
        return queries

    def __len__(self) -> int:
        return len(self._queries)

    def __getitem__(self, index: int) -> JsonlQuery:
        return self._queries[index]

    def queries(self) -> Iterator[JsonlQuery]:
        return iter(self._queries)
