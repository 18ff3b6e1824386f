"""refer-layout RefCOCO loader on a tiny hand-made dataset (pickle and JSON refs)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from llavaseg.data.base import SegQuery
from llavaseg.data.refcoco import RefCocoDataset, decode_segmentation
from llavaseg.errors import DatasetFormatError
from llavaseg.evaluate import MetricAccumulator

H, W = 5, 6
RECT = [1, 1, 4, 1, 4, 3, 1, 3]  # x in [1, 4), y in [1, 3) -> rows 1-2, cols 1-3: 6 pixels


def _refs() -> list[dict]:
    return [
        {"ref_id": 7, "ann_id": 100, "image_id": 2, "category_id": 1, "split": "val",
         "sentences": [{"sent": "  Left Dog ", "raw": "Left Dog", "sent_id": 70},
                       {"sent": "the brown one", "raw": "the brown one", "sent_id": 71}]},
        {"ref_id": 3, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "val",
         "sentences": [{"sent": "big thing", "sent_id": 30}]},
        {"ref_id": 4, "ann_id": 102, "image_id": 1, "category_id": 1, "split": "testA",
         "sentences": [{"sent": "a person", "sent_id": 40}]},
        {"ref_id": 5, "ann_id": 103, "image_id": 1, "category_id": 1, "split": "testAB",
         "sentences": [{"sent": "empty", "sent_id": 50}]},
    ]


def _instances() -> dict:
    big = np.zeros((H, W), np.uint8)
    big[:, :4] = 1  # 20 pixels
    rle = mask_utils.encode(np.asfortranarray(big))
    rle["counts"] = rle["counts"].decode()  # JSON stores compressed counts as str
    return {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": H, "width": W}],
        "annotations": [
            {"id": 100, "image_id": 2, "category_id": 1, "segmentation": [RECT]},
            {"id": 101, "image_id": 1, "category_id": 1, "segmentation": rle},
            {"id": 102, "image_id": 1, "category_id": 1, "segmentation": {"size": [H, W], "counts": [6, 3, 21]}},
            {"id": 103, "image_id": 1, "category_id": 1, "segmentation": []},
            {"id": 999, "image_id": 1, "category_id": 1, "segmentation": [RECT]},  # unreferenced
        ],
        "categories": [{"id": 1, "name": "dog"}],
    }


def _make(root: Path, refs_format: str = "pickle", nest: str = "") -> Path:
    base = root / nest if nest else root
    ds_dir = base / "refcoco"
    ds_dir.mkdir(parents=True)
    if refs_format == "pickle":
        with (ds_dir / "refs(unc).p").open("wb") as fh:
            pickle.dump(_refs(), fh)
    else:
        (ds_dir / "refs(unc).json").write_text(json.dumps(_refs()))
    (ds_dir / "instances.json").write_text(json.dumps(_instances()))
    img_dir = base / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    for i in (1, 2):
        Image.new("RGB", (W, H), (i * 40, 0, 0)).save(img_dir / f"COCO_train2014_00000000000{i}.jpg")
    return root


@pytest.mark.parametrize("refs_format", ["pickle", "json"])
def test_one_query_per_sentence_ordered_by_image_then_ref(tmp_path, refs_format):
    ds = RefCocoDataset(_make(tmp_path, refs_format), "refcoco", "unc", "val")
    qs = list(ds.queries())
    assert len(ds) == 3
    assert [q.query_id for q in qs] == ["refcoco_unc_val/3#30", "refcoco_unc_val/7#70", "refcoco_unc_val/7#71"]
    assert [q.text for q in qs] == ["big thing", "left dog", "the brown one"]  # stripped + lower-cased like LISA
    assert qs[1].raw_text == "  Left Dog "
    assert [q.text_index for q in qs] == [0, 0, 1] and [q.sample_id for q in qs] == ["1", "2", "2"]
    assert all(not q.is_sentence and isinstance(q, SegQuery) for q in qs)
    assert qs[1].image_path == tmp_path / "images/mscoco/images/train2014/COCO_train2014_000000000002.jpg"
    assert qs[1].category == "dog"


def test_masks_from_polygons_and_compressed_rle(tmp_path):
    q_rle, q_poly, _ = RefCocoDataset(_make(tmp_path), split="val").queries()
    poly = q_poly.load_mask()
    expected = np.zeros((H, W), np.uint8)
    expected[1:3, 1:4] = 1
    np.testing.assert_array_equal(poly, expected)
    rle = q_rle.load_mask()
    assert rle.dtype == np.uint8 and int(rle.sum()) == 20 and rle[:, :4].all()
    img = q_poly.load_image()
    assert img.shape == (H, W, 3) and abs(int(img[0, 0, 0]) - 80) <= 3


def test_split_rules_follow_refer(tmp_path):
    root = _make(tmp_path)
    # refer: testA matches any split containing "A" (testA, testAB); test matches any test*
    assert [q.ref_id for q in RefCocoDataset(root, split="testA").queries()] == [4, 5]
    assert [q.ref_id for q in RefCocoDataset(root, split="test").queries()] == [4, 5]
    assert [q.ref_id for q in RefCocoDataset(root, split="testAB").queries()] == [5]


def test_uncompressed_rle_and_empty_segmentation(tmp_path):
    q_unc, q_empty = RefCocoDataset(_make(tmp_path), split="testA").queries()
    # column-major counts [6, 3, 21]: 6 zeros = column 0 (5 px) + (0, 1); then ones at rows 1-3 of column 1
    m = q_unc.load_mask()
    assert int(m.sum()) == 3 and m[1:4, 1].tolist() == [1, 1, 1]
    assert not q_empty.load_mask().any() and q_empty.load_mask().shape == (H, W)


def test_overlapping_polygons_are_a_union_not_a_sum():
    m = decode_segmentation([[0, 0, 3, 0, 3, 3, 0, 3], [2, 2, 5, 2, 5, 4, 2, 4]], H, W)
    assert m.max() == 1  # refer's np.sum would give 2 at the overlap pixel (2, 2)
    assert int(m.sum()) == 9 + 6 - 1


def test_lisa_refer_seg_nesting_and_custom_image_dir(tmp_path):
    root = _make(tmp_path, nest="refer_seg")
    ds = RefCocoDataset(root, split="val", image_dir=tmp_path / "elsewhere", lowercase=False)
    q = ds[1]
    assert ds.data_dir == tmp_path / "refer_seg" / "refcoco"
    assert q.image_path == tmp_path / "elsewhere" / "COCO_train2014_000000000002.jpg"
    assert q.text == "Left Dog"


def test_ciou_over_the_split_with_the_shared_evaluator(tmp_path):
    acc = MetricAccumulator()
    for q in RefCocoDataset(_make(tmp_path), split="val").queries():
        gt = q.load_mask()
        pred = np.zeros_like(gt, dtype=bool)
        pred[:, :2] = True  # 10 pixels in columns 0-1
        acc.add_masks(pred, gt, query_id=q.query_id, is_sentence=q.is_sentence, sample=q.sample_id)
    # ref 3 (RLE, cols 0-3, 20 px):   I = 10, U = 20
    # ref 7 (rect rows 1-2, cols 1-3, 6 px), twice: pred hits col 1 rows 1-2 -> I = 2, U = 10 + 6 - 2 = 14
    # cIoU = (10 + 2 + 2) / (20 + 14 + 14) = 14 / 48 ; gIoU = (0.5 + 2/14 + 2/14) / 3
    m = acc.result()["overall"]
    assert m.ciou == pytest.approx(14 / 48, abs=1e-9)
    assert m.giou == pytest.approx((0.5 + 2 / 14 + 2 / 14) / 3, abs=1e-5)
    assert acc.result()["long"].n_queries == 0


def test_errors_are_clear(tmp_path):
    with pytest.raises(DatasetFormatError, match="refcoco folder not found"):
        RefCocoDataset(tmp_path)
    root = _make(tmp_path)
    with pytest.raises(DatasetFormatError, match=r"no refs in split 'nope'.*'val'"):
        RefCocoDataset(root, split="nope")
    with pytest.raises(DatasetFormatError, match=r"no refs file .*refs\(umd\)"):
        RefCocoDataset(root, split_by="umd")
    (root / "refcoco" / "refs(unc).p").write_bytes(b"not a pickle")
    with pytest.raises(DatasetFormatError, match=r"cannot parse refs file"):
        RefCocoDataset(root)


def test_missing_annotation_is_reported(tmp_path):
    root = _make(tmp_path, "json")
    inst = _instances()
    inst["annotations"] = [a for a in inst["annotations"] if a["id"] != 100]
    (root / "refcoco" / "instances.json").write_text(json.dumps(inst))
    with pytest.raises(DatasetFormatError, match="ref 7: annotation 100 not in"):
        RefCocoDataset(root)
    (root / "refcoco" / "instances.json").unlink()
    with pytest.raises(DatasetFormatError, match="instances file not found"):
        RefCocoDataset(root)
