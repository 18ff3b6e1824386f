"""Do the evaluator's 95% bootstrap intervals cover the true gIoU / cIoU 95% of the time? Measured by simulation.

    python benchmarks/interval_coverage.py [--repeats 2000] [--resamples 1000] [--seed 0] [--quick]

A *population* of images is described by a generator (how many texts an image has, how hard it is, how large
its target is, whether it has one at all); its true gIoU and cIoU are ratios of expectations
(``E[sum of IoUs per image] / E[texts per image]``, ``E[sum I] / E[sum U]``), estimated once from two million
images. Then, ``--repeats`` times, a split of ``n`` images is drawn, scored, and the evaluator's interval
(:func:`llavaseg.evaluate.intervals_from_totals`, the function behind ``giou_ci`` / ``ciou_ci`` in
``results.json``; per-image totals are what :func:`~llavaseg.evaluate.image_totals` builds from query records)
is checked for containing the true value. A nominal 95% interval should cover 93-97% of the time (with 2000
repeats one standard error of the coverage is 0.5 points). The plain percentile interval is measured beside the
default (studentized: bootstrap-t with jackknife standard errors) to show why it is not the default.

Populations (the texts of an image share its difficulty and its target, as in the real data sets, which is why
the bootstrap resamples images; larger targets are found more often, so cIoU is above gIoU as in published
tables):

* ``reasonseg-like``: 1-3 texts per image, bimodal IoU (the right object ~0.8, a wrong one ~0), lognormal
  target areas (sigma 1: cIoU is dominated by the large ones); splits of 50, 200 (ReasonSeg val) and 779 (test)
  images;
* ``refcoco-like``: 1 + Poisson(4) sentences per image, higher IoUs; 200 and 750 (testA-sized) images;
* ``grefcoco-like``: reasonseg-like with 15% no-target queries (an empty prediction scores 1, any other 0 and
  adds its area to the union); 200 images;
* ``heavy-tailed`` (a stress case, reported but outside the target): areas spread with sigma 1.4.

The paired interval of a difference (a better system on the same images) is checked the same way, and the
permutation test's false-positive rate when two systems are exchangeable is measured (nominal 5%). Writes
``benchmarks/results/interval_coverage.json``; about three minutes of one core (``--quick``: a fifth of the
repeats).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, set before numpy
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

from llavaseg.atomic import atomic_write_text  # noqa: E402
from llavaseg.evaluate import (  # noqa: E402
    CUMULATIVE_EPS,
    QUERY_EPS,
    QueryRecord,
    intervals_from_totals,
    paired_test,
)

RESULTS = Path(__file__).resolve().parent / "results" / "interval_coverage.json"
POPULATIONS: dict[str, dict[str, Any]] = {
    "reasonseg-like": {"texts": "1-3", "success": 1.1, "spread": 1.0, "no_target": 0.0, "hit": (8.0, 2.0)},
    "refcoco-like": {"texts": "poisson", "success": 1.8, "spread": 0.8, "no_target": 0.0, "hit": (9.0, 1.5)},
    "grefcoco-like": {"texts": "1-3", "success": 1.1, "spread": 1.0, "no_target": 0.15, "hit": (8.0, 2.0)},
    # a stress case outside the target: target areas spread twice as widely on the log scale (a few images
    # hold most of the union, so cIoU's sample variance is usually an underestimate)
    "heavy-tailed": {"texts": "1-3", "success": 1.1, "spread": 1.0, "no_target": 0.0, "hit": (8.0, 2.0),
                     "area_sigma": 1.4, "stress": True},
}
METHODS = ("studentized", "percentile")
SPLITS = [("reasonseg-like", 50), ("reasonseg-like", 200), ("reasonseg-like", 779), ("refcoco-like", 200),
          ("refcoco-like", 750), ("grefcoco-like", 200), ("heavy-tailed", 200)]
"""(population, images per split). Splits of more than 1000 images would run half the repeats (time)."""


def _texts_per_image(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "poisson":
        return 1 + rng.poisson(4.0, n)
    return rng.choice([1, 2, 3], size=n, p=[0.4, 0.35, 0.25])


def draw_images(rng: np.random.Generator, population: dict[str, Any], n_images: int) -> dict[str, np.ndarray]:
    """The images of a split, per query: which image, its difficulty, its target's area, no-target or not.
    The texts of an image share its difficulty and its target (as in ReasonSeg and RefCOCO)."""
    k = _texts_per_image(rng, population["texts"], n_images)
    image = np.repeat(np.arange(n_images), k)
    return {"image": image, "difficulty": rng.normal(0.0, 1.0, n_images)[image],
            "area": np.exp(rng.normal(8.0, population.get("area_sigma", 1.0), n_images))[image],
            "no_target": rng.random(len(image)) < population["no_target"]}


def draw_outcomes(rng: np.random.Generator, population: dict[str, Any], images: dict[str, np.ndarray],
                  shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One system's ``(IoU, I, U)`` per query; ``shift`` raises its success logit (a better system)."""
    n = len(images["image"])
    # larger targets are found more often (so cIoU, weighted by area, is above gIoU, as in published tables)
    size = 0.4 * (np.log(images["area"]) - 8.0)
    logit = population["success"] + shift + population["spread"] * images["difficulty"] + size
    success = rng.random(n) < 1 / (1 + np.exp(-logit))
    iou = np.where(success, rng.beta(*population["hit"], n),
                   np.where(rng.random(n) < 0.5, 0.0, rng.beta(0.5, 6.0, n)))
    union = np.round(images["area"] * (1.0 + rng.random(n))).astype(np.int64)
    inter = np.round(iou * union).astype(np.int64)
    # no target: a "successful" system predicts nothing (U = 0, IoU 1), else a false positive of some area
    false_positive = np.round(images["area"] * rng.random(n)).astype(np.int64) + 1
    inter = np.where(images["no_target"], 0, inter)
    union = np.where(images["no_target"], np.where(success, 0, false_positive), union)
    return np.where(union == 0, 1.0, inter / (union + QUERY_EPS)), inter, union


def totals_of(image: np.ndarray, outcomes: tuple[np.ndarray, np.ndarray, np.ndarray], n_images: int) -> np.ndarray:
    """Per-image (query count, sum IoU, sum I, sum U): what :func:`llavaseg.evaluate.image_totals` returns."""
    iou, inter, union = outcomes
    return np.stack([np.bincount(image, minlength=n_images).astype(np.float64),
                     np.bincount(image, iou, n_images), np.bincount(image, inter, n_images),
                     np.bincount(image, union, n_images)], axis=1)


def true_values(population: dict[str, Any], seed: int, shift: float = 0.0, n_images: int = 2_000_000
                ) -> tuple[float, float]:
    """The population's gIoU and cIoU (ratios of expectations), from one very large sample."""
    rng = np.random.default_rng([seed, 99])
    sums = np.zeros(4)
    for _ in range(n_images // 250_000):
        images = draw_images(rng, population, 250_000)
        iou, inter, union = draw_outcomes(rng, population, images, shift)
        sums += [len(iou), iou.sum(), inter.sum(), union.sum()]
    return sums[1] / sums[0], sums[2] / (sums[3] + CUMULATIVE_EPS)


def coverage(name: str, n_images: int, repeats: int, resamples: int, seed: int) -> dict[str, Any]:
    """How often the evaluator's intervals contain the population's true gIoU / cIoU: the default
    (studentized) method, and the plain percentile interval for comparison."""
    population = POPULATIONS[name]
    giou_true, ciou_true = true_values(population, seed)
    rng = np.random.default_rng([seed, n_images])
    hits = {method: np.zeros(2) for method in METHODS}
    widths = {method: np.zeros(2) for method in METHODS}
    for repeat in range(repeats):
        images = draw_images(rng, population, n_images)
        totals = totals_of(images["image"], draw_outcomes(rng, population, images), n_images)
        for method in METHODS:
            giou_ci, ciou_ci = intervals_from_totals(totals, resamples=resamples, seed=repeat, method=method)
            hits[method] += [giou_ci[0] <= giou_true <= giou_ci[1], ciou_ci[0] <= ciou_true <= ciou_ci[1]]
            widths[method] += [giou_ci[1] - giou_ci[0], ciou_ci[1] - ciou_ci[0]]
    row: dict[str, Any] = {"population": name, "n_images": n_images, "stress": population.get("stress", False),
                           "repeats": repeats, "resamples": resamples, "true_giou": giou_true, "true_ciou": ciou_true}
    for method in METHODS:
        prefix = "" if method == "studentized" else f"{method}_"
        row |= {f"{prefix}giou_coverage": hits[method][0] / repeats, f"{prefix}ciou_coverage": hits[method][1] / repeats,
                f"{prefix}giou_mean_width": widths[method][0] / repeats,
                f"{prefix}ciou_mean_width": widths[method][1] / repeats}
    return row | {"coverage_standard_error": math.sqrt(0.95 * 0.05 / repeats)}


def _records(image: np.ndarray, outcomes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[QueryRecord]:
    _, inter, union = outcomes
    return [QueryRecord(query_id=f"q{q}", sample=str(i), intersection=int(a), union=int(b))
            for q, (i, a, b) in enumerate(zip(image, inter, union))]


def paired_checks(repeats: int, resamples: int, seed: int, n_images: int = 100) -> dict[str, Any]:
    """:func:`llavaseg.evaluate.paired_test` on the same images: coverage of its interval of A - B when B is
    better (success logit +0.4), and its permutation p-value's false-positive rate when A and B are two
    independent draws of the same system (exchangeable: p <= 0.05 should happen at most 5% of the time)."""
    population = POPULATIONS["reasonseg-like"]
    truth_a, truth_b = true_values(population, seed), true_values(population, seed, shift=0.4)
    true_diff = (truth_a[0] - truth_b[0], truth_a[1] - truth_b[1])
    rng = np.random.default_rng([seed, 7])
    covered, rejected = np.zeros(2), np.zeros(2)
    for repeat in range(repeats):
        images = draw_images(rng, population, n_images)
        a = _records(images["image"], draw_outcomes(rng, population, images))
        b = _records(images["image"], draw_outcomes(rng, population, images, shift=0.4))
        same = _records(images["image"], draw_outcomes(rng, population, images))
        test = paired_test(a, b, resamples=resamples, permutations=0, seed=repeat)
        covered += [test.giou_diff_ci[0] <= true_diff[0] <= test.giou_diff_ci[1],
                    test.ciou_diff_ci[0] <= true_diff[1] <= test.ciou_diff_ci[1]]
        null = paired_test(a, same, resamples=0, permutations=499, seed=repeat)
        rejected += [null.giou_p <= 0.05, null.ciou_p <= 0.05]
    return {"population": "reasonseg-like", "n_images": n_images, "repeats": repeats, "resamples": resamples,
            "permutations": 499, "true_giou_diff": true_diff[0], "true_ciou_diff": true_diff[1],
            "giou_diff_coverage": covered[0] / repeats, "ciou_diff_coverage": covered[1] / repeats,
            "permutation_false_positive_rate_giou": rejected[0] / repeats,
            "permutation_false_positive_rate_ciou": rejected[1] / repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000, help="simulated splits per setting (default 2000)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000, as "
                                                                    "llavaseg-bench)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a fifth of the repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = max(10, args.repeats // 5) if args.quick else args.repeats
    start = time.perf_counter()
    rows = []
    for name, n_images in SPLITS:
        rows.append(coverage(name, n_images, repeats if n_images <= 1000 else max(10, repeats // 2), args.resamples,
                             args.seed))
        row = rows[-1]
        print(f"{name:15s} n={n_images:4d} x{row['repeats']}: gIoU {row['true_giou']:.3f} covered "
              f"{row['giou_coverage']:.3f} (percentile {row['percentile_giou_coverage']:.3f}, width "
              f"{row['giou_mean_width']:.3f}); cIoU {row['true_ciou']:.3f} covered {row['ciou_coverage']:.3f} "
              f"(percentile {row['percentile_ciou_coverage']:.3f}, width {row['ciou_mean_width']:.3f})", flush=True)
    paired = paired_checks(max(10, repeats // 2), args.resamples, args.seed)
    print(f"paired n=100: difference covered gIoU {paired['giou_diff_coverage']:.3f} cIoU "
          f"{paired['ciou_diff_coverage']:.3f}; permutation false positives gIoU "
          f"{paired['permutation_false_positive_rate_giou']:.3f} cIoU "
          f"{paired['permutation_false_positive_rate_ciou']:.3f}")
    report = {"benchmark": "interval_coverage", "nominal": 0.95, "target": [0.93, 0.97],
              "method": "studentized bootstrap (bootstrap-t, jackknife standard errors) over images, "
                        "llavaseg.evaluate.intervals_from_totals; percentile_* columns: the plain percentile interval",
              "seed": args.seed, "coverage": rows, "paired": paired,
              "all_within_target": all(0.93 <= r[k] <= 0.97 for r in rows if not r["stress"]
                                       for k in ("giou_coverage", "ciou_coverage")),
              "seconds": round(time.perf_counter() - start, 1), "python": sys.version.split()[0],
              "machine": platform.machine(), "numpy": np.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
