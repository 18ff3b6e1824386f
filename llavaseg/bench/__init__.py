"""The shared benchmark runner behind ``llavaseg-bench``: every route on the same queries, same metrics.

Modules, one job each:

* :mod:`~llavaseg.bench.jsonl` - append-only JSONL stores that survive a killed process (resume);
* :mod:`~llavaseg.bench.config` - ``run.json``: what a results folder was produced with (refuse to mix);
* :mod:`~llavaseg.bench.runner` - the per-route query loop (batched by image, errors recorded, resumable);
* :mod:`~llavaseg.bench.dialogue` - dialogue preservation: route answers vs the base MLLM and references;
* :mod:`~llavaseg.bench.report` - ``results.json`` / ``results.csv`` and the console table;
* :mod:`~llavaseg.bench.overlays` - ``overlays.png``, ground truth next to each route's masks.
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
