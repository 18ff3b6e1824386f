"""One line of ``queries-<route>.jsonl``: the evaluator's :class:`~llavaseg.evaluate.QueryRecord` plus what
the route said (description, attributes, answer, score), how long it took, and the predicted mask (COCO RLE).

Keeping the mask makes a results folder self-contained: summaries and the overlay grid are rebuilt from the
JSONL files alone, so a resumed run reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llavaseg.evaluate import QueryRecord
from llavaseg.results import SegmentationResult, decode_mask, encode_mask

__all__ = ["BenchRecord", "record_from_result", "record_from_error"]


class BenchRecord(QueryRecord):
    """A scored query of one route. ``error`` set = the route failed on it (scored as the evaluator rules)."""

    route: str
    text: str
    input_key: str = ""  # digest of image pixels, ground-truth mask and text (see bench.scoring.input_key)
    description: str = ""
    attributes: dict[str, str] = {}
    attribute_parse: str = "none"
    answer: str | None = None
    score: float | None = None
    seconds: float = 0.0
    timings: dict[str, float] = {}
    mask: dict[str, Any] | None = None
    instance_masks: list[dict[str, Any]] | None = None  # per-instance RLEs when the route gave them
    notices: list[str] = []  # e.g. the query was truncated to MAX_QUERY_CHARS
    mllm_calls: float | None = None  # conversation turns the route sent to an MLLM for this query; a prediction file was missing

    def predicted_mask(self) -> np.ndarray | None:
        return decode_mask(self.mask) if self.mask is not None else None


def _labels(query) -> dict[str, Any]:
    n_targets = getattr(query, "n_targets", None)
    return {"query_id": query.query_id, "is_sentence": bool(query.is_sentence), "sample": str(query.sample_id),
            "text_index": int(query.text_index), "n_targets": None if n_targets is None else int(n_targets)}


def record_from_result(route: str, query, gt: np.ndarray, result: SegmentationResult, seconds: float) -> BenchRecord:
    """Score ``result`` against ``gt`` (raises :class:`~llavaseg.errors.InputError` on a shape mismatch)."""
    scored = QueryRecord.from_masks(result.mask, gt, **_labels(query))
    return BenchRecord(
        **scored.model_dump(), route=route, text=query.text, description=result.description,
        attributes=dict(result.attributes.items()), attribute_parse=result.attribute_parse, answer=result.answer,
        score=float(result.score), seconds=seconds, timings=dict(result.timings), mask=encode_mask(result.mask),
        instance_masks=[encode_mask(m) for m in result.instance_masks] if result.instance_masks else None,
        mllm_calls=float(result.raw_outputs["mllm_calls"]) if "mllm_calls" in result.raw_outputs else None,
    )


def record_from_error(route: str, query, gt: np.ndarray | None, error: str, seconds: float) -> BenchRecord:
    """A failed query: IoU 0 and union = ground-truth area (:meth:`QueryRecord.failed`; ``gt=None``: the
    ground truth itself could not be read)."""
    failed = QueryRecord.failed(gt, error, **_labels(query))
    return BenchRecord(**failed.model_dump(), route=route, text=query.text, seconds=seconds)
