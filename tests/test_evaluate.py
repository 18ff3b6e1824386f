"""LISA-compatible metric semantics, checked against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from llavaseg.errors import InputError, LlavasegError
from llavaseg.evaluate import (
    CUMULATIVE_EPS,
    QUERY_EPS,
    MetricAccumulator,
    QueryRecord,
    intersection_union,
    query_iou,
    summarize,
)


def test_ignore_pixels_are_removed_from_prediction_and_gt():
    gt = np.array([[1, 1, 255, 255],
                   [0, 0, 0, 0]], dtype=np.uint8)
    pred = np.array([[1, 0, 1, 1],
                     [1, 0, 0, 0]], dtype=bool)
    # prediction on the two 255 pixels is dropped; pred fg = {(0,0), (1,0)}, gt fg = {(0,0), (0,1)}
    # I = 1, U = 2 + 2 - 1 = 3 (without the ignore rule U would be 5)
    assert intersection_union(pred, gt) == (1, 3)


def test_prediction_only_on_ignore_region_with_empty_gt_is_a_correct_no_object():
    gt = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    pred = np.array([[False, True], [True, False]])
    assert intersection_union(pred, gt) == (0, 0)
    assert query_iou(0, 0) == 1.0


def test_empty_gt_and_empty_prediction_is_one():
    gt = np.zeros((3, 3), np.uint8)
    pred = np.zeros((3, 3), bool)
    i, u = intersection_union(pred, gt)
    assert (i, u) == (0, 0)
    assert query_iou(i, u) == 1.0


def test_empty_gt_nonempty_prediction_is_zero():
    gt = np.zeros((3, 3), np.uint8)
    pred = np.zeros((3, 3), bool)
    pred[1, 1] = True
    i, u = intersection_union(pred, gt)
    assert (i, u) == (0, 1)
    assert query_iou(i, u) == 0.0


def test_empty_prediction_nonempty_gt_is_zero():
    gt = np.zeros((3, 3), np.uint8)
    gt[0, :] = 1
    i, u = intersection_union(np.zeros((3, 3), bool), gt)
    assert (i, u) == (0, 3)
    assert query_iou(i, u) == 0.0


def test_perfect_prediction_keeps_lisas_epsilon():
    gt = np.zeros((2, 2), np.uint8)
    gt[0] = 1
    i, u = intersection_union(gt.astype(bool), gt)
    assert (i, u) == (2, 2)
    # LISA: 2 / (2 + 1e-5) = 0.999995..., not exactly 1
    assert query_iou(i, u) == pytest.approx(2 / 2.00001, abs=1e-12)
    assert query_iou(i, u) < 1.0


def test_integer_prediction_and_bool_gt_are_accepted():
    gt = np.array([[True, False]])
    pred = np.array([[1, 1]], dtype=np.int32)
    assert intersection_union(pred, gt) == (1, 2)


@pytest.mark.parametrize(
    "pred, gt, fragment",
    [
        (np.zeros((2, 3), bool), np.zeros((3, 2), np.uint8), "does not match"),
        (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8), "boolean"),
        (np.zeros((2, 2), bool), np.full((2, 2), 2, np.uint8), "found 2"),
        (np.zeros((2, 2, 1), bool), np.zeros((2, 2, 1), np.uint8), "2-D"),
        (np.full((2, 2), 3, np.int64), np.zeros((2, 2), np.uint8), "only 0 and 1"),
    ],
)
def test_bad_masks_raise_clear_input_errors(pred, gt, fragment):
    with pytest.raises(InputError, match=fragment) as info:
        intersection_union(pred, gt)
    assert isinstance(info.value, LlavasegError)
    assert "\n" not in str(info.value)


def test_query_iou_rejects_impossible_counts():
    with pytest.raises(InputError):
        query_iou(5, 3)
    with pytest.raises(InputError):
        query_iou(-1, 3)


def _three_queries() -> list[QueryRecord]:
    # image A, query 1: gt [1, 1], pred [1, 0]            -> I = 1,  U = 2
    q1 = QueryRecord.from_masks(np.array([[1, 0]], bool), np.array([[1, 1]], np.uint8),
                                query_id="A#0", sample="A", text_index=0, is_sentence=False)
    # image A, query 2: gt all 100 pixels, pred 9 rows of 10 -> I = 90, U = 100
    pred = np.zeros((10, 10), bool)
    pred[:9] = True
    q2 = QueryRecord.from_masks(pred, np.ones((10, 10), np.uint8),
                                query_id="A#1", sample="A", text_index=1, is_sentence=False)
    # image B, query 1: gt 8 pixels, empty pred            -> I = 0,  U = 8
    q3 = QueryRecord.from_masks(np.zeros((2, 4), bool), np.ones((2, 4), np.uint8),
                                query_id="B#0", sample="B", text_index=0, is_sentence=True)
    return [q1, q2, q3]


def test_several_queries_per_image_giou_is_mean_of_query_ious_and_ciou_ratio_of_sums():
    recs = _three_queries()
    assert [(r.intersection, r.union) for r in recs] == [(1, 2), (90, 100), (0, 8)]
    m = summarize(recs)["overall"]
    # gIoU = (1/2 + 90/100 + 0) / 3 = 1.4 / 3 = 0.4667 (each IoU with LISA's +1e-5 in the denominator)
    expected_giou = (1 / (2 + QUERY_EPS) + 90 / (100 + QUERY_EPS) + 0.0) / 3
    assert m.giou == pytest.approx(expected_giou, abs=1e-12)
    assert m.giou == pytest.approx(0.46667, abs=1e-4)
    # cIoU = (1 + 90 + 0) / (2 + 100 + 8) = 91 / 110 = 0.8273: very different from gIoU
    assert m.ciou == pytest.approx(91 / (110 + CUMULATIVE_EPS), abs=1e-12)
    assert m.ciou == pytest.approx(0.82727, abs=1e-4)
    assert m.n_queries == 3 and m.n_errors == 0


def test_giou_equals_lisas_per_image_average_weighted_by_mask_count():
    recs = _three_queries()
    # LISA: image A averages its two masks (0.5 + 0.9) / 2 = 0.7 and enters the meter with n = 2;
    # image B gives 0.0 with n = 1 -> (0.7 * 2 + 0.0 * 1) / 3 = 0.4667 = the per-query mean.
    per_image: dict[str, list[float]] = {}
    for r in recs:
        per_image.setdefault(r.sample, []).append(r.iou)
    meter_sum = sum(np.mean(v) * len(v) for v in per_image.values())
    meter_count = sum(len(v) for v in per_image.values())
    assert summarize(recs)["overall"].giou == pytest.approx(meter_sum / meter_count, abs=1e-12)
    # ... whereas an unweighted mean over images would be (0.7 + 0) / 2 = 0.35
    unweighted = np.mean([np.mean(v) for v in per_image.values()])
    assert abs(summarize(recs)["overall"].giou - unweighted) > 0.1


def test_short_and_long_splits_follow_is_sentence():
    res = summarize(_three_queries())
    assert res["short"].n_queries == 2 and res["long"].n_queries == 1
    # short: (0.5 + 0.9) / 2 = 0.7 ; cIoU 91 / 102 = 0.8922
    assert res["short"].giou == pytest.approx((1 / 2.00001 + 90 / 100.00001) / 2, abs=1e-12)
    assert res["short"].ciou == pytest.approx(91 / 102, abs=1e-9)
    # long: the single empty prediction -> 0 / 0
    assert res["long"].giou == 0.0 and res["long"].ciou == 0.0


def test_empty_split_reports_none_not_zero():
    rec = QueryRecord(query_id="q", is_sentence=False, intersection=3, union=4)
    res = summarize([rec])
    assert res["long"].n_queries == 0
    assert res["long"].giou is None and res["long"].ciou is None
    assert set(res) == {"overall", "short", "long"}


def test_all_empty_split_mirrors_lisa_giou_one_ciou_zero():
    # every query has empty GT and empty prediction: gIoU 1.0, and LISA's cIoU 0 / (0 + 1e-10) = 0
    recs = [QueryRecord(query_id=str(i), intersection=0, union=0) for i in range(3)]
    m = summarize(recs)["overall"]
    assert m.giou == 1.0 and m.ciou == 0.0


def test_failed_query_counts_zero_with_gt_area_as_union():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 1          # 4 target pixels
    gt[3, 3] = 255          # ignored, not part of the union
    acc = MetricAccumulator()
    acc.add_masks(gt == 1, gt, query_id="ok", is_sentence=False)   # I = U = 4
    failed = acc.add_error(gt, "model crashed", query_id="bad", is_sentence=False)
    assert (failed.intersection, failed.union, failed.iou) == (0, 4, 0.0)
    m = acc.result()["overall"]
    assert m.n_queries == 2 and m.n_errors == 1
    assert m.giou == pytest.approx((4 / 4.00001 + 0) / 2, abs=1e-12)
    assert m.ciou == pytest.approx(4 / 8, abs=1e-9)


def test_failed_query_on_empty_gt_is_not_rewarded():
    gt = np.zeros((2, 2), np.uint8)
    rec = QueryRecord.failed(gt, "timeout", query_id="q", is_sentence=True)
    assert rec.union == 0 and rec.iou == 0.0  # an empty prediction would have scored 1.0
    assert summarize([rec])["long"].giou == 0.0


def test_record_derives_iou_and_rejects_inconsistent_values():
    rec = QueryRecord(query_id="q", intersection=1, union=4)
    assert rec.iou == pytest.approx(1 / 4.00001)
    assert QueryRecord.model_validate_json(rec.model_dump_json()) == rec
    with pytest.raises(ValidationError):
        QueryRecord(query_id="q", intersection=1, union=4, iou=0.9)
    with pytest.raises(ValidationError):
        QueryRecord(query_id="q", intersection=5, union=4)
    with pytest.raises(ValidationError):
        QueryRecord(query_id="q", intersection=1, union=4, iou=0.0, error="boom")


def test_duplicate_query_ids_are_rejected():
    rec = QueryRecord(query_id="q", intersection=1, union=1)
    with pytest.raises(InputError, match="duplicate"):
        summarize([rec, rec])
    acc = MetricAccumulator()
    acc.add(rec)
    with pytest.raises(InputError, match="already scored"):
        acc.add(rec)


def _lisa_style_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Independent re-statement of intersectionAndUnionGPU with 2 histogram bins over [0, 1]."""
    out = pred.astype(np.int64).ravel().copy()
    tgt = gt.astype(np.int64).ravel()
    out[tgt == 255] = 255
    inter_vals = out[out == tgt]
    bins = np.array([0.0, 0.5, 1.0])
    area_i = np.histogram(inter_vals, bins=bins)[0]
    area_o = np.histogram(out, bins=bins)[0]
    area_t = np.histogram(tgt, bins=bins)[0]
    union = area_o + area_t - area_i
    return int(area_i[1]), int(union[1])


@settings(max_examples=60, deadline=None)
@given(
    pred=arrays(np.bool_, (5, 7)),
    gt=arrays(np.uint8, (5, 7), elements=st.sampled_from([0, 1, 255])),
)
def test_counts_match_histogram_formulation(pred, gt):
    assert intersection_union(pred, gt) == _lisa_style_counts(pred, gt)
