"""The per-route query loop: batched by image, scored by the shared evaluator, appended as it goes, resumable.

The selected queries not yet in ``queries-<route>.jsonl`` are grouped by image (queries on the same image go
into the same batch and share one decoded image array, so SAM's feature cache and the MLLM's image work are
reused), packed into batches of ``batch_size``, passed to the route, scored, and appended to the JSONL file as
each batch finishes. A batch that raises is retried query by query, so one bad sample costs one error record
(scored as the evaluator's rule says) instead of the run; an image or ground truth that cannot be read is such a
failure too.

Every record carries its *input key* (digest of image pixels, ground-truth mask and text): on resume a
stored record is reused only when its query still has the same key, so an edited polygon, a replaced image
or a changed text is scored again instead of reporting the old number. (Route, prompts and models are
fixed per results folder by its ``run.json``.)
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llavaseg.bench.jsonl import append_jsonl, read_jsonl, write_atomic
from llavaseg.bench.records import BenchRecord, record_from_error, record_from_result
from llavaseg.distributed import World, barrier
from llavaseg.errors import InputError, LlavasegError
from llavaseg.images import check_query, image_digest, limit_query

__all__ = ["route_file", "make_batches", "score_batch", "run_route", "one_line", "input_key"]

logger = logging.getLogger(__name__)


def input_key(image: np.ndarray | BaseException, gt: np.ndarray | BaseException, text: str) -> str:
    """Digest of what a query's score depends on in the data: image pixels, ground-truth mask, text.
    An unreadable part gets a key of its own that never matches, so the query is always retried."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (image, gt):
        if isinstance(part, BaseException):
            return f"unreadable:{one_line(part)}"
    digest.update(image_digest(image).encode())
    digest.update(str(gt.shape).encode())
    digest.update(np.ascontiguousarray(gt, dtype=np.uint8).tobytes())
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _load(load) -> np.ndarray | BaseException:
    try:
        return load()
    except LlavasegError as exc:  # an unreadable image or mask fails its queries, not the run
        return exc


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
        if str(query.sample_id) not in images:
            images[str(query.sample_id)] = _load(query.load_image)
    loaded = [_load(query.load_mask) for query in batch]
    keys = [input_key(images[str(q.sample_id)], gt, q.text) for q, gt in zip(batch, loaded, strict=True)]
    gts = [None if isinstance(gt, BaseException) else gt for gt in loaded]
    records: dict[int, BenchRecord] = {}
    runnable: list[int] = []
    texts: dict[int, str] = {}
    cuts: dict[int, str] = {}
    for index, query in enumerate(batch):
        image = images[str(query.sample_id)]
        try:
            if isinstance(image, BaseException):
                raise image
            if isinstance(loaded[index], BaseException):
                raise InputError(f"ground truth unreadable ({one_line(loaded[index])})")
            texts[index], cut = limit_query(check_query(query.text))
            if cut is not None:
                cuts[index] = cut
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
    return [records[i].model_copy(update={"input_key": keys[i], "notices": [cuts[i]] if i in cuts else []})
            for i in range(len(batch))]


def _still_valid(done: dict[str, BenchRecord], queries: list) -> list:
    """The queries whose stored record no longer matches their data (and must be scored again)."""
    images: dict[str, np.ndarray | BaseException] = {}
    changed = []
    for query in queries:
        record = done.get(query.query_id)
        if record is None:
            continue
        if str(query.sample_id) not in images:
            images = {str(query.sample_id): _load(query.load_image)}  # queries come grouped by image
        if record.input_key != input_key(images[str(query.sample_id)], _load(query.load_mask), query.text):
            changed.append(query)
    return changed


def _rank_file(store: Path, rank: int) -> Path:
    return store.with_name(f"{store.stem}.rank{rank}{store.suffix}")


def _stored(store: Path) -> dict[str, BenchRecord]:
    """Every stored record of a route: the merged file, then any rank files a distributed run left."""
    done: dict[str, BenchRecord] = {}
    for path in [store, *sorted(store.parent.glob(f"{store.stem}.rank*{store.suffix}"))]:
        done.update({record.query_id: record for record in read_jsonl(path, BenchRecord)})  # the last line wins
    return done


def run_route(name: str, route, queries: list, store: Path, batch_size: int, place: World = World()
              ) -> tuple[list[BenchRecord], int]:
    """Score every query of ``queries`` with ``route``, reusing ``store``; returns (records, n_resumed).

    Distributed (``torchrun``): the pending queries are packed into the batches one process would make, and
    rank ``r`` scores every ``size``-th batch from ``r`` into its own ``<store>.rank<r>.jsonl`` (so each batch is
    computed exactly as in one process); rank 0 then merges them into ``store``. A killed run resumes from the
    merged file and whatever rank files survived.
    """
    done = _stored(store)
    changed = _still_valid(done, queries)
    if changed:
        logger.warning("%s: %d stored queries changed since they were scored (image, ground truth or text); "
                       "scoring them again", store.name, len(changed))
        for query in changed:
            del done[query.query_id]
    resumed = sum(query.query_id in done for query in queries)
    pending = [query for query in queries if query.query_id not in done]
    barrier(place)  # every rank has read the store before any appends to it: all agree on what is pending
    mine = make_batches(pending, batch_size)[place.rank:: place.size] if pending else []
    target = _rank_file(store, place.rank) if place.distributed else store
    with tqdm(total=sum(len(batch) for batch in mine), desc=name, unit="q", file=sys.stderr,
              disable=not place.is_main) as bar:
        for batch in mine:
            records = score_batch(name, route, batch)
            append_jsonl(target, records)
            done.update({record.query_id: record for record in records})
            bar.update(len(batch))
    if place.distributed:
        barrier(place)  # every rank's records are on disk
        done = _stored(store)
        barrier(place)  # every rank has read them: only now may rank 0 merge the rank files away
        if place.is_main:  # one merged file, in query order; the rank files are then redundant
            merged = [done[query.query_id] for query in queries if query.query_id in done]
            write_atomic(store, "".join(record.model_dump_json() + "\n" for record in merged))
            for rank in range(place.size):
                _rank_file(store, rank).unlink(missing_ok=True)
        barrier(place)
    return [done[query.query_id] for query in queries], resumed
