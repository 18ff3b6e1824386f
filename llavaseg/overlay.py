"""Mask visualisation shared by the CLI and the benchmark: a mask PNG and a translucent overlay."""

from __future__ import annotations

import numpy as np
from PIL import Image

OVERLAY_COLOR = (255, 40, 200)


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR,
            alpha: float = 0.5) -> Image.Image:
    """``image`` with ``mask`` tinted in ``color`` and its outline drawn fully opaque."""
    base = image.astype(np.float32).copy()
    tint = np.array(color, dtype=np.float32)
    base[mask] = (1 - alpha) * base[mask] + alpha * tint
    edge = mask & ~_erode(mask)
    base[edge] = tint
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def mask_image(mask: np.ndarray) -> Image.Image:
    """A black-and-white 8-bit PNG-ready image of a bool mask (255 = foreground)."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
