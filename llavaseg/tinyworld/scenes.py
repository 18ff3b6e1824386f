"""Procedural tiny-world scenes: 3-5 coloured shapes on a 3x3 grid, their rendering and their visible masks.

Why a generated world: no pretrained SAM/MLLM weights exist offline, so the method is trained and measured
on scenes where everything it must reason about (colour, shape, size, location) is known exactly.

Design choices that the rest of the package relies on:

* **Exact geometry.** Every outline is a polygon with integer vertices (stored as floats), and it is
  rasterised exactly as LISA's ``get_mask_from_json`` does (``int32`` points, 1-px ``polylines`` then
  ``fillPoly``). So the ReasonSeg polygon written for a target redraws to the very pixels painted in the image.
* **Occlusion.** Objects are drawn in list order; a later object covers an earlier one where they overlap
  (large objects near a cell edge may touch a neighbour now and then). :func:`object_masks` returns the
  *visible* masks. The scene's ``focus_index`` object (the one queries refer to) is never occluded, so its
  full polygon is also its visible outline and ReasonSeg needs no ``ignore`` polygons; other objects keep at
  least half of their area visible.
* **Ambiguous names.** A scene is built around its focus object: usually another object has the same shape
  in another colour, and often one has the same colour but another shape, so the shape name alone rarely
  identifies the target and attributes must do the work (the point of the LLaVASeg method).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from llavaseg.attributes import ATTRIBUTE_KEYS
from llavaseg.tinyworld.vocab import (
    COLOR_RGB,
    COLORS,
    GRID,
    IMAGE_SIZE,
    LOCATION_GRID,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
)

__all__ = [
    "SceneObject",
    "Scene",
    "sample_scene",
    "render_scene",
    "render_scene_array",
    "object_masks",
    "full_mask",
    "label_map",
    "shape_polygon",
    "P_SAME_SHAPE_DISTRACTOR",
    "P_SAME_COLOR_DISTRACTOR",
]

P_SAME_SHAPE_DISTRACTOR = 0.9
"""Probability that a scene holds another object with the focus object's shape but another colour."""
P_SAME_COLOR_DISTRACTOR = 0.6
"""Probability that a scene holds another object with the focus object's colour but another shape."""

_CELL = IMAGE_SIZE / GRID
_JITTER = {"small": 11.0, "large": 7.0}  # max centre offset from the cell centre, px (centre stays in its cell)
_COLOR_JITTER = 12  # max per-channel offset of an object's paint from its nominal colour
_MIN_VISIBLE_FRACTION = 0.5
_MAX_TRIES = 100


class SceneObject(BaseModel):
    """One drawn shape and every fact a query or question may mention."""

    model_config = ConfigDict(frozen=True)

    shape: str
    color: str
    size: str
    cell: tuple[int, int] = Field(description="(row, col) on the 3x3 grid, row 0 at the top")
    location: str = Field(description="location phrase of the cell, e.g. 'top left'")
    center: tuple[float, float] = Field(description="(x, y) in pixels")
    radius: float = Field(description="nominal radius in pixels; the outline scales with it")
    rgb: tuple[int, int, int] = Field(description="the jittered paint colour actually used")
    polygon: list[list[float]] = Field(description="exact outline drawn, [[x, y], ...] with integer values")
    bbox: tuple[int, int, int, int] = Field(
        description="(x0, y0, x1, y1) of the full drawn shape; x1/y1 exclusive (last pixel + 1)"
    )

    def attributes(self) -> dict[str, str]:
        """The object's value of every attribute a stage-2 answer names (``ATTRIBUTE_KEYS``)."""
        return {key: getattr(self, key) for key in ATTRIBUTE_KEYS}


class Scene(BaseModel):
    """A tiny-world image as data: background, objects in drawing order, and the object it was built around."""

    model_config = ConfigDict(frozen=True)

    size: int = IMAGE_SIZE
    background: tuple[int, int, int]
    texture_seed: int = Field(description="seeds the background texture and pixel noise, so rendering is pure")
    objects: list[SceneObject]
    focus_index: int = Field(description="index of the object the distractors were chosen around (never occluded)")

    @property
    def focus(self) -> SceneObject:
        return self.objects[self.focus_index]


# ------------------------------------------------------------------------------------------------ geometry


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[list[float]]:
    """Integer-vertex outline of ``shape`` centred at (cx, cy) with nominal radius ``r``.

    The scale factors give the four shapes roughly the same visual extent for the same ``r``; vertices are
    rounded so that the ``int32`` cast LISA applies to ReasonSeg polygons changes nothing.
    """
    if shape == "circle":
        n = 32
        pts = [(cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n)) for k in range(n)]
    elif shape == "square":
        a = 0.85 * r
        pts = [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    elif shape == "diamond":
        d = 1.2 * r
        pts = [(cx, cy - d), (cx + d, cy), (cx, cy + d), (cx - d, cy)]
    elif shape == "triangle":
        big = 1.35 * r  # circumradius; the centroid sits at (cx, cy), apex up
        pts = [(cx + big * math.cos(a), cy + big * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [[float(round(x)), float(round(y))] for x, y in pts]


def _extent(shape: str, r: float) -> float:
    """Largest distance from the centre to the outline along x or y (for keeping shapes inside the image)."""
    return {"circle": 1.0, "square": 0.85, "diamond": 1.2, "triangle": 1.35}[shape] * r + 1.0


def full_mask(polygon: list[list[float]], size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of a polygon drawn alone, rasterised exactly like LISA (int32, outline then fill)."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    pts = np.array([polygon], dtype=np.int32)
    cv2.polylines(canvas, pts, True, 1, 1)
    cv2.fillPoly(canvas, pts, 1)
    return canvas.astype(bool)


def label_map(scene: Scene) -> np.ndarray:
    """``int16 H x W`` map of which object is visible at each pixel (-1 = background); later objects win."""
    labels = np.full((scene.size, scene.size), -1, dtype=np.int16)
    for i, obj in enumerate(scene.objects):
        labels[full_mask(obj.polygon, scene.size)] = i
    return labels


def object_masks(scene: Scene) -> np.ndarray:
    """Visible masks, ``bool (n_objects, H, W)``, in the order of ``scene.objects``."""
    labels = label_map(scene)
    return labels[None, :, :] == np.arange(len(scene.objects), dtype=np.int16)[:, None, None]


# ------------------------------------------------------------------------------------------------ sampling


def _design_attributes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """(shape, colour) pairs with the focus object first, then its distractors, then random fillers."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = COLORS[int(rng.integers(len(COLORS)))]
    pairs = [(shape, color)]
    if rng.random() < P_SAME_SHAPE_DISTRACTOR:
        others = [c for c in COLORS if c != color]
        pairs.append((shape, others[int(rng.integers(len(others)))]))
    if len(pairs) < n and rng.random() < P_SAME_COLOR_DISTRACTOR:
        others = [s for s in SHAPES if s != shape]
        pairs.append((others[int(rng.integers(len(others)))], color))
    while len(pairs) < n:
        pairs.append((SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]))
    return pairs


def _make_object(rng: np.random.Generator, shape: str, color: str, size: str, cell: int) -> SceneObject:
    row, col = divmod(cell, GRID)
    lo, hi = SIZE_RADIUS[size]
    r = float(rng.uniform(lo, hi))
    jit = _JITTER[size]
    cx = (col + 0.5) * _CELL + float(rng.uniform(-jit, jit))
    cy = (row + 0.5) * _CELL + float(rng.uniform(-jit, jit))
    ext = _extent(shape, r)
    cx = min(max(cx, ext), IMAGE_SIZE - 1 - ext)
    cy = min(max(cy, ext), IMAGE_SIZE - 1 - ext)
    polygon = shape_polygon(shape, cx, cy, r)
    mask = full_mask(polygon)
    ys, xs = np.nonzero(mask)
    base = np.array(COLOR_RGB[color], dtype=np.int64)
    rgb = np.clip(base + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3), 0, 255)
    return SceneObject(
        shape=shape,
        color=color,
        size=size,
        cell=(row, col),
        location=LOCATION_GRID[row][col],
        center=(round(cx, 3), round(cy, 3)),
        radius=round(r, 3),
        rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        polygon=polygon,
        bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
    )


def _occlusion_ok(objects: list[SceneObject], focus: int) -> bool:
    """The focus object is fully visible and every other object keeps at least half of its area."""
    scene_masks = [full_mask(o.polygon) for o in objects]
    labels = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int16)
    for i, m in enumerate(scene_masks):
        labels[m] = i
    for i, m in enumerate(scene_masks):
        visible = int((labels == i).sum())
        total = int(m.sum())
        if i == focus and visible != total:
            return False
        if visible < _MIN_VISIBLE_FRACTION * total:
            return False
    return True


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: 3-5 objects in distinct grid cells, built around a focus object with distractors.

    Deterministic given the generator state. Rare layouts whose occlusion breaks the rules above are
    re-drawn (geometry only), which consumes more random numbers but stays deterministic.
    """
    n = int(rng.integers(3, 6))
    pairs = _design_attributes(rng, n)
    sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(n)]
    order = rng.permutation(n)  # drawing order: pairs[order[k]] is drawn k-th
    focus = int(np.nonzero(order == 0)[0][0])
    background = tuple(int(v) for v in np.clip(rng.integers(212, 240) + rng.integers(-8, 9, size=3), 0, 255))
    texture_seed = int(rng.integers(2**31 - 1))
    for _ in range(_MAX_TRIES):
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        objects = [
            _make_object(rng, pairs[j][0], pairs[j][1], sizes[j], int(cells[j])) for j in (int(k) for k in order)
        ]
        if _occlusion_ok(objects, focus):
            return Scene(background=background, texture_seed=texture_seed, objects=objects, focus_index=focus)
    raise RuntimeError("could not place objects without excessive occlusion")  # pragma: no cover - p ~ 0


# ----------------------------------------------------------------------------------------------- rendering


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Light base colour with a smooth low-frequency texture, so the background is never trivially uniform."""
    coarse = rng.normal(0.0, 6.0, size=(5, 5, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (scene.size, scene.size), interpolation=cv2.INTER_CUBIC)
    return np.asarray(scene.background, dtype=np.float32)[None, None, :] + smooth


def render_scene_array(scene: Scene) -> np.ndarray:
    """``uint8 H x W x 3`` RGB rendering; a pure function of ``scene`` (texture from ``scene.texture_seed``)."""
    rng = np.random.default_rng(scene.texture_seed)
    img = _background(scene, rng)
    labels = label_map(scene)
    for i, obj in enumerate(scene.objects):
        img[labels == i] = np.asarray(obj.rgb, dtype=np.float32)
    img += rng.normal(0.0, 1.5, size=img.shape).astype(np.float32)  # mild sensor-like noise everywhere
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> Image.Image:
    """The scene as a 128x128 RGB PIL image (see :func:`render_scene_array`)."""
    return Image.fromarray(render_scene_array(scene))
