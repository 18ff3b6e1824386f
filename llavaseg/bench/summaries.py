"""From per-query records to what a results table shows: metrics per group, intervals, paired comparisons.

Route runs (:mod:`llavaseg.bench.runner`) and prediction sets scored with ``llavaseg-bench score``
(:mod:`llavaseg.bench.score`) go through these same functions, so a number means the same thing in both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llavaseg.bench.records import BenchRecord
from llavaseg.bench.report import RouteComparison
from llavaseg.evaluate import (
    QueryRecord,
    SplitMetrics,
    paired_test,
    split_metrics,
    summarize,
)

__all__ = ["Statistics", "route_metrics", "compare_routes", "DEFAULT_BOOTSTRAP", "DEFAULT_PERMUTATIONS"]

DEFAULT_BOOTSTRAP = 1000
"""Bootstrap resamples behind every interval (``--bootstrap``); 0 turns intervals off."""
DEFAULT_PERMUTATIONS = 10000
"""Sign-flip patterns behind every paired p-value (all ``2**n`` when fewer images: exact)."""


@dataclass(frozen=True)
class Statistics:
    """How the numbers are computed: the protocol and the uncertainty settings (all seeded)."""

    lisa_compat: bool = False
    bootstrap: int = DEFAULT_BOOTSTRAP
    permutations: int = DEFAULT_PERMUTATIONS
    seed: int = 0


def route_metrics(records: list[QueryRecord], groups: dict[str, str] | None,
                  stats: Statistics) -> dict[str, SplitMetrics]:
    """ReasonSeg's overall/short/long, or one entry per group label (RefCOCO splits) in first-seen order."""
    options = {"lisa_compat": stats.lisa_compat, "bootstrap": stats.bootstrap, "seed": stats.seed}
    if groups is None:
        return summarize(records, **options)
    labels = list(dict.fromkeys(groups.values()))
    return {label: split_metrics([r for r in records if groups[r.query_id] == label], **options)
            for label in labels}


def compare_routes(per_route: dict[str, list[BenchRecord]], stats: Statistics) -> list[RouteComparison]:
    """A paired test for every two routes (in table order), on the queries both scored.

    Route runs score the same selection with every route; prediction sets may differ (a folder of
    ``<image stem>.png`` covers the first text of each image only), so the common queries are used and their
    number is reported. Pairs with no common query are left out.
    """
    comparisons = []
    for (name_a, records_a), (name_b, records_b) in itertools.combinations(per_route.items(), 2):
        common = {r.query_id for r in records_a} & {r.query_id for r in records_b}
        if not common:
            continue
        test = paired_test([r for r in records_a if r.query_id in common],
                           [r for r in records_b if r.query_id in common],
                           resamples=stats.bootstrap, permutations=stats.permutations, seed=stats.seed)
        comparisons.append(RouteComparison(a=name_a, b=name_b, **test.model_dump()))
    return comparisons
