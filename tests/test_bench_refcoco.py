"""``llavaseg-bench refcoco`` on a generated 2-image refer-layout dataset (``tiny`` preset: plumbing only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.bench.records import BenchRecord
from llavaseg.cli.bench import main

H, W = 40, 48


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_tiny_models):
    """Every benchmark test here runs on the fast tiny models (see conftest)."""


def _rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory) -> Path:
    """refer layout: refcoco/refs(unc).json + instances.json, images under images/mscoco/images/train2014."""
    root = tmp_path_factory.mktemp("refer")
    refs = [
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "category_id": 1, "split": "val",
         "sentences": [{"sent": "Left Box", "sent_id": 100}, {"sent": "the box on the left", "sent_id": 101}]},
        {"ref_id": 2, "ann_id": 12, "image_id": 2, "category_id": 1, "split": "val",
         "sentences": [{"sent": "right box", "sent_id": 200}]},
        {"ref_id": 3, "ann_id": 13, "image_id": 2, "category_id": 1, "split": "testA",
         "sentences": [{"sent": "the person", "sent_id": 300}]},
        {"ref_id": 4, "ann_id": 14, "image_id": 1, "category_id": 1, "split": "train",
         "sentences": [{"sent": "unused", "sent_id": 400}]},
    ]
    instances = {
        "images": [{"id": i, "file_name": f"COCO_train2014_00000000000{i}.jpg", "height": H, "width": W}
                   for i in (1, 2)],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [_rect(2, 2, 20, 30)]},
            {"id": 12, "image_id": 2, "category_id": 1, "segmentation": [_rect(24, 4, 46, 36)]},
            {"id": 13, "image_id": 2, "category_id": 1, "segmentation": [_rect(4, 4, 14, 14)]},
            {"id": 14, "image_id": 1, "category_id": 1, "segmentation": [_rect(0, 0, 5, 5)]},
        ],
        "categories": [{"id": 1, "name": "box"}],
    }
    (root / "refcoco").mkdir()
    (root / "refcoco" / "refs(unc).json").write_text(json.dumps(refs))
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in (1, 2):
        pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"COCO_train2014_00000000000{i}.jpg")
    return root


def test_refcoco_per_split_metrics(refer_root, tmp_path):
    out = tmp_path / "run"
    argv = ["refcoco", "--data", str(refer_root), "--dataset", "refcoco", "--split-by", "unc", "--split", "val,testA",
            "--preset", "tiny", "--routes", "llavaseg,llavaseg-noattr", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["benchmark"] == "refcoco" and results["environment"]["split"] == "val,testA"
    assert results["environment"]["extra"]["dataset"] == "refcoco" and results["base_dialogue"] is None
    for name in ("llavaseg", "llavaseg-noattr"):
        summary = results["routes"][name]
        assert list(summary["metrics"]) == ["val", "testA"]
        assert summary["metrics"]["val"]["n_queries"] == 3 and summary["metrics"]["testA"]["n_queries"] == 1
        records = [BenchRecord.model_validate_json(x) for x in (out / f"queries-{name}.jsonl").read_text().splitlines()]
        assert [r.query_id for r in records] == ["refcoco_unc_val/1#100", "refcoco_unc_val/1#101",
                                                 "refcoco_unc_val/2#200", "refcoco_unc_testA/3#300"]
        assert records[1].text == "the box on the left" and records[0].text == "left box"  # LISA lower-cases
        val = records[:3]
        for record, area in zip(records, (18 * 28, 18 * 28, 22 * 32, 10 * 10)):  # the rectangles' pixel areas
            assert record.intersection <= area <= record.union
        expected_ciou = sum(r.intersection for r in val) / sum(r.union for r in val)
        assert summary["metrics"]["val"]["ciou"] == pytest.approx(expected_ciou)
        assert summary["metrics"]["val"]["giou"] == pytest.approx(np.mean([r.iou for r in val]))
        for split in summary["metrics"].values():
            assert 0.0 <= split["giou"] <= 1.0 and 0.0 <= split["ciou"] <= 1.0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["route"] for r in rows] == ["llavaseg", "llavaseg-noattr"] and "testA_ciou" in rows[0]
    with Image.open(out / "overlays.png") as grid:
        assert grid.size[0] == 3 * 160  # ground truth + 2 routes
    assert main(argv) == 0  # resumed: nothing left to run, same numbers
    again = json.loads((out / "results.json").read_text())
    assert again["routes"]["llavaseg"]["metrics"] == results["routes"]["llavaseg"]["metrics"]
    assert again["routes"]["llavaseg"]["n_resumed"] == 4


def test_refcoco_errors_are_one_line(refer_root, tmp_path, capsys):
    base = ["refcoco", "--data", str(refer_root), "--preset", "tiny", "--out", str(tmp_path / "o")]
    assert main([*base, "--split", "testB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no refs in split 'testB'" in err[0]
    assert main([*base, "--dataset", "refcocog", "--split", "val"]) == 2
    assert "refcocog folder not found" in capsys.readouterr().err
