"""The tiny world: a generated ReasonSeg-format data set of coloured shapes (data only; its models' recipes are in
:mod:`llavaseg.recipes`).

:func:`sample_scene` is one shipped val scene, so examples run as written without generating anything.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["sample_scene", "SAMPLE_QUERY"]

SAMPLE_QUERY = "the circle that has the same colour as the square"
"""A query about :func:`sample_scene` (one of its ground-truth texts)."""


def sample_scene() -> Path:
    """Path of a shipped tiny-world scene (val scene 4, 128x128 PNG)."""
    return Path(str(resources.files("llavaseg.tinyworld"))) / "sample_scene.png"
