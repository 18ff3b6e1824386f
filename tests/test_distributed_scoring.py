"""``run_route`` across ranks, with two threads standing in for two processes: a rank that reads the store late
must see what the others saw (CI once failed with a KeyError on rank 1: a faster rank had already appended to
the store before it read what was pending, or merged the rank files away before it read them)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from llavaseg.bench import scoring
from llavaseg.data.reasonseg import ReasonSegDataset, write_reasonseg_sample
from llavaseg.distributed import World
from llavaseg.results import SegmentationResult


class EmptyMaskRoute:
    """TEST DOUBLE route: an empty mask for every query (scoring is what is under test, not segmentation)."""

    name = "empty"

    def __call__(self, images, queries):
        return [SegmentationResult(route=self.name, query=q, mask=np.zeros(i.shape[:2], bool)) for i, q in
                zip(images, queries)]


@pytest.fixture()
def queries(tmp_path, two_square_scene):
    square = [[36, 20], [56, 20], [56, 40], [36, 40]]
    for index in range(4):
        write_reasonseg_sample(tmp_path / "data" / "val", f"img{index}", Image.fromarray(two_square_scene(index)),
                               [f"the square {index}"], False, [{"label": "target", "points": square}],
                               image_format="png")
    return list(ReasonSegDataset(tmp_path / "data", "val").queries())


def test_a_slow_rank_still_reads_every_ranks_records(queries, tmp_path, monkeypatch) -> None:
    meeting = threading.Barrier(2)
    monkeypatch.setattr(scoring, "barrier", lambda place: meeting.wait(timeout=30))
    store = tmp_path / "out" / "queries-empty.jsonl"
    stored, read_lines, calls = scoring._stored, scoring.read_jsonl, {"rank0": 0, "rank1": 0}

    def rank_1_reads_late(path):
        """At the start rank 1 reads the store late (rank 0 may already be appending to it)."""
        me = threading.current_thread().name
        calls[me] += 1
        if me == "rank1" and calls[me] == 1:
            time.sleep(0.5)
        return stored(path)

    def rank_1_stalls(path, model):
        """At the end rank 1 stalls between the merged file and the rank files (rank 0 may merge them away)."""
        lines = read_lines(path, model)
        if threading.current_thread().name == "rank1" and path == store and calls["rank1"] == 2:
            time.sleep(0.5)
        return lines

    monkeypatch.setattr(scoring, "_stored", rank_1_reads_late)
    monkeypatch.setattr(scoring, "read_jsonl", rank_1_stalls)
    store.parent.mkdir()
    out: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            out[r] = scoring.run_route("empty", EmptyMaskRoute(), queries, store, 1, World(rank=r, size=2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            out[r] = exc

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for r in (0, 1):
        assert not isinstance(out[r], BaseException), f"rank {r}: {out[r]!r}"
        records, resumed = out[r]
        assert [record.query_id for record in records] == [q.query_id for q in queries] and resumed == 0
    assert not list(store.parent.glob("*.rank*.jsonl")) and len(store.read_text().splitlines()) == len(queries)
