"""Writers of small refer-layout (RefCOCO) folders for the reliability tests."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from PIL import Image

H, W = 5, 6
RECT = [1, 1, 4, 1, 4, 3, 1, 3]


def refs() -> list[dict]:
    return [{"ref_id": 7, "ann_id": 100, "image_id": 1, "category_id": 1, "split": "val",
             "sentences": [{"sent": "left dog", "sent_id": 70}]}]


def instances(segmentation=None) -> dict:
    return {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W}],
            "annotations": [{"id": 100, "image_id": 1, "category_id": 1,
                             "segmentation": [RECT] if segmentation is None else segmentation}],
            "categories": [{"id": 1, "name": "dog"}]}


def write_refer(root: Path, *, refs_payload: bytes | None = None, segmentation=None) -> Path:
    """``root/refcoco/{refs(unc).p, instances.json}`` and one image; ``refs_payload`` replaces the pickle."""
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "refs(unc).p").write_bytes(refs_payload if refs_payload is not None else pickle.dumps(refs()))
    (folder / "instances.json").write_text(json.dumps(instances(segmentation)))
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), (90, 0, 0)).save(images / "COCO_train2014_000000000001.jpg")
    return root
