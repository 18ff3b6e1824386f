"""``llavaseg-bench score``: the shared evaluator on predictions made by any system.

Each prediction set (:mod:`llavaseg.bench.predictions`) becomes a "route" named after it: its queries are
scored with the same records, metrics, intervals, paired comparisons, tables and pictures as a route run
(:mod:`~llavaseg.bench.summaries`, :mod:`~llavaseg.bench.outputs`), so a number printed here means what it
means in ``llavaseg-bench reasonseg``. Nothing is resumed: scoring is cheap, and a folder always describes
the prediction files as they are now. ``run.json`` still keeps a results folder to one data set, split and
list of prediction sets.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from llavaseg.bench.config import RunConfig, check_run_config, write_run_config
from llavaseg.bench.jsonl import write_atomic
from llavaseg.bench.outputs import write_outputs
from llavaseg.bench.predictions import PredictionSet, load_prediction, read_predictions
from llavaseg.bench.records import BenchRecord, record_from_error, record_from_result
from llavaseg.bench.report import BenchResults, Environment, RouteSummary
from llavaseg.bench.scoring import one_line, route_file
from llavaseg.bench.summaries import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_PERMUTATIONS,
    Statistics,
    compare_routes,
    route_metrics,
)
from llavaseg.errors import InputError, LlavasegError
from llavaseg.provenance import package_versions
from llavaseg.results import SegmentationResult

__all__ = ["ScoreSettings", "run_score", "score_set"]

MISSING_NOTICE = "no prediction: scored as an empty mask"


@dataclass
class ScoreSettings:
    """What ``llavaseg-bench score`` was asked: the data (kind, path, split label), the prediction sets
    (name -> path) and how to compute the numbers."""

    kind: str
    data: str
    split: str
    predictions: dict[str, Path]
    out_dir: Path
    first_text_only: bool = False
    lisa_compat: bool = False
    bootstrap: int = DEFAULT_BOOTSTRAP
    permutations: int = DEFAULT_PERMUTATIONS
    seed: int = 0
    overlay_rows: int = 6
    extra: dict[str, str] = field(default_factory=dict)

    def statistics(self) -> Statistics:
        return Statistics(lisa_compat=self.lisa_compat, bootstrap=self.bootstrap, permutations=self.permutations,
                          seed=self.seed)


def _score_query(name: str, query, prediction) -> tuple[BenchRecord, str | None]:
    """One query's record, and the reason if its prediction was unreadable."""
    try:
        gt = query.load_mask()
    except LlavasegError as exc:
        return record_from_error(name, query, None, f"ground truth unreadable ({one_line(exc)})", 0.0), None
    loaded = load_prediction(prediction, gt.shape)
    if loaded.error is not None:
        record = record_from_error(name, query, gt, loaded.error, 0.0)
        return record, loaded.error if loaded.unreadable else None
    result = SegmentationResult(route=name, query=query.text, mask=loaded.mask, score=0.0,
                                instance_masks=loaded.instances)
    record = record_from_result(name, query, gt, result, 0.0).model_copy(update={"score": None})
    if prediction is None:
        record = record.model_copy(update={"notices": [MISSING_NOTICE]})
    return record, None


def score_set(predictions: PredictionSet, queries: list) -> tuple[list[BenchRecord], dict[str, str]]:
    """Score every selected query of one prediction set; returns the records (data-set order) and the
    unreadable predictions (query id -> why)."""
    by_id = {q.query_id: q for q in queries}
    records, unreadable = [], {}
    for query_id in tqdm(predictions.selected, desc=predictions.name, unit="q", file=sys.stderr):
        record, problem = _score_query(predictions.name, by_id[query_id], predictions.matched.get(query_id))
        records.append(record)
        if problem is not None:
            unreadable[query_id] = problem
    return records, unreadable


def _open(settings: ScoreSettings) -> None:
    """Refuse a results folder that holds another run (a route run, other data or other prediction sets)."""
    config = RunConfig(benchmark="score", preset="", data=settings.data, split=settings.split,
                       routes=list(settings.predictions), prompts="", first_text_only=settings.first_text_only,
                       extra={**settings.extra, "kind": settings.kind,
                              **{f"pred:{k}": str(Path(v).resolve()) for k, v in settings.predictions.items()}})
    check_run_config(settings.out_dir, config)
    write_run_config(settings.out_dir, config)


def _environment(settings: ScoreSettings) -> Environment:
    return Environment(
        benchmark="score", preset="", data=settings.data, split=settings.split, device="cpu",
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=package_versions(),
        first_text_only=settings.first_text_only, extra={**settings.extra, "kind": settings.kind},
        protocol="lisa" if settings.lisa_compat else "default", bootstrap=settings.bootstrap,
        permutations=settings.permutations, seed=settings.seed)


def run_score(settings: ScoreSettings, queries: list, *, groups: dict[str, str] | None = None) -> BenchResults:
    """Score every prediction set on ``queries`` and write the results folder; return the results.

    ``groups`` maps query ids to metric groups (refer splits), as for :func:`~llavaseg.bench.runner.run_benchmark`.
    """
    if not queries:
        raise InputError("the data set has no query")
    if not settings.predictions:
        raise InputError("no prediction set given (--pred)")
    sets = {name: read_predictions(name, path, queries, first_text_only=settings.first_text_only)
            for name, path in settings.predictions.items()}  # every set is checked before anything is written
    out = Path(settings.out_dir)
    _open(settings)
    per_route, sources, summaries = {}, {}, {}
    stats = settings.statistics()
    for name, prediction_set in sets.items():
        records, unreadable = score_set(prediction_set, queries)
        write_atomic(route_file(out, "queries", name), "".join(r.model_dump_json() + "\n" for r in records))
        per_route[name] = records
        sources[name] = prediction_set.source.model_copy(update={"unreadable": unreadable})
        summaries[name] = RouteSummary(
            route=name, summary=f"predictions from {prediction_set.source.path}",
            metrics=route_metrics(records, groups, stats), n_queries=len(records),
            n_errors=sum(r.error is not None for r in records))
    results = BenchResults(environment=_environment(settings), routes=summaries,
                           comparisons=compare_routes(per_route, stats), predictions=sources)
    write_outputs(out, results, per_route, queries, settings.overlay_rows)
    return results
