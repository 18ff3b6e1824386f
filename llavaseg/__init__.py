"""llavaseg: reasoning segmentation with a frozen multimodal LLM (LLaVASeg-style), and a fair comparison."""

from llavaseg.attributes import Attributes
from llavaseg.errors import LlavasegError
from llavaseg.models.presets import PRESETS, list_presets
from llavaseg.results import SegmentationResult
from llavaseg.segmenter import Segmenter

__all__ = ["Segmenter", "SegmentationResult", "Attributes", "LlavasegError", "PRESETS", "list_presets"]
__version__ = "0.1.0"
