"""The per-route query loop: batched by image, scored by the shared evaluator, appended as it goes, resumable.

The selected queries not yet in ``queries-<route>.jsonl`` are grouped by image (queries on the same image go
into the same batch and share one decoded image array, so SAM's feature cache and the MLLM's image work are
reused), packed into batches of ``batch_size``, passed to the route, scored, and appended to the JSONL file as
each batch finishes. A batch that raises is retried query by query, so one bad sample costs one error record
(scored as the evaluator's rule says) instead of the run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llavaseg.bench.jsonl import append_jsonl, read_jsonl
from llavaseg.bench.records import BenchRecord, record_from_error, record_from_result
from llavaseg.errors import InputError, LlavasegError
from llavaseg.images import check_query

__all__ = ["route_file", "make_batches", "score_batch", "run_route", "one_line"]


def route_file(out_dir: Path, prefix: str, route: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in route)
    return Path(out_dir) / f"{prefix}-{safe}.jsonl"


def make_batches(queries: list, batch_size: int) -> list[list]:
    """Group queries by ``sample_id`` (first-appearance order) and pack whole groups into batches.

    A group larger than ``batch_size`` is split into full chunks; otherwise a group never straddles two
    batches, so an image's work is shared by all its queries.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    groups: dict[str, list] = {}
    for query in queries:
        groups.setdefault(str(query.sample_id), []).append(query)
    batches: list[list] = []
    current: list = []
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start: start + batch_size]
            if current and len(current) + len(chunk) > batch_size:
                batches.append(current)
                current = []
            current = current + chunk
    if current:
        batches.append(current)
    return batches


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def score_batch(name: str, route, batch: list) -> list[BenchRecord]:
    """Run ``route`` on one batch and score it; failures become error records, one per failing query."""
    images: dict[str, np.ndarray | BaseException] = {}
    for query in batch:
        key = str(query.sample_id)
        if key not in images:
            try:
                images[key] = query.load_image()
            except LlavasegError as exc:  # an unreadable image fails its queries, not the run
                images[key] = exc
    gts = [query.load_mask() for query in batch]
    records: dict[int, BenchRecord] = {}
    runnable: list[int] = []
    texts: dict[int, str] = {}
    for index, query in enumerate(batch):
        image = images[str(query.sample_id)]
        try:
            if isinstance(image, BaseException):
                raise image
            texts[index] = check_query(query.text)
            runnable.append(index)
        except LlavasegError as exc:
            records[index] = record_from_error(name, query, gts[index], one_line(exc), 0.0)

    def attempt(indices: list[int]) -> tuple[list | None, str | None, float]:
        start = time.perf_counter()
        try:
            results = list(route([images[str(batch[i].sample_id)] for i in indices], [texts[i] for i in indices]))
            if len(results) != len(indices):
                raise RuntimeError(f"route returned {len(results)} results for {len(indices)} queries")
            return results, None, (time.perf_counter() - start) / len(indices)
        except Exception as exc:  # noqa: BLE001 - recorded per query below; KeyboardInterrupt propagates
            return None, one_line(exc), (time.perf_counter() - start) / len(indices)

    def keep(index: int, result, seconds: float) -> None:
        try:
            records[index] = record_from_result(name, batch[index], gts[index], result, seconds)
        except (LlavasegError, ValueError) as exc:  # e.g. a mask of the wrong size
            records[index] = record_from_error(name, batch[index], gts[index], one_line(exc), seconds)

    if runnable:
        results, error, seconds = attempt(runnable)
        if results is not None:
            for index, result in zip(runnable, results):
                keep(index, result, seconds)
        elif len(runnable) == 1:
            records[runnable[0]] = record_from_error(name, batch[runnable[0]], gts[runnable[0]], error, seconds)
        else:
            for index in runnable:  # isolate the failing query (or queries)
                results, error, seconds = attempt([index])
                if results is not None:
                    keep(index, results[0], seconds)
                else:
                    records[index] = record_from_error(name, batch[index], gts[index], error, seconds)
    return [records[i] for i in range(len(batch))]


def run_route(name: str, route, queries: list, store: Path, batch_size: int) -> tuple[list[BenchRecord], int]:
    """Score every query of ``queries`` with ``route``, reusing ``store``; returns (records, n_resumed)."""
    done = {record.query_id: record for record in read_jsonl(store, BenchRecord)}
    for query in queries:
        if query.query_id in done and done[query.query_id].text != query.text:
            raise InputError(f"{store}: query {query.query_id} was scored with another text "
                             f"({done[query.query_id].text!r}); the data changed, use a new --out")
    resumed = sum(query.query_id in done for query in queries)
    pending = [query for query in queries if query.query_id not in done]
    with tqdm(total=len(pending), desc=name, unit="q", file=sys.stderr) as bar:
        for batch in make_batches(pending, batch_size):
            records = score_batch(name, route, batch)
            append_jsonl(store, records)
            done.update({record.query_id: record for record in records})
            bar.update(len(batch))
    return [done[query.query_id] for query in queries], resumed
