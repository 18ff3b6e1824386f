"""Generic JSONL dataset: masks from PNG files or polygons, clear per-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.data.base import SegQuery
from llavaseg.data.jsonl import JsonlDataset, read_mask_image
from llavaseg.errors import DatasetFormatError
from llavaseg.evaluate import MetricAccumulator


def _setup(tmp_path: Path, lines: list[dict | str]) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    Image.new("RGB", (6, 4), (5, 5, 5)).save(tmp_path / "imgs" / "a.png")
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :3] = 7      # any nonzero value is target: 3 px
    mask[3, 5] = 255     # target, or ignore if ignore_value=255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return path


MASK_LINE = {"image": "imgs/a.png", "query": "the top strip", "mask": "masks/a.png"}
POLY_LINE = {"image": "imgs/a.png", "query": "why would one sit here?", "is_sentence": True, "id": "poly",
             "polygons": [[[1, 1], [3, 1], [3, 2], [1, 2]]]}


def test_mask_and_polygon_lines(tmp_path):
    ds = JsonlDataset(_setup(tmp_path, [MASK_LINE, "", POLY_LINE]))
    assert len(ds) == 2
    q_mask, q_poly = ds.queries()
    assert isinstance(q_mask, SegQuery)
    assert (q_mask.query_id, q_mask.text, q_mask.is_sentence) == ("data:1", "the top strip", False)
    assert (q_poly.query_id, q_poly.is_sentence, q_poly.line) == ("poly", True, 3)
    assert (q_mask.sample_id, q_mask.text_index, q_poly.text_index) == ("imgs/a.png", 0, 1)
    m = q_mask.load_mask()
    assert m.dtype == np.uint8 and m.max() == 1 and int(m.sum()) == 4  # 3 px of 7 + 1 px of 255
    p = q_poly.load_mask()
    expected = np.zeros((4, 6), np.uint8)
    expected[1:3, 1:4] = 1  # cv2 fill includes the boundary: rows 1-2, cols 1-3
    np.testing.assert_array_equal(p, expected)
    assert q_poly.load_image().shape == (4, 6, 3)


def test_ignore_value_maps_to_255(tmp_path):
    q = next(JsonlDataset(_setup(tmp_path, [MASK_LINE]), ignore_value=255).queries())
    m = q.load_mask()
    assert int((m == 1).sum()) == 3 and m[3, 5] == 255
    acc = MetricAccumulator()
    pred = np.zeros((4, 6), bool)
    pred[3, 5] = True   # only on the ignored pixel: dropped
    pred[0, 0] = True
    acc.add_masks(pred, m, query_id=q.query_id, is_sentence=False)
    assert acc.records[0].intersection == 1 and acc.records[0].union == 3


def test_labelme_shapes_allowed_in_polygons(tmp_path):
    line = dict(POLY_LINE, polygons=[{"label": "target", "points": [[0, 0], [5, 0], [5, 3], [0, 3]]},
                                     {"label": "ignore", "points": [[2, 1], [3, 1], [3, 2], [2, 2]]}])
    m = next(JsonlDataset(_setup(tmp_path, [line])).queries()).load_mask()
    assert int((m == 255).sum()) == 4 and int((m == 1).sum()) == 24 - 4


def test_rgb_mask_any_channel_counts(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (0, 0, 1)  # luminance conversion would round this to 0
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert read_mask_image(tmp_path / "m.png").tolist() == [[1, 0], [0, 0]]


def test_mask_size_mismatch_is_reported(tmp_path):
    path = _setup(tmp_path, [MASK_LINE])
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetFormatError, match=r"line 1: mask a.png is 3x3 but image a.png is 6x4"):
        next(JsonlDataset(path).queries()).load_mask()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "line 1: invalid JSON"),
        ({"image": "imgs/a.png", "mask": "masks/a.png"}, "missing key 'query'"),
        ({"image": "imgs/a.png", "query": "x"}, "exactly one of 'mask' or 'polygons'"),
        (dict(MASK_LINE, polygons=[[[0, 0]]]), "exactly one"),
        (dict(MASK_LINE, image="imgs/missing.jpg"), "image file not found"),
        (dict(MASK_LINE, mask="masks/missing.png"), "mask file not found"),
        (dict(MASK_LINE, query="  "), "non-empty string"),
        (dict(MASK_LINE, is_sentence="yes"), "is_sentence"),
        (dict(POLY_LINE, polygons=[[[0, "a"]]]), "polygons[0]"),
        (dict(POLY_LINE, polygons=[]), "non-empty list"),
        ("[1]", "JSON object"),
    ],
)
def test_bad_lines(tmp_path, line, fragment):
    with pytest.raises(DatasetFormatError) as info:
        JsonlDataset(_setup(tmp_path, [line]))
    msg = str(info.value)
    assert fragment in msg and "data.jsonl line 1" in msg and "\n" not in msg


def test_duplicate_ids_missing_and_empty_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="line 2: duplicate id 'poly'"):
        JsonlDataset(_setup(tmp_path, [POLY_LINE, POLY_LINE]))
    with pytest.raises(DatasetFormatError, match="not found"):
        JsonlDataset(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetFormatError, match="no queries"):
        JsonlDataset(tmp_path / "empty.jsonl")


def test_absolute_paths_are_kept(tmp_path):
    _setup(tmp_path, [MASK_LINE])
    other = tmp_path / "sub"
    other.mkdir()
    line = dict(MASK_LINE, image=str(tmp_path / "imgs" / "a.png"), mask=str(tmp_path / "masks" / "a.png"))
    (other / "d.jsonl").write_text(json.dumps(line))
    q = next(JsonlDataset(other / "d.jsonl").queries())
    assert q.image_path == tmp_path / "imgs" / "a.png" and q.query_id == "d:1"
