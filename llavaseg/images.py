"""Normalise whatever users pass as an image into one form: an ``HxWx3`` uint8 RGB numpy array.

Every route, model wrapper, data set loader and command works on that form only, and every file goes through
:func:`load_image`, so the API, the CLI and the benchmarks see the same pixels for the same file:

* the EXIF orientation is applied (a phone photo taken upright is upright, as viewers, LabelMe and LISA's
  ``cv2.imread`` show it), so masks come out at the *displayed* size;
* 16-bit and floating-point images are scaled to 8 bits (not clipped to white); palette, grey, grey+alpha,
  RGBA and CMYK images become RGB (transparent pixels on white);
* sizes are guarded: a decompression bomb, an empty image or an extreme aspect ratio is a one-line
  :class:`~llavaseg.errors.InputError`, not an out-of-memory kill or a crash deep inside a model.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llavaseg.errors import InputError

__all__ = ["ImageLike", "MAX_PIXELS", "MAX_ASPECT_RATIO", "load_image", "image_size", "image_digest",
           "check_query", "limit_query", "MAX_QUERY_CHARS"]

ImageLike = Union[str, Path, Image.Image, np.ndarray]

MAX_PIXELS = 100_000_000
"""Largest image accepted (100 megapixels, ~300 MB as RGB): beyond it a file is more likely a bomb than a photo."""

MAX_ASPECT_RATIO = 64.0
"""Longest over shortest side. Segmenters resize the long side to a fixed size; past this the short side
rounds to (almost) nothing."""

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90/270 degrees


def _check_size(height: int, width: int, where: str) -> None:
    if height <= 0 or width <= 0:
        raise InputError(f"{where} is empty ({width}x{height})")
    if height * width > MAX_PIXELS:
        raise InputError(f"{where} is {width}x{height} = {height * width / 1e6:.0f} megapixels, more than the "
                         f"{MAX_PIXELS / 1e6:.0f} accepted (a decompression bomb?); downscale it first")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(f"{where} is {width}x{height}: an aspect ratio over {MAX_ASPECT_RATIO:.0f}:1 cannot be "
                         "segmented; crop it first")


def _scaled_to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit values of an integer or float array: 16-bit by /257, other integers clipped, floats by range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("image contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if array.dtype in (np.uint16, np.int32, np.uint32) and array.max(initial=0) > 255:
        return np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _from_pil(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float single channel
        grey = _scaled_to_uint8(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
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
    _check_size(array.shape[0], array.shape[1], "image array")
    array = _scaled_to_uint8(array)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        return _from_pil(Image.fromarray(np.ascontiguousarray(array), mode="RGBA"))
    return np.ascontiguousarray(array)


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if not path.is_file():
        raise InputError(f"image path is not a file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own guard below says it clearly
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise InputError(f"image {path} is too large to decode (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: not a valid image file ({type(exc).__name__})") from None
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file *as displayed* (EXIF orientation applied), from its header only."""
    path = Path(path)
    with _open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block means no orientation, as viewers treat it
            orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return int(height), int(width)


def _load_file(path: Path) -> np.ndarray:
    with _open(path) as image:
        _check_size(image.size[1], image.size[0], f"image {path}")
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError:
            raise InputError(f"image {path} is too large to decode (a decompression bomb?)") from None
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data after a valid header
            raise InputError(f"cannot read image {path}: not a valid image file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        return _from_pil(upright)


def load_image(image: ImageLike) -> np.ndarray:
    """Return ``image`` as an ``HxWx3`` uint8 RGB array; raise :class:`InputError` naming the problem."""
    if isinstance(image, (str, Path)):
        return _load_file(Path(image))
    if isinstance(image, Image.Image):
        _check_size(image.size[1], image.size[0], "image")
        return _from_pil(ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise InputError(f"unsupported image type {type(image).__name__}; pass a path, PIL image or numpy array")


def image_digest(image: np.ndarray) -> str:
    """Content hash of a normalised image: the key for every per-image cache (same pixels, same key)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


MAX_QUERY_CHARS = 2000
"""Longest query passed to the models (characters); longer ones are cut and the cut is recorded. ReasonSeg's
longest queries are a few hundred characters; 2,000 keeps a query well inside a 4k-token MLLM context next
to the image tokens and the template."""


def check_query(query: object) -> str:
    """A query must be a non-empty string of valid text (no lone surrogates, which no tokenizer can encode);
    return it stripped."""
    if not isinstance(query, str):
        raise InputError(f"query must be a string, got {type(query).__name__}")
    stripped = query.strip()
    if not stripped:
        raise InputError("query is empty")
    for position, char in enumerate(stripped):
        if "\ud800" <= char <= "\udfff":
            raise InputError(f"query has a lone surrogate (U+{ord(char):04X}) at character {position}; "
                             "it is not valid text")
    return stripped


def limit_query(query: str, limit: int = MAX_QUERY_CHARS) -> tuple[str, str | None]:
    """``query`` cut to ``limit`` characters, and a notice saying so (``None`` when it fits)."""
    if len(query) <= limit:
        return query, None
    return query[:limit].rstrip(), f"query truncated to its first {limit} of {len(query)} characters"
