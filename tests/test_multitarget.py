"""Several targets or none (gRefCOCO-style): data loaders, the result type, N-acc / T-acc, by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.bench.records import BenchRecord
from llavaseg.cli.bench import main
from llavaseg.data.jsonl import JsonlDataset
from llavaseg.data.refcoco import RefCocoDataset
from llavaseg.errors import DatasetFormatError
from llavaseg.evaluate import QueryRecord, summarize
from llavaseg.results import SegmentationResult, encode_mask

H, W = 20, 30


def _box(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _area(mask: np.ndarray) -> int:
    return int((mask == 1).sum())


@pytest.fixture(scope="module")
def grefcoco(tmp_path_factory) -> Path:
    """gRefCOCO layout: grefcoco/grefs(unc).json with a two-target ref, a no-target ref and a one-target ref."""
    root = tmp_path_factory.mktemp("gref")
    refs = [
        {"ref_id": 1, "ann_id": [11, 12], "image_id": 1, "category_id": [1, 1], "split": "val", "no_target": False,
         "sentences": [{"sent": "both boxes", "sent_id": 10}]},
        {"ref_id": 2, "ann_id": [-1], "image_id": 1, "category_id": [], "split": "val", "no_target": True,
         "sentences": [{"sent": "the dog", "sent_id": 20}]},
        {"ref_id": 3, "ann_id": [13], "image_id": 2, "category_id": [1], "split": "val", "no_target": False,
         "sentences": [{"sent": "the box", "sent_id": 30}]},
    ]
    instances = {"images": [{"id": i, "file_name": f"img{i}.jpg", "height": H, "width": W} for i in (1, 2)],
                 "annotations": [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": [_box(0, 0, 4, 4)]},
                                 {"id": 12, "image_id": 1, "category_id": 1, "segmentation": [_box(10, 10, 14, 14)]},
                                 {"id": 13, "image_id": 2, "category_id": 1, "segmentation": [_box(0, 0, 9, 9)]}],
                 "categories": [{"id": 1, "name": "box"}]}
    (root / "grefcoco").mkdir()
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    for i in (1, 2):
        Image.fromarray(np.full((H, W, 3), 100 * i, np.uint8)).save(images / f"img{i}.jpg")
    return root


def test_grefcoco_refs_with_several_targets_or_none(grefcoco):
    queries = list(RefCocoDataset(grefcoco, "grefcoco", "unc", "val").queries())
    assert [(q.query_id, q.n_targets) for q in queries] == [
        ("grefcoco_unc_val/1#10", 2), ("grefcoco_unc_val/2#20", 0), ("grefcoco_unc_val/3#30", 1)]
    both, none, one = (q.load_mask() for q in queries)
    # pycocotools fills a box with corners 0..4 as 4 x 4 pixels: two such boxes, united
    assert _area(both) == 2 * 16 and both[0, 0] == 1 and both[12, 12] == 1 and _area(one) == 9 * 9
    assert _area(none) == 0 and none.shape == (H, W)


def test_no_target_metrics_on_grefcoco_by_hand(grefcoco, tmp_path):
    queries = list(RefCocoDataset(grefcoco, "grefcoco", "unc", "val").queries())
    both, _, one = (q.load_mask().astype(bool) for q in queries)
    first = np.zeros((H, W), bool)
    first[:5, :5] = both[:5, :5]  # one instance of the two-target ref
    lines = [{"query_id": queries[0].query_id, "rle": [encode_mask(first), encode_mask(both & ~first)]},  # both
             {"query_id": queries[1].query_id, "rle": encode_mask(one)},  # a false positive on "the dog"
             {"query_id": queries[2].query_id, "rle": None}]             # nothing found for a real target
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert main(["score", "--data", str(grefcoco), "--dataset", "grefcoco", "--pred", str(path), "--out", str(out),
                 "--bootstrap", "0"]) == 0
    metrics = json.loads((out / "results.json").read_text())["routes"]["p"]["metrics"]["val"]
    a, b = _area(both), _area(one)
    # gIoU: exact (a / (a + 1e-5)), false positive on an empty target (0), empty on a target (0)
    assert metrics["giou"] == pytest.approx(a / (a + 1e-5) / 3, abs=1e-12)
    assert metrics["ciou"] == pytest.approx(a / (a + b + b), abs=1e-12)  # the false positive adds its area
    # N-acc: the one no-target query got a mask -> 0/1; T-acc: targets answered non-empty 1 of 2
    assert (metrics["n_no_target"], metrics["n_acc"], metrics["t_acc"]) == (1, 0.0, 0.5)
    records = [BenchRecord.model_validate_json(x) for x in (out / "queries-p.jsonl").read_text().splitlines()]
    assert [r.n_targets for r in records] == [2, 0, 1] and [r.gt_area for r in records] == [a, 0, b]
    assert len(records[0].instance_masks) == 2 and records[1].instance_masks is None


def test_jsonl_data_with_instance_masks_and_no_target(tmp_path):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "im.png")
    left, right = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    left[:, :5], right[:, -5:] = 255, 255
    right[0, 0] = 128  # ignore value in the second instance where the first has a target: target wins
    Image.fromarray(left).save(tmp_path / "l.png")
    Image.fromarray(right).save(tmp_path / "r.png")
    rows = [{"image": "im.png", "query": "both sides", "mask": ["l.png", "r.png"]},
            {"image": "im.png", "query": "the cat", "no_target": True},
            {"image": "im.png", "query": "left", "mask": "l.png"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    queries = list(JsonlDataset(tmp_path / "d.jsonl", ignore_value=128).queries())
    assert [q.n_targets for q in queries] == [2, 0, None]
    both = queries[0].load_mask()
    assert _area(both) == 2 * 5 * H and both[0, 0] == 1
    assert _area(queries[1].load_mask()) == 0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "im.png", "query": "x", "no_target": True,
                                                    "mask": "l.png"}) + "\n")
    with pytest.raises(DatasetFormatError, match="exactly one of 'mask' or 'polygons'"):
        JsonlDataset(tmp_path / "bad.jsonl")


def test_no_target_rates_in_the_evaluator_by_hand():
    records = [QueryRecord(query_id="nt-ok", intersection=0, union=0, gt_area=0),          # empty, answered empty
               QueryRecord(query_id="nt-fp", intersection=0, union=7, gt_area=0),          # empty, a false positive
               QueryRecord(query_id="nt-err", intersection=0, union=0, iou=0.0, gt_area=0, error="crash"),
               QueryRecord(query_id="t-hit", intersection=5, union=9, gt_area=6),          # found (pred area 8)
               QueryRecord(query_id="t-miss", intersection=0, union=6, gt_area=6)]         # empty on a target
    m = summarize(records)["overall"]
    # a failure is never rewarded: it counts as a wrong answer for N-acc too
    assert (m.n_no_target, m.n_acc, m.t_acc) == (3, pytest.approx(1 / 3), 0.5)
    assert m.giou == pytest.approx((1 + 0 + 0 + 5 / (9 + 1e-5) + 0) / 5)
    assert summarize(records[3:])["overall"].n_acc is None  # no no-target query: like gRefCOCO, not reported
    with pytest.raises(ValueError, match="ground-truth area"):
        QueryRecord(query_id="x", intersection=5, union=9, gt_area=3)


def test_segmentation_result_holds_instance_masks():
    a, b = np.zeros((4, 5), bool), np.zeros((4, 5), bool)
    a[0, 0], b[3, 4] = True, True
    result = SegmentationResult(route="r", query="q", score=0.5, instance_masks=[a, b])
    assert result.mask.sum() == 2 and result.mask[0, 0] and result.mask[3, 4]  # the union, when mask is left out
    again = SegmentationResult.model_validate_json(result.model_dump_json())
    assert np.array_equal(again.mask, result.mask) and [m.sum() for m in again.instance_masks] == [1, 1]
    plain = SegmentationResult(route="r", query="q", score=0.5, mask=a)  # existing users: unchanged
    assert plain.instance_masks is None and "instance_masks" in plain.model_dump()
    with pytest.raises(ValueError, match="instance mask 0"):
        SegmentationResult(route="r", query="q", score=0.5, mask=a, instance_masks=[np.zeros((2, 2), bool)])


def test_refer_predictions_as_pngs_are_named_by_position_in_the_image(grefcoco, tmp_path):
    queries = list(RefCocoDataset(grefcoco, "grefcoco", "unc", "val").queries())
    folder = tmp_path / "pngs"
    folder.mkdir()
    # image 1 holds refs 1 and 2 (positions 0 and 1), image 2 holds ref 3 (position 0)
    for stem, query in (("img1_0", queries[0]), ("img1_1", queries[1]), ("img2_0", queries[2])):
        Image.fromarray(query.load_mask() * 255).save(folder / f"{stem}.png")
    out = tmp_path / "out"
    assert main(["score", "--data", str(grefcoco), "--dataset", "grefcoco", "--pred", str(folder), "--out", str(out),
                 "--bootstrap", "0", "--lisa-compat"]) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = results["routes"]["pngs"]["metrics"]["val"]
    # refer data under --lisa-compat: every sentence (as LISA's refer validation), LISA's divisor, perfect masks
    assert metrics["protocol"] == "lisa" and metrics["n_queries"] == 3 and results["predictions"]["pngs"]["missing"] == []
    a, b = _area(queries[0].load_mask()), _area(queries[2].load_mask())
    assert metrics["giou"] == pytest.approx((a / (a + 1e-5) + 1 + b / (b + 1e-5)) / (3 + 1e-5), abs=2e-7)
    assert (metrics["n_acc"], metrics["t_acc"]) == (1.0, 1.0)
