"""LISA's ReasonSeg dataset: reading, rasterising and writing samples.

Layout (LISA README): ``dataset/reason_seg/ReasonSeg/{train,val,test}/<name>.jpg`` next to ``<name>.json``.
Each JSON is a LabelMe-style file with three keys LISA reads:

* ``text``: list of instructions (1 to 5 GPT rephrasings in train);
* ``is_sentence``: ``True`` for long (sentence) queries, ``False`` for short (phrase) queries;
* ``shapes``: LabelMe polygons, each with ``label`` and ``points`` (``[[x, y], ...]`` in pixels).

The mask is rebuilt from the polygons exactly as LISA's ``get_mask_from_json`` does (see
:func:`polygons_to_mask`): value 1 = target, 255 = ignored by the metric, 0 = background.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from llavaseg.atomic import atomic_write
from llavaseg.data.base import IGNORE_VALUE, check_coordinates, image_hw, read_rgb
from llavaseg.errors import DatasetFormatError, InputError

__all__ = [
    "ReasonSegSample",
    "ReasonSegQuery",
    "ReasonSegDataset",
    "polygons_to_mask",
    "load_reasonseg_json",
    "write_reasonseg_sample",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_NAMES = ("train", "val", "test")
"""ReasonSeg's split folder names: a folder so named is that split, whatever split is asked for."""
LABELME_VERSION = "5.0.1"
"""Version string written into new files. LISA ignores it; LabelMe uses it only to warn on mismatch."""


# ----------------------------------------------------------------------------------------------- reading


def load_reasonseg_json(path: Path) -> dict[str, Any]:
    """Parse a ReasonSeg JSON file, falling back to cp1252 when it is not valid UTF-8.

    Some ReasonSeg files were saved by Windows tools in the cp1252 code page (curly quotes, accented
    letters), so strict UTF-8 decoding fails on them. LISA retries with cp1252; we do the same so that
    the same texts come out. Missing or unparsable files raise :class:`DatasetFormatError`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetFormatError(f"ReasonSeg annotation not found: {path}") from None
    except OSError as exc:
        raise DatasetFormatError(f"cannot read ReasonSeg annotation {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as exc:
            raise DatasetFormatError(f"{path}: neither UTF-8 nor cp1252 text ({exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _validate_annotation(data: dict[str, Any], path: Path) -> tuple[list[str], bool, list[dict[str, Any]]]:
    """Check the keys LISA needs and return ``(texts, is_sentence, shapes)``; raise a one-line error otherwise."""
    missing = [k for k in ("text", "is_sentence", "shapes") if k not in data]
    if missing:
        raise DatasetFormatError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)}")
    texts = data["text"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DatasetFormatError(f"{path}: 'text' must be a list of strings")
    if not texts:
        raise DatasetFormatError(f"{path}: 'text' is empty, the sample has no query")
    is_sentence = data["is_sentence"]
    if not isinstance(is_sentence, bool):
        raise DatasetFormatError(f"{path}: 'is_sentence' must be true or false, got {is_sentence!r}")
    shapes = data["shapes"]
    if not isinstance(shapes, list):
        raise DatasetFormatError(f"{path}: 'shapes' must be a list")
    for i, shape in enumerate(shapes):
        _validate_shape(shape, f"{path}: shapes[{i}]")
    return list(texts), is_sentence, shapes


def _validate_shape(shape: Any, where: str) -> None:
    if not isinstance(shape, dict) or "label" not in shape or "points" not in shape:
        raise DatasetFormatError(f"{where} needs 'label' and 'points'")
    if not isinstance(shape["label"], str):
        raise DatasetFormatError(f"{where}: 'label' must be a string")
    points = shape["points"]
    if not isinstance(points, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points):
        raise DatasetFormatError(f"{where}: 'points' must be a list of [x, y] numbers")
    check_coordinates((c for p in points for c in p), f"{where}: points")


# ------------------------------------------------------------------------------------------ rasterising


def _draw(canvas: np.ndarray, points: Sequence[Sequence[float]], value: int) -> None:
    """Outline then fill one polygon, as LISA does.

    Coordinates are cast with ``np.int32`` (truncation toward zero, not rounding), and the 1-px outline is
    drawn before the fill so that degenerate polygons (a line, a point) still cover their pixels.
    """
    pts = np.array([points], dtype=np.int32)
    if pts.size == 0:
        return
    cv2.polylines(canvas, pts, True, value, 1)
    cv2.fillPoly(canvas, pts, value)


def polygons_to_mask(shapes: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Rasterise LabelMe shapes into a ``uint8`` mask with LISA's ``get_mask_from_json`` semantics.

    * shapes whose label is exactly ``"flag"`` (case-insensitive) are deprecated annotations: skipped;
    * each remaining polygon's area is its pixel count when drawn alone (outline + fill), and polygons are
      drawn by **descending** area, so a small polygon inside a larger one stays visible (e.g. an "ignore"
      hole in a target). Ties keep the order ``np.argsort(areas)[::-1]`` gives, as in LISA;
    * a label containing ``"ignore"`` (case-insensitive) writes 255 (excluded from the metric); any other
      label writes 1.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"mask size must be positive, got {height}x{width}")
    kept: list[dict[str, Any]] = []
    areas: list[int] = []
    for shape in shapes:
        if shape["label"].lower() == "flag":
            continue
        scratch = np.zeros((height, width), dtype=np.uint8)
        _draw(scratch, shape["points"], 1)
        areas.append(int(scratch.sum(dtype=np.int64)))
        kept.append(shape)
    mask = np.zeros((height, width), dtype=np.uint8)
    if not kept:
        return mask
    order = np.argsort(np.asarray(areas, dtype=np.int64))[::-1]
    for idx in order:
        shape = kept[int(idx)]
        value = IGNORE_VALUE if "ignore" in shape["label"].lower() else 1
        _draw(mask, shape["points"], value)
    return mask


# ---------------------------------------------------------------------------------------------- samples


class ReasonSegSample(BaseModel):
    """One ReasonSeg image with its annotation file; texts and ``is_sentence`` are read eagerly."""

    model_config = ConfigDict(frozen=True)

    name: str
    split: str
    image_path: Path
    json_path: Path
    texts: list[str]
    is_sentence: bool

    @classmethod
    def from_files(cls, image_path: Path, json_path: Path, split: str) -> ReasonSegSample:
        """Read and validate ``json_path``; raise :class:`DatasetFormatError` on a broken file."""
        data = load_reasonseg_json(json_path)
        texts, is_sentence, _ = _validate_annotation(data, Path(json_path))
        return cls(
            name=Path(image_path).stem,
            split=split,
            image_path=Path(image_path),
            json_path=Path(json_path),
            texts=texts,
            is_sentence=is_sentence,
        )

    def load_image(self) -> np.ndarray:
        """``uint8 H x W x 3`` RGB, decoded like LISA (``cv2.imread`` + BGR->RGB)."""
        return read_rgb(self.image_path)

    def load_mask(self) -> np.ndarray:
        """``uint8 H x W`` mask with values 0 / 1 / 255, at the image's size (read from its header)."""
        data = load_reasonseg_json(self.json_path)
        _, _, shapes = _validate_annotation(data, self.json_path)
        height, width = image_hw(self.image_path)
        return polygons_to_mask(shapes, height, width)


class ReasonSegQuery(BaseModel):
    """One text of one sample: the unit the evaluator scores. Implements :class:`~llavaseg.data.base.SegQuery`."""

    model_config = ConfigDict(frozen=True)

    sample: ReasonSegSample
    text_index: int
    text: str
    query_id: str

    @property
    def is_sentence(self) -> bool:
        return self.sample.is_sentence

    @property
    def sample_id(self) -> str:
        return f"{self.sample.split}/{self.sample.name}"

    def load_image(self) -> np.ndarray:
        return self.sample.load_image()

    def load_mask(self) -> np.ndarray:
        return self.sample.load_mask()


def _find_split_dir(root: Path, split: str) -> Path:
    """Locate the folder holding the split's image/JSON pairs.

    Accepted: ``root/split``, LISA's nesting ``root/[dataset/][reason_seg/]ReasonSeg/split``, and ``root``
    itself when it already is a split folder (named ``split``, or simply containing JSON files). A split
    folder named after *another* split (``.../val`` asked for as ``test``) is refused: its samples would be
    scored and labelled as the split asked for.
    """
    candidates = [
        root / split,
        root / "ReasonSeg" / split,
        root / "reason_seg" / "ReasonSeg" / split,
        root / "dataset" / "reason_seg" / "ReasonSeg" / split,
    ]
    for cand in candidates:
        if cand.is_dir():
            return cand
    # A data-set root (it holds split folders, and maybe a meta.json) is not a split folder of its own.
    holds_splits = root.is_dir() and any((root / name).is_dir() for name in SPLIT_NAMES)
    if root.is_dir() and not holds_splits and (root.name == split or any(root.glob("*.json"))):
        if root.name.lower() in SPLIT_NAMES and root.name.lower() != split.lower():
            raise DatasetFormatError(f"{root} is the {root.name!r} split folder, not {split!r}: ask for split "
                                     f"{root.name!r}, or give the folder that holds {split}/")
        return root
    if not root.exists():
        raise DatasetFormatError(f"ReasonSeg root not found: {root}")
    raise DatasetFormatError(
        f"ReasonSeg split {split!r} not found under {root} (looked for {split}/ and ReasonSeg/{split}/)"
    )


class ReasonSegDataset:
    """A ReasonSeg split, sorted by file name so runs are deterministic.

    ``queries()`` yields every text of every image by default. LISA's ``validate()`` only scores the first
    text of each image (``sampled_sents[0]``); pass ``first_text_only=True`` to reproduce its numbers.
    """

    def __init__(self, root: Path | str, split: str = "val", first_text_only: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        self.first_text_only = first_text_only
        self.split_dir = _find_split_dir(self.root, split)
        self.samples: list[ReasonSegSample] = self._scan()

    def _scan(self) -> list[ReasonSegSample]:
        images = sorted(
            (p for p in self.split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.name,
        )
        stems = [p.stem for p in images]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise DatasetFormatError(f"{self.split_dir}: several images share the name {dupes[0]!r}")
        samples = []
        for image in images:
            json_path = image.with_suffix(".json")
            if not json_path.is_file():
                raise DatasetFormatError(f"image without annotation: {image} (expected {json_path.name})")
            samples.append(ReasonSegSample.from_files(image, json_path, self.split))
        orphans = sorted(set(p.stem for p in self.split_dir.glob("*.json")) - set(stems))
        if orphans:
            warnings.warn(
                f"{self.split_dir}: {len(orphans)} annotation(s) without image ignored, e.g. {orphans[0]}.json",
                stacklevel=3,
            )
        if not samples:
            raise DatasetFormatError(f"no ReasonSeg samples (*.jpg/*.png + .json) in {self.split_dir}")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ReasonSegSample:
        return self.samples[index]

    def __iter__(self) -> Iterator[ReasonSegSample]:
        return iter(self.samples)

    def queries(self) -> Iterator[ReasonSegQuery]:
        """Yield one :class:`ReasonSegQuery` per (image, text); ``query_id`` is ``"<split>/<name>#<i>"``."""
        for sample in self.samples:
            texts = sample.texts[:1] if self.first_text_only else sample.texts
            for i, text in enumerate(texts):
                yield ReasonSegQuery(sample=sample, text_index=i, text=text, query_id=f"{sample.split}/{sample.name}#{i}")


# ---------------------------------------------------------------------------------------------- writing




def _normalise_shape(shape: dict[str, Any], where: str) -> dict[str, Any]:
    _validate_shape(shape, where)
    return {
        "label": shape["label"],
        "points": [[float(x), float(y)] for x, y in shape["points"]],
        "group_id": shape.get("group_id"),
        "shape_type": shape.get("shape_type", "polygon"),
        "flags": dict(shape.get("flags") or {}),
    }


def _image_suffix(image_format: str) -> str:
    fmt = image_format.lower().lstrip(".")
    if fmt in ("jpg", "jpeg"):
        return ".jpg"
    if fmt == "png":
        return ".png"
    raise InputError(f"image_format must be 'jpg' or 'png', got {image_format!r}")


def _as_rgb_pil(image: Image.Image | np.ndarray, name: str) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(f"image for sample {name!r} must be uint8 HxW, HxWx3 or HxWx4, got "
                             f"{image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise InputError(f"image for sample {name!r} must be a PIL image or numpy array, got {type(image).__name__}")


def write_reasonseg_sample(
    split_dir: Path | str,
    name: str,
    image: Image.Image | np.ndarray,
    texts: list[str],
    is_sentence: bool,
    shapes: list[dict[str, Any]],
    *,
    image_format: str = "jpg",
) -> tuple[Path, Path]:
    """Write ``split_dir/name.jpg`` (JPEG quality 95, or ``.png``) and ``split_dir/name.json`` in ReasonSeg format.

    ``image`` is a PIL image or an RGB ``uint8`` array (``H x W x 3`` or ``H x W``). ``shapes`` are
    LabelMe shapes; only ``label`` and ``points`` are required, the other LabelMe fields are filled in.
    The JSON carries LISA's three keys plus the LabelMe header (``version``, ``flags``, ``imagePath``,
    ``imageData: null``, ``imageHeight``, ``imageWidth``) so that LabelMe can open and edit it.

    Both files are written atomically, the JSON first: the loader keys on images, so an interrupted write
    leaves at worst an orphan JSON (ignored with a warning), never an image without annotation.
    Returns ``(image_path, json_path)``.
    """
    split_dir = Path(split_dir)
    if not name or Path(name).name != name or name in (".", ".."):
        raise InputError(f"sample name must be a plain file stem, got {name!r}")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"texts for sample {name!r} must be a non-empty list of strings")
    suffix = _image_suffix(image_format)
    pil = _as_rgb_pil(image, name)
    width, height = pil.size

    try:
        norm_shapes = [_normalise_shape(s, f"sample {name!r}: shapes[{i}]") for i, s in enumerate(shapes)]
    except DatasetFormatError as exc:
        raise InputError(str(exc)) from None
    image_path = split_dir / f"{name}{suffix}"
    json_path = split_dir / f"{name}.json"
    payload = {
        "version": LABELME_VERSION,
        "flags": {},
        "text": list(texts),
        "is_sentence": bool(is_sentence),
        "shapes": norm_shapes,
        "imagePath": image_path.name,
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }
    split_dir.mkdir(parents=True, exist_ok=True)
    body = json.dumps(payload, ensure_ascii=False, indent=2) + "\n"
    atomic_write(json_path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
    if suffix == ".jpg":
        atomic_write(image_path, lambda tmp: pil.save(tmp, format="JPEG", quality=95))
    else:
        atomic_write(image_path, lambda tmp: pil.save(tmp, format="PNG"))
    return image_path, json_path
