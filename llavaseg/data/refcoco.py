"""RefCOCO / RefCOCO+ / RefCOCOg (and RefCLEF) in the layout of the ``refer`` API (lichengunc/refer).

Layout, as ``refer`` and LISA's ``refer_seg`` data expect it::

    <root>/<dataset>/refs(<split_by>).p      # list of refs (pickle), or refs(<split_by>).json
    <root>/<dataset>/instances.json          # COCO-format images / annotations / categories
    <root>/images/mscoco/images/train2014/   # COCO images (RefCLEF: images/saiapr_tc-12/)

LISA's own tree nests this under ``refer_seg/``; that is detected too. Every sentence of every ref in the
split is one query; its mask is the referred annotation's segmentation (polygons or RLE, decoded with
pycocotools). The metric is computed with :mod:`llavaseg.evaluate`; for RefCOCO the papers report cIoU.

gRefCOCO (``grefcoco/grefs(unc).json``, read by LISA's ``grefer.py``) has refs with *several* targets or none:
``ann_id`` is a list, ``[-1]`` (with ``no_target: true``) for an expression that matches nothing. The ground
truth is then the union of the listed annotations, or empty; ``n_targets`` says how many.

Why pickle: the official ``refs(unc).p`` / ``refs(google).p`` files are only distributed as Python
pickles. They are read with an unpickler that builds plain data only (lists, dicts, strings, numbers) and
refuses every class or callable, so a crafted file cannot run code; a ``refs(<split_by>).json`` with the same
content (a list of refs) is preferred when present, and is what to ship if you convert.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict

from llavaseg.data.base import check_coordinates, read_rgb
from llavaseg.errors import DatasetFormatError

__all__ = ["RefCocoQuery", "RefCocoDataset", "decode_segmentation", "load_refs", "DATASETS"]

DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")
_COCO_IMAGE_DIR = Path("images/mscoco/images/train2014")
_CLEF_IMAGE_DIR = Path("images/saiapr_tc-12")


def _compressed_run_lengths(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python), so that they
    can be checked before pycocotools decodes them: its decoder trusts them and writes past the mask when
    they add up to more than its area."""
    if not isinstance(counts, bytes):
        raise DatasetFormatError(f"RLE counts must be a string, got {type(counts).__name__}")
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise DatasetFormatError("RLE counts string ends inside a number")
            code = counts[position] - 48
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_run_lengths(runs: Any, height: int, width: int) -> None:
    """Run lengths must be non-negative integers covering the mask exactly (``height * width`` pixels)."""
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in runs):
        raise DatasetFormatError("RLE counts must be non-negative integers")
    if sum(runs) != height * width:
        raise DatasetFormatError(f"RLE covers {sum(runs)} pixels, the image has {height * width}")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation into a ``uint8`` 0/1 mask of ``height x width``.

    Accepts a list of polygons (``[[x1, y1, x2, y2, ...], ...]``), a list of RLE dicts, a single RLE dict
    (compressed ``counts`` as str/bytes, or uncompressed ``counts`` as a list of ints). An empty
    segmentation gives an all-zero mask, as in LISA.

    ``refer`` and LISA *sum* the per-part masks (``np.sum(m, axis=2)``), so pixels where two parts overlap
    get the value 2, which LISA's 2-bin histogram then silently drops from the ground-truth area. We take
    the union instead (any part -> 1): the mask the annotator meant, and a valid 0/1 input for the
    evaluator. The two differ only on overlapping parts, which are rare in RefCOCO.
    """
    if segmentation is None or (isinstance(segmentation, (list, tuple)) and len(segmentation) == 0):
        return np.zeros((height, width), dtype=np.uint8)
    try:
        if isinstance(segmentation, dict):
            rles = [segmentation]
        elif isinstance(segmentation, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in segmentation):
            for index, polygon in enumerate(segmentation):
                check_coordinates(polygon, f"segmentation polygon {index}")
            polys = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
            if not polys:
                return np.zeros((height, width), dtype=np.uint8)
            rles = mask_utils.frPyObjects(polys, height, width)
        elif isinstance(segmentation, (list, tuple)) and all(isinstance(r, dict) for r in segmentation):
            rles = list(segmentation)
        else:
            raise DatasetFormatError(f"unsupported segmentation type: {type(segmentation).__name__}")
        fixed = []
        for rle in rles:
            counts = rle["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                _check_run_lengths(counts, height, width)
                fixed.append(mask_utils.frPyObjects(dict(rle), height, width))
            else:
                size = [int(s) for s in rle.get("size", (height, width))]
                if size != [height, width]:
                    raise DatasetFormatError(f"RLE size {size} differs from image size {[height, width]}")
                counts = counts.encode() if isinstance(counts, str) else counts
                _check_run_lengths(_compressed_run_lengths(counts), height, width)
                fixed.append({"size": size, "counts": counts})
        with warnings.catch_warnings():
            # pycocotools' __array__ shim warns under numpy 2 on every decode; it is harmless and not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(fixed)  # H x W x N
    except DatasetFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - pycocotools raises bare exceptions on malformed data
        raise DatasetFormatError(f"cannot decode segmentation: {exc}") from None
    return (decoded.reshape(height, width, -1).max(axis=2) > 0).astype(np.uint8)


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a class or callable (the only way a pickle runs code)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: dicts, lists, tuples, strings, numbers, booleans, None.

    Those need no class lookup, so :meth:`find_class` refusing every global leaves nothing that can run code:
    a refs file crafted to call ``os.system`` (or any callable) fails here instead of executing.
    """

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle's API
        raise _RefusedGlobal(f"it refers to {module}.{name}; only plain data (lists, dicts, strings, "
                                     "numbers) is read from a refs pickle")


def _load_plain_pickle(handle) -> Any:
    try:
        return _PlainDataUnpickler(handle).load()
    except UnicodeDecodeError:  # a Python 2 pickle with non-ASCII byte strings
        handle.seek(0)
        return _PlainDataUnpickler(handle, encoding="latin1").load()


def load_refs(path: Path) -> list[dict[str, Any]]:
    """Load a refs file: JSON when the name ends in ``.json``, otherwise refer's pickle, read as plain data only
    (see :class:`_PlainDataUnpickler`; a pickle holding anything else is refused, and the JSON form named)."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            with path.open("r", encoding="utf-8") as fh:
                refs = json.load(fh)
        else:
            with path.open("rb") as fh:
                refs = _load_plain_pickle(fh)
    except FileNotFoundError:
        raise DatasetFormatError(f"refs file not found: {path}") from None
    except _RefusedGlobal as exc:
        raise DatasetFormatError(f"refusing refs file {path}: {exc}; convert it to refs(<split_by>).json "
                                 "(a list of refs)") from None
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DatasetFormatError(f"cannot parse refs file {path}: {type(exc).__name__} {first}".rstrip()) from None
    if not isinstance(refs, list):
        raise DatasetFormatError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _split_matches(ref_split: str, split: str) -> bool:
    """``refer.getRefIds`` split rule: testA/B/C match any ref split containing the letter, test any test*."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def _ann_ids(ref: dict[str, Any]) -> list[Any]:
    """The annotations a ref names: one (refer), a list (gRefCOCO), none (gRefCOCO's ``[-1]`` / ``no_target``)."""
    ann_id = ref["ann_id"]
    ids = ann_id if isinstance(ann_id, list) else [ann_id]
    return [] if ref.get("no_target") else [a for a in ids if a != -1]


class RefCocoQuery(BaseModel):
    """One referring expression (sentence) of one ref. Implements :class:`~llavaseg.data.base.SegQuery`."""

    model_config = ConfigDict(frozen=True)

    query_id: str
    text: str
    raw_text: str
    text_index: int
    ref_id: int
    ann_id: int
    sent_id: int
    image_id: int
    image_path: Path
    height: int
    width: int
    segmentation: Any
    category: str | None = None
    segmentations: list[Any] | None = None  # gRefCOCO: every target's segmentation ([] = no target)
    n_targets: int = 1

    @property
    def is_sentence(self) -> bool:
        return False  # LISA evaluates referring expressions with the short-query template

    @property
    def sample_id(self) -> str:
        return str(self.image_id)

    def load_image(self) -> np.ndarray:
        return read_rgb(self.image_path)

    def load_mask(self) -> np.ndarray:
        """``uint8 H x W`` 0/1 mask at the size recorded in ``instances.json`` (the union of a gRefCOCO ref's
        targets; all zeros when it has none)."""
        if self.segmentations is None:
            return decode_segmentation(self.segmentation, self.height, self.width)
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        for segmentation in self.segmentations:
            mask |= decode_segmentation(segmentation, self.height, self.width)
        return mask


class RefCocoDataset:
    """The queries of one split of a refer-style dataset, ordered by (image id, ref id, sentence).

    ``lowercase=True`` (default) strips and lower-cases sentences like LISA's validation loader does.
    ``image_dir`` overrides where images are looked up (default: refer's ``images/mscoco/images/train2014``
    under ``root``, or ``images/saiapr_tc-12`` for RefCLEF). Images are only opened by ``load_image``.
    """

    def __init__(
        self,
        root: Path | str,
        dataset: str = "refcoco",
        split_by: str = "unc",
        split: str = "val",
        *,
        image_dir: Path | str | None = None,
        lowercase: bool = True,
    ) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.split = split
        base = self.root
        if not (base / dataset).is_dir() and (base / "refer_seg" / dataset).is_dir():
            base = base / "refer_seg"  # LISA's dataset/refer_seg/<dataset> nesting
        self.data_dir = base / dataset
        if not self.data_dir.is_dir():
            raise DatasetFormatError(f"{dataset} folder not found: {self.data_dir}")
        if image_dir is None:
            image_dir = base / (_CLEF_IMAGE_DIR if dataset == "refclef" else _COCO_IMAGE_DIR)
        self.image_dir = Path(image_dir)
        self.refs_path = self._find_refs_file()
        self._queries = self._build(lowercase)

    def _find_refs_file(self) -> Path:
        names = [f"refs({self.split_by}).json", f"refs({self.split_by}).p", "refs.json",
                 f"grefs({self.split_by}).json", f"grefs({self.split_by}).p"]
        for name in names:
            if (self.data_dir / name).is_file():
                return self.data_dir / name
        raise DatasetFormatError(f"no refs file in {self.data_dir} (looked for {', '.join(names)})")

    def _build(self, lowercase: bool) -> list[RefCocoQuery]:
        refs = load_refs(self.refs_path)
        inst_path = self.data_dir / "instances.json"
        try:
            with inst_path.open("r", encoding="utf-8") as fh:
                instances = json.load(fh)
        except FileNotFoundError:
            raise DatasetFormatError(f"instances file not found: {inst_path}") from None
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{inst_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(instances, dict) or not all(k in instances for k in ("images", "annotations")):
            raise DatasetFormatError(f"{inst_path}: expected COCO keys 'images' and 'annotations'")

        try:
            chosen = [r for r in refs if _split_matches(str(r["split"]), self.split)]
        except (KeyError, TypeError):
            raise DatasetFormatError(f"{self.refs_path}: every ref needs a 'split' key") from None
        if not chosen:
            found = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
            raise DatasetFormatError(f"{self.refs_path}: no refs in split {self.split!r} (splits present: {found})")

        wanted_anns = {a for r in chosen for a in _ann_ids(r)}
        anns = {a["id"]: a for a in instances["annotations"] if a.get("id") in wanted_anns}
        images = {im["id"]: im for im in instances["images"]}
        cats = {c["id"]: c.get("name") for c in instances.get("categories", [])}
        try:
            chosen.sort(key=lambda r: (r["image_id"], r["ref_id"]))
            return [query for ref in chosen for query in self._ref_queries(ref, anns, images, cats, lowercase)]
        except (KeyError, TypeError) as exc:
            raise DatasetFormatError(f"{self.refs_path}: malformed ref or image record (missing {exc})") from None

    def _ref_queries(self, ref: dict[str, Any], anns: dict, images: dict, cats: dict, lowercase: bool
                     ) -> list[RefCocoQuery]:
        """One query per sentence of ``ref`` (a gRefCOCO ref may name several annotations, or none)."""
        inst_path = self.data_dir / "instances.json"
        ref_id, image_id, ann_ids = int(ref["ref_id"]), ref["image_id"], _ann_ids(ref)
        for ann_id in ann_ids:
            if ann_id not in anns:
                raise DatasetFormatError(f"ref {ref_id}: annotation {ann_id} not in {inst_path}")
        if image_id not in images:
            raise DatasetFormatError(f"ref {ref_id}: image {image_id} not in {inst_path}")
        image = images[image_id]
        several = isinstance(ref["ann_id"], list)
        category = ref.get("category_id")
        category = category[0] if isinstance(category, list) and category else category
        queries = []
        for idx, sent in enumerate(ref["sentences"]):
            raw = str(sent["sent"]) if "sent" in sent else str(sent["raw"])
            sent_id = int(sent.get("sent_id", idx))
            queries.append(RefCocoQuery(
                query_id=f"{self.dataset}_{self.split_by}_{self.split}/{ref_id}#{sent_id}",
                text=raw.strip().lower() if lowercase else raw.strip(), raw_text=raw, text_index=idx, ref_id=ref_id,
                ann_id=int(ann_ids[0]) if ann_ids else -1, sent_id=sent_id, image_id=int(image_id),
                image_path=self.image_dir / image["file_name"], height=int(image["height"]),
                width=int(image["width"]), segmentation=anns[ann_ids[0]].get("segmentation") if ann_ids else None,
                segmentations=[anns[a].get("segmentation") for a in ann_ids] if several else None,
                n_targets=len(ann_ids), category=cats.get(category) if not isinstance(category, list) else None,
            ))
        return queries

    def __len__(self) -> int:
        """Number of queries (sentences) in the split."""
        return len(self._queries)

    def __getitem__(self, index: int) -> RefCocoQuery:
        return self._queries[index]

    def queries(self) -> Iterator[RefCocoQuery]:
        return iter(self._queries)
