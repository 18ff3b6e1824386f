"""Property-based fuzzing of the formats users hand us: ReasonSeg annotations, JSONL records, refer
instances and prompt templates. Whatever the content, loading either gives valid masks or raises one of our
errors with a one-line message; nothing else escapes (no TypeError from numpy, no cv2 or pycocotools crash)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from refer_files import refs

from llavaseg.data.jsonl import JsonlDataset
from llavaseg.data.reasonseg import ReasonSegDataset
from llavaseg.data.refcoco import RefCocoDataset
from llavaseg.errors import LlavasegError
from llavaseg.prompting import STAGES, validate_template

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
H, W = 12, 16

numbers = st.one_of(st.integers(-10**7, 10**7), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 5, 11, 15, -1, 2**31, 1e300]))
json_leaf = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=12)


def mostly(valid: st.SearchStrategy, junk: st.SearchStrategy) -> st.SearchStrategy:
    """Well-formed three times in four (so the fuzz reaches the rasterisers), anything otherwise."""
    return st.integers(0, 3).flatmap(lambda pick: junk if pick == 3 else valid)


point = mostly(st.lists(numbers, min_size=2, max_size=2), json_any)
points = mostly(st.lists(point, min_size=1, max_size=6), json_any)
shape = mostly(st.fixed_dictionaries({"label": mostly(st.sampled_from(["target", "ignore", "flag", "t"]), json_leaf),
                                      "points": points}), json_any)
annotation = mostly(
    st.fixed_dictionaries({"text": mostly(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3), json_any),
                           "is_sentence": mostly(st.booleans(), json_leaf),
                           "shapes": mostly(st.lists(shape, max_size=3), json_any)}),
    json_any)


def _valid_mask(mask: np.ndarray) -> bool:
    return mask.dtype == np.uint8 and mask.shape == (H, W) and set(np.unique(mask)) <= {0, 1, 255}


def _one_line(error: LlavasegError) -> bool:
    return bool(str(error).strip()) and "\n" not in str(error).strip()


def _load_all(dataset) -> None:
    for query in dataset.queries():
        assert _valid_mask(query.load_mask())


@FUZZ
@given(record=annotation)
def test_reasonseg_annotations(tmp_path_factory, record) -> None:
    split = tmp_path_factory.mktemp("rs") / "val"
    split.mkdir()
    Image.new("RGB", (W, H)).save(split / "a.jpg")
    (split / "a.json").write_text(json.dumps(record))
    try:
        _load_all(ReasonSegDataset(split.parent, "val"))
    except LlavasegError as error:
        assert _one_line(error)


polygons = mostly(st.lists(st.one_of(st.lists(point, min_size=1, max_size=5), shape), min_size=1, max_size=3),
                  json_any)
jsonl_record = mostly(
    st.one_of(
        st.fixed_dictionaries({"image": mostly(st.just("a.png"), st.sampled_from(["missing.png", ""])),
                               "query": mostly(st.text(min_size=1, max_size=10), json_leaf), "polygons": polygons},
                              optional={"is_sentence": json_leaf, "id": json_leaf}),
        st.fixed_dictionaries({"image": st.just("a.png"), "query": st.text(min_size=1, max_size=10),
                               "mask": mostly(st.sampled_from(["m.png", "a.png"]), json_leaf)},
                              optional={"ignore_value": json_leaf})),
    json_any)


@FUZZ
@given(lines=st.lists(jsonl_record, min_size=1, max_size=3))
def test_jsonl_records(tmp_path_factory, lines) -> None:
    folder = tmp_path_factory.mktemp("jsonl")
    Image.new("RGB", (W, H)).save(folder / "a.png")
    Image.new("L", (W, H), 1).save(folder / "m.png")
    (folder / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    try:
        _load_all(JsonlDataset(folder / "q.jsonl"))
    except LlavasegError as error:
        assert _one_line(error)


segmentation = st.one_of(
    st.lists(st.lists(numbers, min_size=0, max_size=10), max_size=3),
    st.fixed_dictionaries({"size": mostly(st.just([H, W]), json_any),
                           "counts": st.one_of(st.lists(st.integers(-5, 200), max_size=6),
                                               st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=111),
                                                       max_size=10), json_leaf)}),
    json_any)


@FUZZ
@given(segmentation=segmentation)
def test_refer_segmentations(tmp_path_factory, segmentation) -> None:
    root = tmp_path_factory.mktemp("refer")
    (root / "refcoco").mkdir()
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs()))
    instances = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W}],
                 "annotations": [{"id": 100, "image_id": 1, "category_id": 1, "segmentation": segmentation}],
                 "categories": [{"id": 1, "name": "dog"}]}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    Image.new("RGB", (W, H)).save(images / "COCO_train2014_000000000001.jpg")
    try:
        _load_all(RefCocoDataset(root, "refcoco", "unc", "val"))
    except LlavasegError as error:
        assert _one_line(error)


template_text = st.lists(st.sampled_from([*"ab {}:!>d0.[]r ", "{query}", "{description}", "{query:>9}", "{{", "}}",
                                          "{query!r}", "{0}"]), max_size=14).map("".join)


@FUZZ
@given(stage=st.sampled_from(sorted(STAGES)), text=template_text, value=st.text(max_size=20))
def test_templates(stage, text, value) -> None:
    try:
        template = validate_template(stage, text, "fuzz.txt")
    except LlavasegError as error:
        assert _one_line(error)
        return
    values = {name: value for name in STAGES[stage].allowed}
    rendered = template.render(**values)  # a template that loads always renders, and stays small
    assert len(rendered) <= len(text) + len(values) * len(value) * text.count("{") + 1
    assert math.isfinite(len(rendered))
