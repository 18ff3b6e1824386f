"""``overlays.png``: the first few queries, ground truth next to every route's mask, for a glance at failures.

Numbers say *how much* a route is wrong; the grid says *how* (wrong object, blob, empty mask). Rows are the
first queries of the selection; column 0 is the image with the ground truth (green, ignore pixels grey),
then one column per route with its predicted mask in the route's colour and its IoU underneath.
Cells are fixed-size squares (images are letterboxed), so the PNG's size depends only on rows and columns:
``width = CELL * columns``, ``height = HEADER + rows * (CELL + LABEL)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llavaseg.bench.jsonl import write_atomic
from llavaseg.overlay import overlay

__all__ = ["CELL", "HEADER", "LABEL", "GT_COLOR", "ROUTE_COLORS", "OverlayRow", "grid_size", "render_grid",
           "write_grid"]

CELL = 160
HEADER = 18
LABEL = 14
GT_COLOR = (40, 220, 60)
IGNORE_COLOR = (128, 128, 128)
ROUTE_COLORS = [(255, 40, 200), (40, 140, 255), (255, 160, 0), (0, 200, 200), (200, 60, 60), (150, 90, 255)]


@dataclass
class OverlayRow:
    """One query: its image, ground truth, and per route ``(mask or None, label)``."""

    image: np.ndarray
    gt: np.ndarray
    text: str
    cells: dict[str, tuple[np.ndarray | None, str]] = field(default_factory=dict)


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    """``(width, height)`` of a grid with ``rows`` queries and ``columns`` columns (ground truth included)."""
    return CELL * columns, HEADER + rows * (CELL + LABEL)


def _fit(image: Image.Image) -> Image.Image:
    """Letterbox into a ``CELL`` square (aspect kept) on a dark background."""
    scale = CELL / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    canvas = Image.new("RGB", (CELL, CELL), (24, 24, 24))
    canvas.paste(image.resize(size, Image.BILINEAR), ((CELL - size[0]) // 2, (CELL - size[1]) // 2))
    return canvas


def _gt_overlay(image: np.ndarray, gt: np.ndarray) -> Image.Image:
    shown = np.asarray(overlay(image, gt == 1, GT_COLOR))
    ignore = gt == 255
    if ignore.any():
        shown = shown.copy()
        shown[ignore] = (0.5 * shown[ignore] + 0.5 * np.array(IGNORE_COLOR)).astype(np.uint8)
    return Image.fromarray(shown)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int, fill=(235, 235, 235)) -> None:
    font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text((xy[0] + 2, xy[1] + 2), text, fill=fill, font=font)


def render_grid(rows: list[OverlayRow], routes: list[str]) -> Image.Image:
    """The grid as a PIL image (see module docstring for the layout)."""
    columns = 1 + len(routes)
    width, height = grid_size(len(rows), columns)
    grid = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(grid)
    titles = ["ground truth", *routes]
    for col, title in enumerate(titles):
        color = GT_COLOR if col == 0 else ROUTE_COLORS[(col - 1) % len(ROUTE_COLORS)]
        _text(draw, (col * CELL, 0), title, CELL, fill=color)
    for r, row in enumerate(rows):
        top = HEADER + r * (CELL + LABEL)
        grid.paste(_fit(_gt_overlay(row.image, row.gt)), (0, top))
        _text(draw, (0, top + CELL - 2), row.text, CELL)
        for c, route in enumerate(routes, start=1):
            mask, label = row.cells.get(route, (None, "missing"))
            if mask is not None and mask.shape == row.image.shape[:2]:
                cell = overlay(row.image, mask.astype(bool), ROUTE_COLORS[(c - 1) % len(ROUTE_COLORS)])
            else:
                cell = Image.fromarray((row.image * 0.35).astype(np.uint8))
            grid.paste(_fit(cell), (c * CELL, top))
            _text(draw, (c * CELL, top + CELL - 2), label, CELL)
    return grid


def write_grid(path: Path, rows: list[OverlayRow], routes: list[str]) -> Path:
    """Render and write the PNG atomically."""
    buffer = io.BytesIO()
    render_grid(rows, routes).save(buffer, format="PNG")
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)
