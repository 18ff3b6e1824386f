"""What an image tower sees of one region of an image: the region on grey, whole frame or cropped.

The training-free route scores SAM proposals with the frozen CLIP image tower through these views, and the
tiny-world CLIP recipe trains on exactly the same views.
"""

from __future__ import annotations

import numpy as np

from llavaseg.errors import InputError

__all__ = ["VIEW_FILL", "HIGHLIGHT_DIM", "proposal_view", "highlight_view"]

VIEW_FILL = (128, 128, 128)
"""Paint for every pixel outside a proposal. Mid grey: far from all tiny-world colours and backgrounds,
and the value open_clip's normalisation maps close to zero. The tiny-world CLIP is trained on this view."""


def proposal_view(image: np.ndarray, mask: np.ndarray, view: str = "frame", margin: float = 0.25) -> np.ndarray:
    """What the CLIP image tower sees for one mask: ``uint8 HxWx3`` (``frame``) or a square crop (``box``).

    ``frame`` keeps the image geometry (so location is visible) and greys out everything outside ``mask``.
    ``box`` does the same, then crops a square around the mask's bounding box grown by ``margin`` per side.
    """
    if mask.shape != image.shape[:2]:
        raise InputError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    if view not in ("frame", "box"):
        raise InputError(f"unknown proposal view {view!r}; expected 'frame' or 'box'")
    out = np.empty_like(image)
    out[...] = np.asarray(VIEW_FILL, dtype=image.dtype)
    out[mask] = image[mask]
    if view == "frame":
        h, w = mask.shape
        if h == w:
            return out
        # CLIP's preprocess centre-crops to a square: pad instead, so no part of the frame is cut away.
        side = max(h, w)
        square = np.empty((side, side, 3), dtype=image.dtype)
        square[...] = np.asarray(VIEW_FILL, dtype=image.dtype)
        square[(side - h) // 2: (side - h) // 2 + h, (side - w) // 2: (side - w) // 2 + w] = out
        return square
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return out
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    half = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) * (0.5 + margin)
    half = max(half, 4.0)
    x0, y0, x1, y1 = (int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    h, w = mask.shape
    padded = np.empty((y1 - y0, x1 - x0, 3), dtype=image.dtype)
    padded[...] = np.asarray(VIEW_FILL, dtype=image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    padded[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = out[sy0:sy1, sx0:sx1]
    return padded


HIGHLIGHT_DIM = 0.35
"""How much of the original image is kept outside a highlighted region (the rest is mid grey): dim enough that
the highlighted object stands out, bright enough that the others stay recognisable for relational queries."""


def highlight_view(image: np.ndarray, mask: np.ndarray, dim: float = HIGHLIGHT_DIM) -> np.ndarray:
    """What the MLLM is shown to check one candidate: the image with ``mask`` as it is and everything else
    blended toward grey (``dim`` of the original kept), same size, so location and context remain visible."""
    if mask.shape != image.shape[:2]:
        raise InputError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    if not 0.0 <= dim <= 1.0:
        raise InputError(f"dim must be in [0, 1], got {dim}")
    fill = np.asarray(VIEW_FILL, dtype=np.float32)
    blended = image.astype(np.float32) * dim + fill * (1.0 - dim)
    out = np.rint(blended).clip(0, 255).astype(np.uint8)
    out[mask.astype(bool)] = image[mask.astype(bool)]
    return out
