"""The shared benchmark runner behind ``llavaseg-bench``: every route on the same queries, same metrics.

Modules, one job each:

* :mod:`~llavaseg.bench.jsonl` - append-only JSONL stores that survive a killed process (resume);
* :mod:`~llavaseg.bench.config` - ``run.json``: what a results folder was produced with (refuse to mix);
* :mod:`~llavaseg.bench.runner` - the per-route query loop (batched by image, errors recorded, resumable);
* :mod:`~llavaseg.bench.dialogue` - dialogue preservation: route answers vs the base MLLM and references;
* :mod:`~llavaseg.bench.report` - ``results.json`` / ``results.csv`` and the console tables;
* :mod:`~llavaseg.bench.summaries` - metrics per group, 95% intervals, paired comparisons of routes;
* :mod:`~llavaseg.bench.overlays` - ``overlays.png``, ground truth next to each route's masks;
* :mod:`~llavaseg.bench.charts` / :mod:`~llavaseg.bench.page` - the IoU histogram and bar charts, ``report.html``;
* :mod:`~llavaseg.bench.outputs` - every file of a results folder, written alike for routes and predictions;
* :mod:`~llavaseg.bench.predictions` / :mod:`~llavaseg.bench.score` - ``llavaseg-bench score``: predictions made
  by any system (mask PNGs or JSONL), matched to a data set's queries and scored like a route.
"""

from llavaseg.bench.dialogue import (
    DialogueMetrics,
    exact_match,
    normalize_answer,
    token_f1,
)
from llavaseg.bench.report import BenchResults, RouteSummary
from llavaseg.bench.runner import BenchSettings, run_benchmark

__all__ = [
    "BenchSettings",
    "run_benchmark",
    "BenchResults",
    "RouteSummary",
    "DialogueMetrics",
    "normalize_answer",
    "exact_match",
    "token_f1",
]
