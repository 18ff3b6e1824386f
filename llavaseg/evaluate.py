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

Three additions serve comparisons between systems (``docs/evaluation.md``):

* ``summarize(..., lisa_compat=True)`` reproduces LISA's ``validate()`` arithmetic to the bit pattern it
  can: per-image float32 accumulation and ``AverageMeter.all_reduce``'s ``sum / (count + 1e-5)``, so the
  gIoU is the default's times ``n / (n + 1e-5)`` up to float32 rounding;
* **no-target queries** (ground truth with no foreground pixel, gRefCOCO-style): LISA's rule already scores
  them (IoU 1 for an empty prediction, 0 otherwise); N-acc (share of no-target queries answered with an
  empty mask) and T-acc (share of target queries answered with a non-empty one) are reported beside them,
  as gRefCOCO's evaluator does;
* **uncertainty**: :func:`bootstrap_intervals` (percentile intervals from resampling *images*, since the
  texts of one image are not independent) and :func:`paired_test` (paired bootstrap interval of the
  difference plus a sign-flip permutation p-value, also over images) between two systems on the same queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    "LISA_COUNT_EPS",
    "image_totals",
    "bootstrap_replicates",
    "bootstrap_intervals",
    "intervals_from_totals",
    "jackknife_se",
    "PairedTest",
    "paired_test",
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

LISA_COUNT_EPS = 1e-5
"""Added to the query count by LISA's ``AverageMeter.all_reduce`` (``avg = sum / (count + 1e-5)``): its
printed gIoU is ``sum(IoU) / (n + 1e-5)``, not the mean. Used only with ``lisa_compat=True``."""

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

    ``gt_area`` (ground-truth foreground pixels after the ignore rule) tells a no-target query (``0``) and
    gives the prediction's area (``union - gt_area + intersection``) for N-acc / T-acc; it is ``None`` in
    records written before it existed and when the ground truth could not be read. ``n_targets`` is the
    number of annotated instances when the data set says (gRefCOCO-style refs, JSONL ``masks``/``no_target``),
    else ``None``; it only labels the query.
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
    gt_area: int | None = Field(None, ge=0)
    n_targets: int | None = Field(None, ge=0)

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
        if self.gt_area is not None and not self.intersection <= self.gt_area <= self.union:
            raise ValueError(f"query {self.query_id}: ground-truth area {self.gt_area} outside "
                             f"[intersection {self.intersection}, union {self.union}]")
        return self

    @property
    def no_target(self) -> bool | None:
        """``True`` when the ground truth has no foreground pixel; ``None`` when its area is unknown."""
        return None if self.gt_area is None else self.gt_area == 0

    @property
    def predicted_empty(self) -> bool | None:
        """Whether the prediction had no foreground pixel (a failed query predicted nothing)."""
        if self.error is not None:
            return True
        return None if self.gt_area is None else self.union - self.gt_area + self.intersection == 0

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
        n_targets: int | None = None,
    ) -> QueryRecord:
        """Score a prediction against its ground truth (see :func:`intersection_union`)."""
        inter, union = intersection_union(pred, gt)
        return cls(
            query_id=query_id, sample=sample, text_index=text_index, is_sentence=is_sentence,
            intersection=inter, union=union, gt_area=int(np.count_nonzero(np.asarray(gt) == 1)),
            n_targets=n_targets,
        )

    @classmethod
    def failed(
        cls,
        gt: np.ndarray | None,
        error: str,
        *,
        query_id: str,
        is_sentence: bool,
        sample: str = "",
        text_index: int = 0,
        n_targets: int | None = None,
    ) -> QueryRecord:
        """Record a query that produced no prediction: IoU 0, union = ground-truth foreground area.

        ``gt=None`` (the ground truth itself could not be read) gives union 0 and an unknown ``gt_area``."""
        union, gt_area = 0, None
        if gt is not None:
            gt = np.asarray(gt)
            _, union = intersection_union(np.zeros(gt.shape, dtype=bool), gt)
            gt_area = union
        return cls(
            query_id=query_id, sample=sample, text_index=text_index, is_sentence=is_sentence,
            intersection=0, union=union, iou=0.0, error=error or "failed", gt_area=gt_area, n_targets=n_targets,
        )


class SplitMetrics(BaseModel):
    """gIoU and cIoU of one split, as fractions; both ``None`` when the split has no query.

    ``giou_ci`` / ``ciou_ci`` are bootstrap intervals (``None`` unless asked for, see
    :func:`bootstrap_intervals`). ``n_no_target`` counts queries whose ground truth is empty; ``n_acc`` and
    ``t_acc`` (gRefCOCO's N-acc / T-acc) are given only when the split has such queries, as gRefCOCO's
    evaluator reports them. ``protocol`` is ``"default"`` or ``"lisa"`` (:func:`summarize`).
    """

    model_config = ConfigDict(frozen=True)

    giou: float | None
    ciou: float | None
    n_queries: int
    n_errors: int = 0
    giou_ci: tuple[float, float] | None = None
    ciou_ci: tuple[float, float] | None = None
    n_no_target: int = 0
    n_acc: float | None = None
    t_acc: float | None = None
    protocol: str = "default"


def _no_target_rates(records: list[QueryRecord]) -> tuple[int, float | None, float | None]:
    """``(n_no_target, N-acc, T-acc)`` over the records whose ground-truth area is known."""
    known = [r for r in records if r.gt_area is not None]
    empty_gt = [r for r in known if r.no_target]
    if not empty_gt:
        return 0, None, None
    with_target = [r for r in known if not r.no_target]
    n_acc = sum(r.error is None and bool(r.predicted_empty) for r in empty_gt) / len(empty_gt)  # failures: wrong
    t_acc = sum(not r.predicted_empty for r in with_target) / len(with_target) if with_target else None
    return len(empty_gt), n_acc, t_acc


def _image_key(record: QueryRecord) -> str:
    return record.sample or record.query_id


def _lisa_giou_ciou(records: list[QueryRecord]) -> tuple[float, float]:
    """LISA's ``validate()`` accumulation, step by step in float32 (its GPU tensors and numpy meters).

    Per image: ``acc += I / (U + 1e-5)`` (+1 when ``U == 0``), ``acc /= n``; meters ``sum += acc * n``,
    ``count += n``; then ``all_reduce``: ``giou = sum / (count + 1e-5)``, ``ciou = sum(I) / (sum(U) + 1e-10)``.
    A failed query keeps this library's rule (IoU 0 even when ``U == 0``): LISA has no notion of failure.
    """
    f32 = np.float32
    by_image: dict[str, list[QueryRecord]] = {}
    for record in records:
        by_image.setdefault(_image_key(record), []).append(record)
    acc_sum, inter_sum, union_sum, count = f32(0), f32(0), f32(0), 0
    for group in by_image.values():
        inter, union, acc = f32(0), f32(0), f32(0)
        for r in group:
            i, u = f32(r.intersection), f32(r.union)
            inter, union = inter + i, union + u
            acc = acc + i / (u + f32(QUERY_EPS))
            if r.union == 0 and r.error is None:
                acc = acc + f32(1.0)
        acc = acc / f32(len(group))
        acc_sum, inter_sum, union_sum = acc_sum + acc * f32(len(group)), inter_sum + inter, union_sum + union
        count += len(group)
    giou = acc_sum / f32(float(f32(count)) + LISA_COUNT_EPS)
    ciou = inter_sum / (union_sum + f32(CUMULATIVE_EPS))
    return float(giou), float(ciou)


def split_metrics(records: Sequence[QueryRecord], *, lisa_compat: bool = False, bootstrap: int = 0,
                  seed: int = 0) -> SplitMetrics:
    """The metrics of one group of queries (see :func:`summarize` for the options)."""
    records = list(records)
    if not records:
        return SplitMetrics(giou=None, ciou=None, n_queries=0, n_errors=0,
                            protocol="lisa" if lisa_compat else "default")
    if lisa_compat:
        giou, ciou = _lisa_giou_ciou(records)
    else:
        ious = [0.0 if r.error is not None else r.iou for r in records]
        giou = float(np.mean(np.asarray(ious, dtype=np.float64)))
        ciou = sum(r.intersection for r in records) / (sum(r.union for r in records) + CUMULATIVE_EPS)
    n_no_target, n_acc, t_acc = _no_target_rates(records)
    giou_ci, ciou_ci = bootstrap_intervals(records, resamples=bootstrap, seed=seed) if bootstrap else (None, None)
    return SplitMetrics(
        giou=giou, ciou=ciou, n_queries=len(records), n_errors=sum(r.error is not None for r in records),
        giou_ci=giou_ci, ciou_ci=ciou_ci, n_no_target=n_no_target, n_acc=n_acc, t_acc=t_acc,
        protocol="lisa" if lisa_compat else "default",
    )


def _check_unique(records: list[QueryRecord]) -> None:
    seen: set[str] = set()
    for r in records:
        if r.query_id in seen:
            raise InputError(f"duplicate query_id {r.query_id!r} in results")
        seen.add(r.query_id)


def summarize(records: Iterable[QueryRecord], *, lisa_compat: bool = False, bootstrap: int = 0,
              seed: int = 0) -> dict[str, SplitMetrics]:
    """Aggregate query records into ``{"overall", "short", "long"}`` metrics (see module docstring).

    Records with an ``error`` are included (IoU 0), so a run with failures scores lower, not higher.
    Duplicate ``query_id`` values are rejected: they would double-count a query.

    ``lisa_compat=True`` computes gIoU/cIoU with LISA's float32 accumulation and ``count + 1e-5`` divisor
    (choosing which queries to score, LISA's first text per image, is the caller's selection).
    ``bootstrap=N`` adds 95% intervals from ``N`` resamples of the images (``seed`` makes them repeatable).
    """
    recs = list(records)
    _check_unique(recs)
    options = {"lisa_compat": lisa_compat, "bootstrap": bootstrap, "seed": seed}
    return {
        "overall": split_metrics(recs, **options),
        "short": split_metrics([r for r in recs if not r.is_sentence], **options),
        "long": split_metrics([r for r in recs if r.is_sentence], **options),
    }


# ------------------------------------------------------------------------------------------- uncertainty


def image_totals(records: Sequence[QueryRecord]) -> tuple[list[str], np.ndarray]:
    """Per-image sums, the unit the bootstrap resamples: ``(image keys, array n_images x 4)`` with columns
    query count, sum of IoUs (failed queries 0), sum of intersections, sum of unions; images in order of
    first appearance (a record without ``sample`` is an image of its own)."""
    index: dict[str, int] = {}
    rows: list[list[float]] = []
    for r in records:
        key = _image_key(r)
        if key not in index:
            index[key] = len(rows)
            rows.append([0.0, 0.0, 0.0, 0.0])
        row = rows[index[key]]
        row[0] += 1
        row[1] += 0.0 if r.error is not None else r.iou
        row[2] += r.intersection
        row[3] += r.union
    return list(index), np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _resample_counts(rng: np.random.Generator, n_images: int, resamples: int, chunk: int = 128):
    """Yield blocks of resampling counts (row ``b``, column ``i``: how often image ``i`` is drawn in resample
    ``b`` of ``n`` images with replacement), a bounded amount of memory at a time."""
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        draws = rng.integers(0, n_images, size=(size, n_images)) + (np.arange(size) * n_images)[:, None]
        yield np.bincount(draws.ravel(), minlength=size * n_images).reshape(size, n_images).astype(np.float64)


# A statistic is a list of outputs, each a sum of ratio terms ``sign * sums[num] / (sums[den] + eps)`` over the
# summed image totals, so that its leave-one-image-out values need only (resamples x images) arithmetic.
Terms = list[list[tuple[float, int, int, float]]]
METRIC_TERMS: Terms = [[(1.0, 1, 0, 0.0)], [(1.0, 2, 3, CUMULATIVE_EPS)]]
"""gIoU = sum IoU / queries, cIoU = sum I / (sum U + 1e-10), on image totals (:func:`image_totals`)."""
PAIRED_TERMS: Terms = [[(1.0, 1, 0, 0.0), (-1.0, 5, 4, 0.0)], [(1.0, 2, 3, CUMULATIVE_EPS), (-1.0, 6, 7, CUMULATIVE_EPS)]]
"""gIoU and cIoU of A minus B, on totals of A (columns 0-3) then B (4-7)."""


def _evaluate(terms: Terms, sums: np.ndarray) -> np.ndarray:
    """The statistic of summed totals ``(..., k)`` -> ``(..., n_outputs)``."""
    return np.stack([sum(sign * sums[..., num] / (sums[..., den] + eps) for sign, num, den, eps in output)
                     for output in terms], axis=-1)


def _metrics(sums: np.ndarray) -> np.ndarray:
    """``(..., 4)`` summed image totals -> ``(..., 2)``: gIoU and cIoU."""
    return _evaluate(METRIC_TERMS, sums)


def bootstrap_replicates(totals: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gIoU and cIoU of each resample: ``counts`` (resamples x images) weights the rows of ``totals``
    (:func:`image_totals`). Exposed so that a test can check the arithmetic on hand-written counts."""
    values = _metrics(np.asarray(counts, dtype=np.float64) @ totals)
    return values[:, 0], values[:, 1]


def jackknife_se(totals: np.ndarray, counts: np.ndarray | None = None, terms: Terms = METRIC_TERMS) -> np.ndarray:
    """Leave-one-image-out jackknife standard errors of a statistic (default gIoU and cIoU): one row per row
    of ``counts`` (a resample; ``None`` = the sample itself), one column per output.

    With ``n`` drawn images and ``theta_i`` the statistic without one copy of image ``i``:
    ``se**2 = (n - 1) / n * sum_i (theta_i - mean(theta))**2`` (copies counted as often as drawn). It is the
    standard error a studentized bootstrap divides by: unlike a formula it needs no assumption about the
    ratio, and it sees how much one large image moves cIoU."""
    totals = np.asarray(totals, dtype=np.float64)
    counts = np.ones((1, len(totals))) if counts is None else np.asarray(counts, dtype=np.float64)
    sums = counts @ totals
    drawn = counts.sum(axis=1)
    drawn_mask = counts > 0
    out = np.empty((len(counts), len(terms)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for j, output in enumerate(terms):
            theta = sum(sign * (sums[:, num, None] - totals[None, :, num])
                        / (sums[:, den, None] - totals[None, :, den] + eps) for sign, num, den, eps in output)
            theta = np.where(drawn_mask, theta, 0.0)  # images not drawn in a resample take no part
            mean = (counts * theta).sum(axis=1) / drawn
            variance = (counts * (theta - mean[:, None]) ** 2).sum(axis=1) * (drawn - 1) / drawn
            out[:, j] = np.sqrt(np.maximum(variance, 0.0))
    return out


_HUGE = 1e12  # a studentized value for a resample with no spread of its own (one distinct image)
_TINY = 1e-12  # a standard error or difference this small is rounding noise (metrics are in [0, 1])
STUDENTIZED_MIN_IMAGES = 10
"""Below this many images the percentile interval is used: a bootstrap-t needs each resample to have a spread
of its own, and with a handful of images many resamples hold one distinct image (the interval would be
[0, 1]). Intervals on so few images say little either way."""


def _studentized(estimate: np.ndarray, se: np.ndarray, replicates: np.ndarray, replicate_se: np.ndarray,
                 level: float) -> np.ndarray:
    """Bootstrap-t bounds ``(2, m)``: ``estimate - t_(1-a/2) * se`` .. ``estimate - t_(a/2) * se``."""
    diff = replicates - estimate
    spread = replicate_se > _TINY  # below: rounding noise of a resample whose images are all alike
    diff = np.where(np.abs(diff) > _TINY, diff, 0.0)
    fallback = np.where(diff == 0, 0.0, np.sign(diff) * _HUGE)
    t = np.divide(diff, replicate_se, out=fallback, where=spread)
    low_t, high_t = np.quantile(t, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    bounds = np.stack([estimate - high_t * se, estimate - low_t * se])
    return np.where(se > _TINY, bounds, estimate)


def _bootstrap(totals: np.ndarray, terms: Terms, *, resamples: int, seed: int, level: float, method: str,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Interval bounds ``(2, outputs)`` of the statistic ``terms`` of the summed image totals."""
    if method not in ("studentized", "percentile"):
        raise InputError(f"unknown interval method {method!r}; use studentized or percentile")
    rng = rng if rng is not None else np.random.default_rng(seed)
    replicates, replicate_se = [], []
    for counts in _resample_counts(rng, len(totals), resamples):
        replicates.append(_evaluate(terms, counts @ totals))
        if method == "studentized" and len(totals) >= STUDENTIZED_MIN_IMAGES:
            replicate_se.append(jackknife_se(totals, counts, terms))
    values = np.concatenate(replicates)
    if method == "percentile" or len(totals) < STUDENTIZED_MIN_IMAGES:
        return np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    estimate = _evaluate(terms, totals.sum(axis=0))
    return _studentized(estimate, jackknife_se(totals, None, terms)[0], values,
                        np.concatenate(replicate_se), level)


Interval = tuple[float, float]


def bootstrap_intervals(records: Sequence[QueryRecord], *, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95, method: str = "studentized") -> tuple[Interval | None, Interval | None]:
    """Bootstrap intervals ``(gIoU, cIoU)`` at ``level``, resampling **images** with replacement.

    Images, not queries, are resampled because the texts of one image share its difficulty: treating them
    as independent would make the intervals too narrow. ``method="studentized"`` (default) is the bootstrap-t
    with jackknife standard errors: cIoU is a ratio dominated by a few large targets, and the plain percentile
    interval (``method="percentile"``) covers it less often than it says (``benchmarks/interval_coverage.py``
    measures both); with fewer than :data:`STUDENTIZED_MIN_IMAGES` images the percentile interval is used.
    ``None`` for fewer than two images or ``resamples < 1``; the same ``seed``, the same resamples.
    """
    if resamples < 1 or len({_image_key(r) for r in records}) < 2:
        return None, None
    return intervals_from_totals(image_totals(records)[1], resamples=resamples, seed=seed, level=level,
                                 method=method)


def intervals_from_totals(totals: np.ndarray, *, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                          method: str = "studentized") -> tuple[Interval, Interval]:
    """:func:`bootstrap_intervals` on per-image totals (:func:`image_totals`); the coverage benchmark calls
    it directly on synthetic splits. Bounds are clipped to ``[0, 1]``."""
    if not 0 < level < 1:
        raise InputError(f"interval level must be between 0 and 1, got {level}")
    if resamples < 1 or len(totals) < 2:
        raise InputError("bootstrap intervals need at least two images and one resample")
    bounds = np.clip(_bootstrap(np.asarray(totals, dtype=np.float64), METRIC_TERMS, resamples=resamples, seed=seed,
                                level=level, method=method), 0.0, 1.0)
    return (float(bounds[0, 0]), float(bounds[1, 0])), (float(bounds[0, 1]), float(bounds[1, 1]))


class PairedTest(BaseModel):
    """System A minus system B on the same queries (fractions): the observed difference, a paired bootstrap
    interval of it (``None`` without resamples), and a two-sided sign-flip permutation p-value, both over
    images. ``exact`` = every one of the ``2**n_images`` swaps was enumerated (small splits)."""

    model_config = ConfigDict(frozen=True)

    n_queries: int
    n_images: int
    giou_diff: float
    giou_diff_ci: tuple[float, float] | None = None
    giou_p: float
    ciou_diff: float
    ciou_diff_ci: tuple[float, float] | None = None
    ciou_p: float
    exact: bool = False
    resamples: int = 0
    permutations: int = 0
    seed: int = 0
    method: str = "studentized"


def _paired_totals(a: Sequence[QueryRecord], b: Sequence[QueryRecord]) -> np.ndarray:
    """Image totals of A then B (``n_images x 8``) over the same queries, aligned image by image (B's
    queries are grouped into A's images)."""
    by_id = {r.query_id: r for r in b}
    if len(by_id) != len(b) or len({r.query_id for r in a}) != len(a):
        raise InputError("duplicate query_id in a paired comparison")
    if set(by_id) != {r.query_id for r in a}:
        raise InputError("a paired comparison needs both systems scored on the same queries")
    _, totals_a = image_totals(a)
    _, totals_b = image_totals([by_id[r.query_id].model_copy(update={"sample": _image_key(r)}) for r in a])
    return np.concatenate([totals_a, totals_b], axis=1)


def _swap_patterns(rng: np.random.Generator, n_images: int, permutations: int):
    """Blocks of 0/1 swap patterns (1 = exchange A's and B's predictions on that image); every pattern when
    ``2**n_images <= permutations`` (then the test is exact), else random ones."""
    if _exact(n_images, permutations):
        codes = np.arange(2**n_images)
        for start in range(0, len(codes), 4096):
            yield ((codes[start:start + 4096, None] >> np.arange(n_images)) & 1).astype(np.float64)
        return
    for start in range(0, permutations, 256):
        yield rng.integers(0, 2, size=(min(256, permutations - start), n_images)).astype(np.float64)


def _exact(n_images: int, permutations: int) -> bool:
    return n_images <= 20 and 2**n_images <= permutations


def _permutation_p(totals: np.ndarray, observed: np.ndarray, rng: np.random.Generator, permutations: int
                   ) -> tuple[float, float]:
    """Two-sided sign-flip p-values of gIoU and cIoU differences: the share of swap patterns whose difference
    is at least as large in magnitude as the observed one (``(k + 1) / (P + 1)`` for random patterns)."""
    a, b = totals[:, :4], totals[:, 4:]
    extreme, drawn = np.zeros(2), 0
    for swap in _swap_patterns(rng, len(totals), permutations):
        keep = 1.0 - swap
        diff = _evaluate(PAIRED_TERMS, np.concatenate([keep @ a + swap @ b, keep @ b + swap @ a], axis=1))
        extreme += np.count_nonzero(np.abs(diff) >= np.abs(observed) - 1e-12, axis=0)
        drawn += len(swap)
    p = extreme / drawn if _exact(len(totals), permutations) else (extreme + 1) / (drawn + 1)
    return float(min(1.0, p[0])), float(min(1.0, p[1]))


def _images_that_differ(totals: np.ndarray) -> int:
    """How many images the two systems of paired ``totals`` (A's four columns, then B's) scored differently."""
    return int(np.count_nonzero(np.any(totals[:, :4] != totals[:, 4:], axis=1)))


def paired_test(a: Sequence[QueryRecord], b: Sequence[QueryRecord], *, resamples: int = 1000,
                permutations: int = 10000, seed: int = 0, level: float = 0.95,
                method: str = "studentized") -> PairedTest:
    """Compare two systems scored on the same queries (gIoU and cIoU, A minus B).

    The interval resamples images (the same resample for both systems, so what they share cancels); the
    p-value tests "A and B are exchangeable" by swapping the two systems' predictions on random images
    (all ``2**n`` swaps when there are few images: an exact test). Both are paired because the systems saw
    the same images: a difference that is small against each system's own interval can still be certain.
    ``permutations=0`` skips the p-value (reported as 1.0); ``resamples=0`` skips the interval. When the
    systems differ on fewer than ``STUDENTIZED_MIN_IMAGES`` images the interval is the percentile one (the
    result's ``method`` says so).
    """
    if not a:
        raise InputError("a paired comparison needs at least one query")
    totals = _paired_totals(a, b)
    observed = _evaluate(PAIRED_TERMS, totals.sum(axis=0))
    rng = np.random.default_rng(seed)
    giou_ci = ciou_ci = None
    if method == "studentized" and _images_that_differ(totals) < STUDENTIZED_MIN_IMAGES:
        # Two systems that differ on a handful of images give resamples with no spread of their own, which a
        # bootstrap-t turns into [-1, x]: the percentile interval of the same resamples is the honest one.
        method = "percentile"
    if resamples > 0 and len(totals) >= 2:
        bounds = np.clip(_bootstrap(totals, PAIRED_TERMS, resamples=resamples, seed=seed, level=level,
                                    method=method, rng=rng), -1.0, 1.0)
        giou_ci, ciou_ci = (float(bounds[0, 0]), float(bounds[1, 0])), (float(bounds[0, 1]), float(bounds[1, 1]))
    giou_p, ciou_p = _permutation_p(totals, observed, rng, permutations) if permutations > 0 else (1.0, 1.0)
    return PairedTest(n_queries=len(a), n_images=len(totals), giou_diff=float(observed[0]), giou_diff_ci=giou_ci,
                      giou_p=giou_p, ciou_diff=float(observed[1]), ciou_diff_ci=ciou_ci, ciou_p=ciou_p,
                      exact=permutations > 0 and _exact(len(totals), permutations), resamples=resamples,
                      permutations=permutations, seed=seed, method=method)


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
