"""Reading predictions made by any system, and matching them to a data set's queries (``llavaseg-bench score``).

Two forms are read:

* a **folder of mask PNGs** named ``<image stem>_<text index>.png`` (non-zero pixels = foreground), or
  ``<image stem>.png`` - one mask per image, as LISA-style scripts write them, read as a prediction for the
  *first* text of each image only (the other texts are then not part of the selection, rather than missing);
* a **JSONL** file, one prediction per line: ``{"sample_id": ..., "text_index": ..., "rle": {...}}`` or
  ``{"query_id": ..., "png": "masks/x.png"}``. ``rle`` is a COCO RLE (compressed or not) or a list of them
  (one per instance: their union is scored); ``png`` is relative to the JSONL's folder; ``mask`` is read as
  ``rle`` and ``sample`` as ``sample_id``, so a route run's ``queries-<route>.jsonl`` is itself a prediction
  set; a line with an ``error`` (and no mask) is a query the system failed on, scored as a failure.

``text index`` is the query's position among its image's texts in the data set's order (ReasonSeg: the index
in the JSON's ``text`` list; JSONL data: the order of its lines for that image; refer data: the order of
(ref id, sentence id) within the image). ``sample_id`` is the data set's (``val/<name>`` for ReasonSeg, the
COCO image id for refer data) or the image's file stem.

The rules, each visible in the results: a selected query without a prediction is scored as an **empty mask**
and listed as missing; a prediction that cannot be decoded, or has another size than the image, is a per-query
failure (IoU 0) and listed as unreadable; every file or line that matches no selected query is listed as not
scored, with the reason. Nothing is ignored silently. Ambiguities (two images with one stem, both naming
schemes in one folder, two predictions for one query) are one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llavaseg.bench.report import PredictionSource, Unmatched
from llavaseg.data.base import json_object_lines
from llavaseg.data.jsonl import read_mask_image
from llavaseg.data.refcoco import decode_segmentation
from llavaseg.errors import DatasetFormatError, InputError, LlavasegError

__all__ = ["Prediction", "PredictionSet", "Loaded", "image_stem", "image_positions", "read_predictions",
           "load_prediction", "parse_pred_arg"]


def image_stem(query) -> str:
    """The file stem of a query's image (what prediction PNGs are named after)."""
    path = getattr(query, "image_path", None)
    if path is None and hasattr(query, "sample"):
        path = query.sample.image_path
    return Path(path).stem if path is not None else Path(str(query.sample_id)).name


def image_positions(queries: list) -> dict[str, int]:
    """Each query's position among the queries of its image, in the data set's order."""
    seen: dict[str, int] = {}
    positions = {}
    for query in queries:
        key = str(query.sample_id)
        positions[query.query_id] = seen.get(key, 0)
        seen[key] = positions[query.query_id] + 1
    return positions


@dataclass
class Prediction:
    """One matched prediction, decoded only when scored: a PNG path, RLE data, or a failure message."""

    where: str
    png: Path | None = None
    rle: Any = None
    error: str | None = None

    def load(self, shape: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """``(union mask, instance masks or None)`` at ``shape``; raises :class:`InputError` if unreadable."""
        if self.png is not None:
            mask = read_mask_image(self.png).astype(bool)
            if mask.shape != shape:
                raise InputError(f"{self.where} is {mask.shape[1]}x{mask.shape[0]}, the image is "
                                 f"{shape[1]}x{shape[0]}")
            return mask, None
        if self.rle is None:
            return np.zeros(shape, dtype=bool), None
        parts = self.rle if isinstance(self.rle, list) else [self.rle]
        try:
            masks = [decode_segmentation(part, *shape).astype(bool) for part in parts]
        except DatasetFormatError as exc:
            raise InputError(f"{self.where}: {exc}") from None
        union = np.logical_or.reduce(masks) if masks else np.zeros(shape, dtype=bool)
        return union, masks if isinstance(self.rle, list) else None


@dataclass
class PredictionSet:
    """A prediction set matched to the selection: ``selected`` (query ids to score, in data-set order),
    ``matched`` (query id -> prediction) and the report of what matched and what did not."""

    name: str
    source: PredictionSource
    selected: list[str]
    matched: dict[str, Prediction] = field(default_factory=dict)


def parse_pred_arg(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after the folder or the file's stem)."""
    name, sep, path = value.partition("=")
    if sep and name and "/" not in name and not Path(value).exists():
        return name, Path(path).expanduser()
    path = Path(value).expanduser()
    return (path.stem if path.suffix else path.name) or "predictions", path


def _stems(queries: list) -> dict[str, str]:
    """Image stem -> sample id; two images with one stem make PNG names ambiguous (an error)."""
    stems: dict[str, str] = {}
    for query in queries:
        stem, sample = image_stem(query), str(query.sample_id)
        if stems.setdefault(stem, sample) != sample:
            raise InputError(f"images {stems[stem]!r} and {sample!r} share the file stem {stem!r}, so PNG names "
                             "cannot tell them apart; give a JSONL of predictions with query_id")
    return stems


def _folder_names(queries: list, positions: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Expected file names: ``<stem>_<index>.png`` -> query, ``<stem>.png`` -> the image's first query."""
    _stems(queries)
    indexed = {f"{image_stem(q)}_{positions[q.query_id]}.png": q for q in queries}
    bare = {f"{image_stem(q)}.png": q for q in queries if positions[q.query_id] == 0}
    both = sorted(set(indexed) & set(bare))
    if both:
        raise InputError(f"prediction name {both[0]} fits two queries (an image stem ending in _<number>); "
                         "give a JSONL of predictions with query_id")
    return indexed, bare


def _read_folder(name: str, folder: Path, queries: list, selection: set[str] | None) -> PredictionSet:
    positions = image_positions(queries)
    indexed, bare = _folder_names(queries, positions)
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    by_index = {e.name: indexed[e.name] for e in entries if e.is_file() and e.name in indexed}
    by_image = {e.name: bare[e.name] for e in entries if e.is_file() and e.name in bare}
    if by_index and by_image:
        raise InputError(f"{folder} mixes <image stem>.png ({next(iter(by_image))}) and <image stem>_<text "
                         f"index>.png ({next(iter(by_index))}) names; use one scheme")
    naming = "first-text" if by_image else "per-text"
    chosen = by_image or by_index
    if not chosen:
        example = next(iter(indexed), "x_0.png")
        raise InputError(f"no file in {folder} is named after a query of the data set (expected names like "
                         f"{example}, or <image stem>.png for the first text only)")
    selected = [q.query_id for q in queries if (naming == "per-text" or positions[q.query_id] == 0)
                and (selection is None or q.query_id in selection)]
    wanted = set(selected)
    matched, unmatched = {}, []
    for entry in entries:
        query = chosen.get(entry.name)
        if query is not None and query.query_id in wanted:
            matched[query.query_id] = Prediction(where=entry.name, png=entry)
        else:
            unmatched.append(Unmatched(item=entry.name, reason=_folder_reason(entry, query)))
    source = PredictionSource(path=str(folder), format="png-folder", naming=naming, n_items=len(entries),
                              n_matched=len(matched), missing=[q for q in selected if q not in matched],
                              unmatched=unmatched)
    return PredictionSet(name=name, source=source, selected=selected, matched=matched)


def _folder_reason(entry: Path, query) -> str:
    if entry.is_dir():
        return "a folder (not read)"
    if query is not None:
        return "outside the selection (only the first text of each image is scored)"
    if entry.suffix != ".png":
        return "not a .png file" + (" (names are matched exactly: rename it to .png)"
                                    if entry.suffix.lower() == ".png" else "")
    return "no query of the data set has this name"


def _line_prediction(record: dict[str, Any], where: str, base: Path) -> Prediction:
    """The mask part of one JSONL record (``rle``/``mask``, ``png`` or ``error``)."""
    rle = record.get("rle", record.get("mask"))
    if record.get("png") is not None:
        if not isinstance(record["png"], str) or not record["png"]:
            raise DatasetFormatError(f"{where}: 'png' must be a path")
        path = Path(record["png"])
        return Prediction(where=f"{where} ({record['png']})", png=path if path.is_absolute() else base / path)
    if rle is None and record.get("error"):
        return Prediction(where=where, error=str(record["error"]))
    if rle is not None and not isinstance(rle, (dict, list)):
        raise DatasetFormatError(f"{where}: 'rle' must be a COCO RLE object or a list of them")
    return Prediction(where=where, rle=rle)


def _record_query(record: dict[str, Any], where: str, by_id: dict, by_key: dict) -> tuple[Any, str | None]:
    """The query a record names (``None`` + the reason when it names none)."""
    if "query_id" in record:
        query = by_id.get(str(record["query_id"]))
        return query, None if query is not None else f"no query {record['query_id']!r} in the data set"
    sample = record.get("sample_id", record.get("sample"))
    if sample is None or "text_index" not in record:
        raise DatasetFormatError(f"{where}: a prediction needs query_id, or sample_id and text_index")
    if isinstance(record["text_index"], bool) or not isinstance(record["text_index"], int):
        raise DatasetFormatError(f"{where}: 'text_index' must be an integer")
    query = by_key.get((str(sample), record["text_index"]))
    return query, None if query is not None else f"no text {record['text_index']} of image {sample!r}"


def _jsonl_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    return list(json_object_lines(path))


def _read_jsonl(name: str, path: Path, queries: list, selection: set[str] | None) -> PredictionSet:
    positions = image_positions(queries)
    by_id = {q.query_id: q for q in queries}
    by_key = {(str(q.sample_id), positions[q.query_id]): q for q in queries}
    by_key |= {(image_stem(q), positions[q.query_id]): q for q in queries}
    selected = [q.query_id for q in queries if selection is None or q.query_id in selection]
    wanted = set(selected)
    records = _jsonl_lines(path)
    matched: dict[str, Prediction] = {}
    lines: dict[str, int] = {}
    unmatched = []
    for number, record in records:
        where = f"{path.name} line {number}"
        query, reason = _record_query(record, where, by_id, by_key)
        if query is not None and query.query_id in lines:
            raise InputError(f"{where}: a second prediction for query {query.query_id} (line {lines[query.query_id]})")
        if query is not None and query.query_id not in wanted:
            reason = "outside the selection (only the first text of each image is scored)"
        if reason is not None:
            unmatched.append(Unmatched(item=f"line {number}", reason=reason))
            continue
        lines[query.query_id] = number
        matched[query.query_id] = _line_prediction(record, where, path.parent)
    source = PredictionSource(path=str(path), format="jsonl", naming="per-text", n_items=len(records),
                              n_matched=len(matched), missing=[q for q in selected if q not in matched],
                              unmatched=unmatched)
    return PredictionSet(name=name, source=source, selected=selected, matched=matched)


def read_predictions(name: str, path: Path, queries: list, *, first_text_only: bool = False) -> PredictionSet:
    """Match the predictions at ``path`` (a folder of PNGs or a ``.jsonl``) to ``queries``.

    ``first_text_only`` restricts the selection to the first text of each image (LISA's protocol); a folder
    of ``<image stem>.png`` implies it. Raises :class:`InputError` on an unusable prediction set.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"predictions not found: {path}")
    positions = image_positions(queries)
    selection = {q for q, p in positions.items() if p == 0} if first_text_only else None
    try:
        if path.is_dir():
            return _read_folder(name, path, queries, selection)
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            return _read_jsonl(name, path, queries, selection)
    except OSError as exc:
        raise InputError(f"cannot read predictions {path}: {exc.strerror or exc}") from None
    raise InputError(f"predictions must be a folder of mask PNGs or a .jsonl file, got {path}")


@dataclass
class Loaded:
    """What one query's prediction turned out to be: a mask (and instances), or an error; ``unreadable``
    when the error is ours (the file could not be decoded) rather than a failure the system recorded."""

    mask: np.ndarray | None = None
    instances: list[np.ndarray] | None = None
    error: str | None = None
    unreadable: bool = False


def load_prediction(prediction: Prediction | None, shape: tuple[int, int]) -> Loaded:
    """Decode one query's prediction at the ground truth's ``shape``; a missing one is an empty mask."""
    if prediction is None:
        return Loaded(mask=np.zeros(shape, dtype=bool))
    if prediction.error is not None:
        return Loaded(error=f"recorded failure: {prediction.error}")
    try:
        mask, instances = prediction.load(shape)
    except LlavasegError as exc:
        return Loaded(error=str(exc).strip().splitlines()[0], unreadable=True)
    return Loaded(mask=mask, instances=instances)
