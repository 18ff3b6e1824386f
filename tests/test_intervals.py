"""Uncertainty of gIoU / cIoU: bootstrap over images and the paired test, on cases small enough to check by hand.

The coverage of the intervals (do 95% intervals contain the truth 95% of the time?) is measured by simulation in
``benchmarks/interval_coverage.py``; here its code runs once on a tiny setting, and the results it wrote are
read back.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from llavaseg.errors import InputError
from llavaseg.evaluate import (
    STUDENTIZED_MIN_IMAGES,
    QueryRecord,
    bootstrap_intervals,
    bootstrap_replicates,
    image_totals,
    intervals_from_totals,
    jackknife_se,
    paired_test,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def _rec(qid: str, sample: str, inter: int, union: int, **kw) -> QueryRecord:
    return QueryRecord(query_id=qid, sample=sample, intersection=inter, union=union, **kw)


def test_image_totals_group_the_texts_of_an_image():
    records = [_rec("a#0", "a", 10, 10), _rec("a#1", "a", 0, 10), _rec("b#0", "b", 0, 0),
               _rec("c#0", "c", 0, 5, error="crash")]
    keys, totals = image_totals(records)
    assert keys == ["a", "b", "c"]
    # per image: queries, sum of IoUs (10/(10+1e-5) + 0; an empty/empty query is 1; a failure 0), sum I, sum U
    np.testing.assert_allclose(totals, [[2, 10 / (10 + 1e-5), 10, 20], [1, 1.0, 0, 0], [1, 0.0, 0, 5]])


def test_replicates_reweight_whole_images_by_hand():
    # image A: 2 texts, both IoU 1, I 10, U 10; image B: 1 text, IoU 0, I 0, U 30
    totals = np.array([[2, 2.0, 10, 10], [1, 0.0, 0, 30]])
    giou, ciou = bootstrap_replicates(totals, np.array([[1, 1], [2, 0], [0, 2]]))
    # [1, 1] is the sample itself: gIoU = 2 / 3 (queries, not images, are averaged), cIoU = 10 / 40
    np.testing.assert_allclose(giou, [2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(ciou, [10 / (40 + 1e-10), 20 / (20 + 1e-10), 0.0])


def test_percentile_interval_of_two_images_is_hand_checkable():
    # Two images, IoU 1 and 0. A resample of 2 images is (A, A) with probability 1/4 (gIoU 1), (B, B) 1/4
    # (gIoU 0), one of each 1/2 (gIoU 0.5): the 2.5% and 97.5% quantiles of 1000 resamples are 0 and 1.
    records = [_rec("a", "a", 4, 4), _rec("b", "b", 0, 4)]
    giou_ci, ciou_ci = bootstrap_intervals(records, resamples=1000, seed=0, method="percentile")
    assert giou_ci == pytest.approx((0.0, 4 / (4 + 1e-5)), abs=1e-12) and ciou_ci == pytest.approx((0.0, 1.0))
    totals = image_totals(records)[1]
    counts = np.random.default_rng(0).multinomial(2, [0.5, 0.5], size=4000)
    share_half = np.mean(np.isclose(bootstrap_replicates(totals, counts)[0], 0.5 * 4 / (4 + 1e-5)))
    assert share_half == pytest.approx(0.5, abs=0.03)


def test_jackknife_standard_error_by_hand():
    # three single-text images with IoUs 1, 0, 0.5: leave-one-out means 0.25, 0.75, 0.5, around 0.5;
    # se^2 = (n-1)/n * sum (theta_i - mean)^2 = 2/3 * (0.0625 + 0.0625 + 0) -> se = 0.5 / sqrt(3) (= sd / sqrt n)
    totals = np.array([[1, 1.0, 1, 1], [1, 0.0, 0, 1], [1, 0.5, 1, 2]])
    se = jackknife_se(totals)
    assert se.shape == (1, 2)
    assert se[0, 0] == pytest.approx(0.5 / np.sqrt(3), rel=1e-12)


def test_intervals_are_seeded_and_contain_the_estimate():
    rng = np.random.default_rng(3)
    records = [_rec(f"q{i}", f"s{i // 2}", int(i_), 100) for i, i_ in enumerate(rng.integers(0, 100, 40))]
    assert len({r.sample for r in records}) >= STUDENTIZED_MIN_IMAGES  # the studentized method is used
    first = bootstrap_intervals(records, resamples=300, seed=7)
    assert bootstrap_intervals(records, resamples=300, seed=7) == first
    assert bootstrap_intervals(records, resamples=300, seed=8) != first
    metrics = summarize(records, bootstrap=300, seed=7)["overall"]
    assert (metrics.giou_ci, metrics.ciou_ci) == first
    assert first[0][0] < metrics.giou < first[0][1] and first[1][0] < metrics.ciou < first[1][1]
    percentile = bootstrap_intervals(records, resamples=300, seed=7, method="percentile")
    assert percentile != first and percentile[0][0] < metrics.giou < percentile[0][1]


def test_degenerate_and_too_small_splits():
    same = [_rec(f"q{i}", f"s{i}", 5, 10) for i in range(12)]  # every image alike: nothing varies
    giou_ci, ciou_ci = bootstrap_intervals(same, resamples=200)
    assert giou_ci == pytest.approx((0.5, 0.5), abs=1e-6) and ciou_ci == pytest.approx((0.5, 0.5), abs=1e-6)
    assert bootstrap_intervals([_rec("a", "a", 1, 2), _rec("b", "a", 0, 2)]) == (None, None)  # one image
    assert summarize(same, bootstrap=0)["overall"].giou_ci is None
    with pytest.raises(InputError, match="interval method"):
        bootstrap_intervals(same, method="bca")
    with pytest.raises(InputError, match="at least two images"):
        intervals_from_totals(np.zeros((1, 4)))


def test_paired_exact_sign_flip_by_hand():
    # three images, A better than B by the same amount on each: of the 2**3 swap patterns only "no swap" and
    # "swap all" give a difference as large (in magnitude) as observed -> p = 2/8, exactly
    a = [_rec(f"q{i}", f"s{i}", 8, 10) for i in range(3)]
    b = [_rec(f"q{i}", f"s{i}", 4, 10) for i in range(3)]
    test = paired_test(a, b, resamples=200, permutations=10000)
    assert test.exact and test.n_images == 3 and test.n_queries == 3
    assert test.giou_p == pytest.approx(0.25) and test.ciou_p == pytest.approx(0.25)
    assert test.giou_diff == pytest.approx(0.4, abs=1e-5) and test.ciou_diff == pytest.approx(0.4)
    assert test.giou_diff_ci == pytest.approx((0.4, 0.4), abs=1e-5)  # the difference is the same on every image
    same = paired_test(a, a, resamples=200)
    assert same.giou_diff == 0.0 and same.giou_p == 1.0 and same.giou_diff_ci == (0.0, 0.0)


def test_paired_random_permutations_and_mismatched_queries():
    rng = np.random.default_rng(0)
    a = [_rec(f"q{i}", f"s{i}", int(v), 100) for i, v in enumerate(rng.integers(40, 90, 30))]
    b = [_rec(f"q{i}", f"s{i}", int(v), 100) for i, v in enumerate(rng.integers(0, 50, 30))]
    test = paired_test(a, b, resamples=300, permutations=999, seed=1)
    assert not test.exact and test.giou_p == pytest.approx(1 / 1000)  # no random swap pattern is as extreme
    assert test.giou_diff_ci[0] > 0 and test.ciou_diff_ci[0] > 0
    with pytest.raises(InputError, match="same queries"):
        paired_test(a, b[:-1])


def test_coverage_benchmark_runs_and_its_results_meet_the_target():
    spec = importlib.util.spec_from_file_location("interval_coverage", ROOT / "benchmarks" / "interval_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.coverage("reasonseg-like", 30, repeats=20, resamples=200, seed=0)
    assert 0.5 <= row["giou_coverage"] <= 1.0 and 0.0 < row["true_giou"] < 1.0
    results = json.loads((ROOT / "benchmarks" / "results" / "interval_coverage.json").read_text())
    assert results["all_within_target"] and results["nominal"] == 0.95
    for row in results["coverage"]:
        if not row["stress"]:
            assert 0.93 <= row["giou_coverage"] <= 0.97 and 0.93 <= row["ciou_coverage"] <= 0.97, row


def test_paired_interval_of_systems_that_differ_on_few_images_stays_inside_the_differences():
    # 100 images; B equals A except on 3 images where A is better by 0.2 and 0.5 and worse by 0.1 (gIoU diff
    # 0.006). A bootstrap-t divides by the zero spread of the many resamples without two of those images and
    # reported [-1, x] in the default benchmark; the percentile interval stays near the per-image differences.
    a = [_rec(f"q{i}", f"s{i}", 50, 100) for i in range(100)]
    b = [_rec(f"q{i}", f"s{i}", {0: 30, 1: 0, 2: 60}.get(i, 50), 100) for i in range(100)]
    test = paired_test(a, b, resamples=500, permutations=2000)
    assert test.method == "percentile"
    assert test.giou_diff == pytest.approx((0.2 + 0.5 - 0.1) / 100, abs=1e-6)
    low, high = test.giou_diff_ci
    assert -0.1 <= low <= test.giou_diff <= high <= 0.5  # not [-1, ...]: each image moves the mean by <= 0.005
    assert high < 0.05
    many = [_rec(f"q{i}", f"s{i}", 50 + (i % 7), 100) for i in range(100)]
    assert paired_test(a, many, resamples=100, permutations=0).method == "studentized"
