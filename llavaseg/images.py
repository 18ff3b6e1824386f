"""Normalise whatever users pass as an image into one form: an ``HxWx3`` uint8 RGB numpy array.

Every route and model wrapper works on that form only, so the many ways an image can arrive (path, PIL image
in any mode, grey/RGBA/float arrays) are handled once here, with errors that name the problem.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from llavaseg.errors import InputError

ImageLike = Union[str, Path, Image.Image, np.ndarray]


def _from_pil(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: transparent pixels have undefined colour, white is what viewers show.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"image array has shape {array.shape}; expected HxW, HxWx3 or HxWx4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"image array is empty (shape {array.shape})")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("image array contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        return _from_pil(Image.fromarray(np.ascontiguousarray(array), mode="RGBA"))
    return np.ascontiguousarray(array)


def load_image(image: ImageLike) -> np.ndarray:
    """Return ``image`` as an ``HxWx3`` uint8 RGB array; raise :class:`InputError` naming the problem."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise InputError(f"image file not found: {path}")
        if not path.is_file():
            raise InputError(f"image path is not a file: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                return _from_pil(opened)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"cannot read image {path}: not a valid image file ({type(exc).__name__})") from None
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise InputError(f"unsupported image type {type(image).__name__}; pass a path, PIL image or numpy array")


def image_digest(image: np.ndarray) -> str:
    """Content hash of a normalised image: the key for every per-image cache (same pixels, same key)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def check_query(query: object) -> str:
    """A query must be a non-empty string; return it stripped."""
    if not isinstance(query, str):
        raise InputError(f"query must be a string, got {type(query).__name__}")
    stripped = query.strip()
    if not stripped:
        raise InputError("query is empty")
    return stripped
