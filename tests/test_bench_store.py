"""Benchmark building blocks: crash-tolerant JSONL, run.json identity, batching by image, overlay grid size."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel

from llavaseg.bench.config import RunConfig, check_run_config, write_run_config
from llavaseg.bench.jsonl import TruncatedLineWarning, append_jsonl, read_jsonl
from llavaseg.bench.overlays import (
    CELL,
    HEADER,
    LABEL,
    OverlayRow,
    grid_size,
    write_grid,
)
from llavaseg.bench.runner import check_preset_files
from llavaseg.bench.scoring import make_batches
from llavaseg.errors import InputError
from llavaseg.models.presets import Preset


class Row(BaseModel):
    key: str
    value: int


def test_jsonl_round_trip_and_truncated_last_line(tmp_path):
    path = tmp_path / "q.jsonl"
    append_jsonl(path, [Row(key="a", value=1), Row(key="b", value=2)])
    with path.open("a") as handle:
        handle.write('{"key": "c", "val')  # a kill in the middle of a write
    with pytest.warns(TruncatedLineWarning):
        rows = read_jsonl(path, Row)
    assert [r.key for r in rows] == ["a", "b"]
    assert path.read_text().endswith('"value":2}\n')  # the partial line is gone from disk too
    append_jsonl(path, [Row(key="c", value=3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file reads without warning
        assert [r.key for r in read_jsonl(path, Row)] == ["a", "b", "c"]


def test_garbled_complete_last_line_is_dropped_but_middle_corruption_is_refused(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"key": "a", "value": 1}\n{"key": "b"}\n')  # last line valid JSON, invalid record
    with pytest.warns(TruncatedLineWarning):
        assert [r.key for r in read_jsonl(path, Row)] == ["a"]
    path.write_text('{"key": "a", "value": 1}\nnot json\n{"key": "c", "value": 3}\n')
    with pytest.raises(InputError, match="line 2 is corrupt"):
        read_jsonl(path, Row)
    assert read_jsonl(tmp_path / "missing.jsonl", Row) == []


def _config(**changes) -> RunConfig:
    base = dict(benchmark="reasonseg", preset="tiny", data="/d", split="val", routes=["llavaseg"], prompts="p1",
                first_text_only=False, dialogue=None)
    return RunConfig(**{**base, **changes})


def test_run_config_refuses_a_different_run(tmp_path):
    assert check_run_config(tmp_path, _config()) is None  # new folder
    write_run_config(tmp_path, _config(models="m1"))
    assert check_run_config(tmp_path, _config(models="m1")).models == "m1"
    assert check_run_config(tmp_path, _config(), ignore=("models",)) is not None  # models not known yet
    with pytest.raises(InputError, match=r"first_text_only: False -> True.*new --out"):
        check_run_config(tmp_path, _config(first_text_only=True), ignore=("models",))
    with pytest.raises(InputError, match="models: 'm1' -> 'm2'"):
        check_run_config(tmp_path, _config(models="m2"))
    with pytest.raises(InputError, match="routes"):
        check_run_config(tmp_path, _config(routes=["llavaseg", "seg-token"]))


@dataclass
class _Q:
    query_id: str
    sample_id: str


def test_batches_keep_an_image_s_queries_together():
    qs = [_Q("a#0", "a"), _Q("a#1", "a"), _Q("b#0", "b"), _Q("c#0", "c"), _Q("c#1", "c"), _Q("c#2", "c"),
          _Q("a#2", "a")]  # a late query of image a joins its group
    ids = [[q.query_id for q in b] for b in make_batches(qs, 4)]
    assert ids == [["a#0", "a#1", "a#2", "b#0"], ["c#0", "c#1", "c#2"]]
    ids = [[q.query_id for q in b] for b in make_batches(qs, 2)]
    assert ids == [["a#0", "a#1"], ["a#2", "b#0"], ["c#0", "c#1"], ["c#2"]]  # big groups split in full chunks
    with pytest.raises(InputError):
        make_batches(qs, 0)


def test_overlay_grid_layout(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    gt = np.zeros((20, 40), np.uint8)
    gt[5:10, 5:10] = 1
    gt[0, 0] = 255
    pred = gt == 1
    rows = [OverlayRow(image=image, gt=gt, text="the thing", cells={"r1": (pred, "IoU 1.00"), "r2": (None, "error")})
            for _ in range(3)]
    path = write_grid(tmp_path / "o.png", rows, ["r1", "r2"])
    assert grid_size(3, 3) == (3 * CELL, HEADER + 3 * (CELL + LABEL)) == (480, 18 + 3 * 174)
    with Image.open(path) as im:
        assert im.size == (480, 540) and im.mode == "RGB"
        # the letterboxed 20x40 image is scaled by 4 and centred: the prediction's pixel (7, 7) -> cell (57, 108)
        r1 = np.asarray(im)[HEADER + 40 + 7 * 4 + 2, CELL + 7 * 4 + 2]
        assert r1[0] > 100 and r1[2] > 80  # tinted in r1's magenta


def test_missing_shipped_weights_suggest_the_tiny_preset():
    preset = Preset(name="shipped", description="x", mllm="pkg:weights/tinyworld/definitely-missing",
                    sam="random:tiny", clip="random:tiny-clip")
    with pytest.raises(InputError, match=r"shipped weights missing.*--preset tiny"):
        check_preset_files(preset)
    check_preset_files(Preset(name="tiny", description="x", mllm="random:tiny", sam="random:tiny",
                              clip="random:tiny-clip"))
