"""The result every route returns: one pydantic model, whatever produced the mask.

The mask is a numpy array (bool, original image size); it is serialised to COCO run-length encoding so results
can be written to JSON/JSONL and read back exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from llavaseg.attributes import Attributes, ParseMethod
from llavaseg.provenance import Provenance


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a bool HxW mask, with ``counts`` as text (JSON-safe)."""
    with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ shim warns on every call; harmless, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


class SegmentationResult(BaseModel):
    """A mask for one (image, query) pair, plus everything the route said and how long each stage took.

    ``answer`` is the MLLM's ordinary chat answer to the query (for the LLaVASeg route, exactly what the base
    model says, because it is frozen). ``prompts`` and ``raw_outputs`` hold the rendered stage prompts and the
    MLLM's verbatim replies, so a surprising mask can be traced back to the text that caused it. ``untrained``
    and ``notices`` say when a mask means little (random parts, a toy preset); ``provenance`` records what
    produced it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    route: str
    query: str
    mask: np.ndarray
    score: float = Field(description="the mask decoder's predicted IoU (route-specific confidence)")
    description: str = ""
    attributes: Attributes = Field(default_factory=Attributes)
    attribute_parse: ParseMethod = "none"
    used_attributes: bool = False
    answer: str | None = None
    prompts: dict[str, str] = Field(default_factory=dict)
    raw_outputs: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    untrained: list[str] = Field(default_factory=list, description="parts that were random weights (plumbing runs)")
    notices: list[str] = Field(default_factory=list, description="caveats about the models, e.g. a toy preset")
    provenance: Provenance | None = Field(None, description="what produced the result (versions, components...)")

    @field_validator("mask", mode="before")
    @classmethod
    def _mask_from_rle(cls, value: Any) -> np.ndarray:
        if isinstance(value, dict):
            return decode_mask(value)
        array = np.asarray(value)
        if array.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {array.shape}")
        return array.astype(bool)

    @field_serializer("mask")
    def _mask_to_rle(self, mask: np.ndarray) -> dict[str, Any]:
        return encode_mask(mask)
