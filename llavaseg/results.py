"""The result every route returns: one pydantic model, whatever produced the mask.

The mask is a numpy array (bool, original image size); it is serialised to COCO run-length encoding so results
can be written to JSON/JSONL and read back exactly. A route that finds several instances (a multi-target query,
gRefCOCO-style) may also return them one by one in ``instance_masks``; ``mask`` stays their union, the one thing
the metrics score, so code that reads only ``mask`` is unaffected. An empty ``mask`` is the answer "no target".
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

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
    instance_masks: list[np.ndarray] | None = Field(
        None, description="one bool mask per instance found (optional); `mask` is their union")

    @model_validator(mode="before")
    @classmethod
    def _union_of_instances(cls, data: Any) -> Any:
        """``mask`` may be left out when ``instance_masks`` is given: it is then their union."""
        if isinstance(data, dict) and data.get("mask") is None and data.get("instance_masks"):
            masks = [_as_mask(m) for m in data["instance_masks"]]
            if len({m.shape for m in masks}) != 1:
                raise ValueError("instance masks must all have the same shape")
            data = {**data, "mask": np.logical_or.reduce(masks)}
        return data

    @field_validator("mask", mode="before")
    @classmethod
    def _mask_from_rle(cls, value: Any) -> np.ndarray:
        return _as_mask(value)

    @field_validator("instance_masks", mode="before")
    @classmethod
    def _instances_from_rle(cls, value: Any) -> list[np.ndarray] | None:
        return None if value is None else [_as_mask(m) for m in value]

    @model_validator(mode="after")
    def _instances_match_mask(self) -> SegmentationResult:
        for index, instance in enumerate(self.instance_masks or []):
            if instance.shape != self.mask.shape:
                raise ValueError(f"instance mask {index} is {instance.shape}, the mask is {self.mask.shape}")
        return self

    @field_serializer("mask")
    def _mask_to_rle(self, mask: np.ndarray) -> dict[str, Any]:
        return encode_mask(mask)

    @field_serializer("instance_masks")
    def _instances_to_rle(self, masks: list[np.ndarray] | None) -> list[dict[str, Any]] | None:
        return None if masks is None else [encode_mask(m) for m in masks]


def _as_mask(value: Any) -> np.ndarray:
    """A bool ``H x W`` mask from an array or a COCO RLE dict."""
    if isinstance(value, dict):
        return decode_mask(value)
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {array.shape}")
    return array.astype(bool)
