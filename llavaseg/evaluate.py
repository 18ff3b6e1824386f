"""LISA-compatible reasoning-segmentation metrics (gIoU, cIoU), in pure numpy.

This module imports no model code: it scores boolean prediction masks against ground-truth masks and
aggregates the results, so the same numbers come out whatever produced the predictions.

Semantics mirror LISA's ``train_ds.py::validate`` and ``utils/utils.py::intersectionAndUnionGPU``:

* Ground truth uses ``0`` background, ``1`` target, ``255`` *ignore*. Prediction pixels where the ground
  truth is 255 are removed before counting, so they count neither as hits nor as false positives.
* Per query, foreground ``I`` (intersection) and ``U`` (union) are counted. The query's IoU is
  ``I / (U + 1e-5)``, and **1.0 when U == 0** (empty ground truth and empty prediction: a correct
  "no object" answer). An empty ground truth with a non-empty prediction gives ``I = 0, U > 0``, so 0.
* **gIoU** is the mean of the per-query IoUs. LISA averages the IoUs of an image's masks, then updates its
  meter with that average weighted by the number of masks, so its gIoU is
  ``sum_img(mean_img * n_img) / sum_img(n_img) = sum_q(IoU_q) / n_queries``: exactly the per-query mean.
  With one query per image (ReasonSeg, ``first_text_only``) it is the per-image mean the paper describes.
* **cIoU** is ``sum(I) / (sum(U) + 1e-10)`` over the split, i.e. cumulative foreground IoU. It is biased
  toward large objects, as the LISA paper notes.

Results are fractions in ``[0, 1]`` (LISA's code also prints fractions; its tables show percentages).
Sums are computed in float64 here, LISA's in float32 on GPU, so the last digits can differ (< 1e-6).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llavaseg.errors import InputError

__all__ = [
    "IGNORE_VALUE",
    "QUERY_EPS",
    "CUMULATIVE_EPS",
    "SPLITS",
    "intersection_union",
    "query_iou",
    "QueryRecord",
    "SplitMetrics",
    "summarize",
    "MetricAccumulator",
]

IGNORE_VALUE = 255
"""Ground-truth value excluded from every count (LISA's ``ignore_index``)."""

QUERY_EPS = 1e-5
"""Added to the per-query union, as LISA does (``intersection_i / (union_i + 1e-5)``).

Kept on purpose so that gIoU matches LISA's to the printed precision: it lowers a perfect prediction's IoU
by ``1e-5 / U`` (negligible for real masks, visible only for masks of a few pixels). The ``U == 0`` case
is handled separately (IoU 1.0), so the epsilon is not needed to avoid a division by zero.
"""

CUMULATIVE_EPS = 1e-10
"""Added to the cumulative union for cIoU, as LISA does; a split whose total union is 0 gets cIoU 0."""

SPLITS = ("overall", "short", "long")
"""``short`` = queries with ``is_sentence`` False, ``long`` = True (LISA Table 1's test columns)."""


def _check_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise InputError(f"masks must be 2-D (H x W): prediction is {pred.shape}, ground truth is {gt.shape}")
    if pred.shape != gt.shape:
        raise InputError(
            f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape} "
            "(resize the prediction to the original image size before scoring)"
        )
    if pred.dtype != np.bool_:
        if not np.issubdtype(pred.dtype, np.integer):
            raise InputError(f"prediction must be a boolean mask (threshold logits first), got dtype {pred.dtype}")
        if ((pred != 0) & (pred != 1)).any():
            raise InputError("integer prediction mask must contain only 0 and 1")
        pred = pred.astype(bool)
    if gt.dtype == np.bool_:
        gt = gt.astype(np.uint8)
    elif not np.issubdtype(gt.dtype, np.integer):
        raise InputError(f"ground-truth mask must be an integer array with values 0/1/255, got dtype {gt.dtype}")
    elif ((gt != 0) & (gt != 1) & (gt != IGNORE_VALUE)).any():
        bad = int(gt[(gt != 0) & (gt != 1) & (gt != IGNORE_VALUE)].flat[0])
        raise InputError(f"ground-truth mask values must be 0, 1 or {IGNORE_VALUE}; found {bad}")
    return pred, gt


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Foreground ``(intersection, union)`` pixel counts of one query after LISA's ignore rule.

    ``pred`` is a boolean ``H x W`` mask (integer 0/1 accepted); ``gt`` a ``uint8`` mask with values 0/1/255
    (boolean accepted). Pixels where ``gt == 255`` are dropped from both masks before counting.
    """
    pred, gt = _check_masks(pred, gt)
    valid = gt != IGNORE_VALUE
    pred_fg = pred & valid
    gt_fg = gt == 1
    inter = int(np.count_nonzero(pred_fg & gt_fg))
    union = int(np.count_nonzero(pred_fg)) + int(np.count_nonzero(gt_fg)) - inter
    return inter, union


def query_iou(intersection: int, union: int) -> float:
    """One query's IoU with LISA's rule: ``1.0`` if ``union == 0``, else ``intersection / (union + 1e-5)``."""
    if intersection < 0 or union < 0 or intersection > union:
        raise InputError(f"invalid counts: intersection={intersection}, union={union}")
    if union == 0:
        return 1.0  # empty GT and empty prediction: LISA's "no-object target"
    return intersection / (union + QUERY_EPS)


class QueryRecord(BaseModel):
    """The score of one query; JSON-serialisable so per-query results can be saved and re-summarised.

    ``iou`` may be omitted and is then derived from the counts. A record with ``error`` set is a query
    that failed (model crash, unparsable answer, timeout...). It is scored as IoU 0 with intersection 0
    and union = the ground-truth foreground area, i.e. like an empty prediction for cIoU. For gIoU it
    counts 0 even when the ground truth is empty (where an empty prediction would earn 1.0): a failure
    is never rewarded, and it never silently drops out of the denominator. Use
    :meth:`from_masks` / :meth:`failed` rather than filling the counts by hand.
    """

    model_config = ConfigDict(frozen=True)

    query_id: str
    sample: str = ""
    text_index: int = 0
    is_sentence: bool = False
    intersection: int = Field(ge=0)
    union: int = Field(ge=0)
    iou: float = Field(ge=0.0, le=1.0)
    error: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _derive_iou(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("iou") is None and "intersection" in data and "union" in data:
            data = dict(data)
            if data.get("error") is not None:
                data["iou"] = 0.0
            else:
                data["iou"] = query_iou(int(data["intersection"]), int(data["union"]))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> QueryRecord:
        if self.intersection > self.union:
            raise ValueError(f"query {self.query_id}: intersection {self.intersection} > union {self.union}")
        if self.error is not None:
            if self.intersection != 0 or self.iou != 0.0:
                raise ValueError(f"query {self.query_id}: a failed query must have intersection 0 and iou 0")
        elif abs(self.iou - query_iou(self.intersection, self.union)) > 1e-9:
            raise ValueError(
                f"query {self.query_id}: iou {self.iou} does not match intersection/union "
                f"{self.intersection}/{self.union}"
            )
        return self

    @classmethod
    def from_masks(
        cls,
        pred: np.ndarray,
        gt: np.ndarray,
        *,
        query_id: str,
        is_sentence: bool,
        sample: str = "",
        text_index: int = 0,
    ) -> QueryRecord:
        """Score a prediction against its ground truth (see :func:`intersection_union`)."""
        inter, union = intersection_union(pred, gt)
        return cls(
            query_id=query_id, sample=sample, text_index=text_index, is_sentence=is_sentence,
            intersection=inter, union=union,
        )

    @classmethod
    def failed(
        cls,
        gt: np.ndarray,
        error: str,
        *,
        query_id: str,
        is_sentence: bool,
        sample: str = "",
        text_index: int = 0,
    ) -> QueryRecord:
        """Record a query that produced no prediction: IoU 0, union = ground-truth foreground area."""
        gt = np.asarray(gt)
        _, union = intersection_union(np.zeros(gt.shape, dtype=bool), gt)
        return cls(
            query_id=query_id, sample=sample, text_index=text_index, is_sentence=is_sentence,
            intersection=0, union=union, iou=0.0, error=error or "failed",
        )


class SplitMetrics(BaseModel):
    """gIoU and cIoU of one split, as fractions; both ``None`` when the split has no query."""

    model_config = ConfigDict(frozen=True)

    giou: float | None
    ciou: float | None
    n_queries: int
    n_errors: int = 0


def _split_metrics(records: list[QueryRecord]) -> SplitMetrics:
    if not records:
        return SplitMetrics(giou=None, ciou=None, n_queries=0, n_errors=0)
    ious = [0.0 if r.error is not None else r.iou for r in records]
    total_i = sum(r.intersection for r in records)
    total_u = sum(r.union for r in records)
    return SplitMetrics(
        giou=float(np.mean(np.asarray(ious, dtype=np.float64))),
        ciou=total_i / (total_u + CUMULATIVE_EPS),
        n_queries=len(records),
        n_errors=sum(r.error is not None for r in records),
    )


def summarize(records: Iterable[QueryRecord]) -> dict[str, SplitMetrics]:
    """Aggregate query records into ``{"overall", "short", "long"}`` metrics (see module docstring).

    Records with an ``error`` are included (IoU 0), so a run with failures scores lower, not higher.
    Duplicate ``query_id`` values are rejected: they would double-count a query.
    """
    recs = list(records)
    seen: set[str] = set()
    for r in recs:
        if r.query_id in seen:
            raise InputError(f"duplicate query_id {r.query_id!r} in results")
        seen.add(r.query_id)
    return {
        "overall": _split_metrics(recs),
        "short": _split_metrics([r for r in recs if not r.is_sentence]),
        "long": _split_metrics([r for r in recs if r.is_sentence]),
    }


class MetricAccumulator:
    """Collect per-query results during an evaluation run, then :meth:`result` them.

    It keeps the :class:`QueryRecord` list (a few hundred bytes per query) so that per-query results can
    be written out next to the summary; :func:`summarize` does the arithmetic.
    """

    def __init__(self) -> None:
        self._records: list[QueryRecord] = []
        self._ids: set[str] = set()

    def add(self, record: QueryRecord) -> QueryRecord:
        """Add an already-scored record."""
        if record.query_id in self._ids:
            raise InputError(f"query {record.query_id!r} was already scored")
        self._ids.add(record.query_id)
        self._records.append(record)
        return record

    def add_masks(
        self, pred: np.ndarray, gt: np.ndarray, *, query_id: str, is_sentence: bool, sample: str = "",
        text_index: int = 0,
    ) -> QueryRecord:
        """Score ``pred`` against ``gt`` and add the record."""
        return self.add(QueryRecord.from_masks(
            pred, gt, query_id=query_id, is_sentence=is_sentence, sample=sample, text_index=text_index,
        ))

    def add_error(
        self, gt: np.ndarray, error: str, *, query_id: str, is_sentence: bool, sample: str = "",
        text_index: int = 0,
    ) -> QueryRecord:
        """Record a failed query (IoU 0, union = ground-truth area); see :class:`QueryRecord`."""
        return self.add(QueryRecord.failed(
            gt, error, query_id=query_id, is_sentence=is_sentence, sample=sample, text_index=text_index,
        ))

    @property
    def records(self) -> list[QueryRecord]:
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def result(self) -> dict[str, SplitMetrics]:
        """``{"overall", "short", "long"}`` -> :class:`SplitMetrics`."""
        return summarize(self._records)
