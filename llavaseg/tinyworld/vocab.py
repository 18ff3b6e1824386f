"""The closed vocabulary of the tiny world: attribute values, their colours, and every word a text may use.

The tiny world exists so the LLaVASeg method can be trained and measured offline. A small, fixed set of
attribute values keeps the scenes learnable by tiny models, and a closed word list lets the downstream tiny
MLLM use a word-level tokenizer (``VOCAB``) instead of a BPE it would have to learn. Everything here is
plain data; changing a value changes the data set, so bump ``GENERATOR_VERSION`` in ``generate.py`` too.
"""

from __future__ import annotations

from llavaseg.attributes import ATTRIBUTE_KEYS

__all__ = [
    "COLORS",
    "COLOR_RGB",
    "SHAPES",
    "SHAPE_PLURALS",
    "SIZES",
    "SIZE_RADIUS",
    "LOCATIONS",
    "LOCATION_GRID",
    "GRID",
    "IMAGE_SIZE",
    "NUMBER_WORDS",
    "ATTRIBUTE_VALUES",
    "VOCAB",
    "tokenize",
]

IMAGE_SIZE = 128
"""Side of every square scene, in pixels (the tiny SAM's ``image_size``, so no resizing anywhere)."""

GRID = 3
"""Scenes are laid out on a GRID x GRID grid of cells, at most one object per cell."""

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    # Saturated and far apart in RGB (>= ~90 apart pairwise) so a small per-object jitter never confuses them,
    # and all far from the light, low-saturation backgrounds.
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 50, 170),
    "orange": (245, 125, 15),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
"""Four outlines that stay distinguishable from 14 px to 36 px across (diamond = square turned 45 degrees)."""

SHAPE_PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

SIZES: tuple[str, ...] = ("small", "large")

SIZE_RADIUS: dict[str, tuple[float, float]] = {
    # Circumradius range in pixels. The gap (9 -> 14) keeps "small" and "large" visually unambiguous; a grid
    # cell is 128 / 3 = 42.7 px, so large objects near a cell edge can slightly overlap a neighbour.
    "small": (7.0, 9.0),
    "large": (14.0, 17.0),
}

LOCATION_GRID: tuple[tuple[str, str, str], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
"""``LOCATION_GRID[row][col]`` is the location phrase of a cell (row 0 is the top of the image)."""

LOCATIONS: tuple[str, ...] = tuple(loc for row in LOCATION_GRID for loc in row)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
"""Counts are answered in words (a scene has at most five objects)."""

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = dict(zip(ATTRIBUTE_KEYS, (COLORS, LOCATIONS, SIZES, SHAPES)))
"""Every value each attribute can take in the tiny world."""

_FUNCTION_WORDS: tuple[str, ...] = (
    # queries
    "the", "shape", "shapes", "in", "only", "smallest", "largest", "that", "has", "same", "colour", "as",
    "to", "of", "above", "below", "whose", "is", "one", "most", "share", "between", "and", "not", "with",
    "a", "an",
    # dialogue
    "how", "many", "are", "there", "what", "which", "where", "size", "yes", "no", "nothing", "?",
)

VOCAB: tuple[str, ...] = tuple(
    sorted(
        set(_FUNCTION_WORDS)
        | set(COLORS)
        | set(SHAPES)
        | set(SHAPE_PLURALS.values())
        | set(SIZES)
        | {w for loc in LOCATIONS for w in loc.split()}
        | set(NUMBER_WORDS)
    )
)
"""Every word any tiny-world query, question or answer uses (texts are lower case, space separated)."""


def tokenize(text: str) -> list[str]:
    """Split a tiny-world text into VOCAB words (texts are generated space-separated, "?" is its own word)."""
    return text.split()
