"""llavaseg: reasoning segmentation with a frozen multimodal LLM (LLaVASeg-style), and a fair comparison.

The public names are imported lazily, so command-line tools (``--help``, argument errors) start without
loading torch, transformers and open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Segmenter": "llavaseg.segmenter",
    "SegmentationResult": "llavaseg.results",
    "Attributes": "llavaseg.attributes",
    "LlavasegError": "llavaseg.errors",
    "PRESETS": "llavaseg.models.presets",
    "list_presets": "llavaseg.models.presets",
    "sample_scene": "llavaseg.tinyworld",
    "SAMPLE_QUERY": "llavaseg.tinyworld",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from llavaseg.attributes import Attributes
    from llavaseg.errors import LlavasegError
    from llavaseg.models.presets import PRESETS, list_presets
    from llavaseg.results import SegmentationResult
    from llavaseg.segmenter import Segmenter
    from llavaseg.tinyworld import SAMPLE_QUERY, sample_scene


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llavaseg' has no attribute {name!r}")
