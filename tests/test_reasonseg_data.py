"""ReasonSeg reading, rasterising (LISA's get_mask_from_json semantics) and writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.data.base import SegDataset, SegQuery, image_hw, read_rgb
from llavaseg.data.reasonseg import (
    ReasonSegDataset,
    load_reasonseg_json,
    polygons_to_mask,
    write_reasonseg_sample,
)
from llavaseg.errors import DatasetFormatError, InputError


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# ------------------------------------------------------------------------------------------ rasterising


def test_small_ignore_inside_big_target_survives_whatever_the_file_order():
    shapes = [
        {"label": "ignore", "points": square(3, 3, 5, 5)},   # 3x3 = 9 px, listed first
        {"label": "target", "points": square(1, 1, 8, 8)},   # 8x8 = 64 px, drawn first (larger)
    ]
    mask = polygons_to_mask(shapes, 10, 10)
    assert mask[4, 4] == 255 and mask[3, 3] == 255 and mask[5, 5] == 255
    assert mask[2, 2] == 1 and mask[8, 8] == 1 and mask[0, 0] == 0
    assert int((mask == 255).sum()) == 9
    assert int((mask == 1).sum()) == 64 - 9


def test_small_target_inside_big_ignore_survives():
    shapes = [
        {"label": "target", "points": square(4, 4, 5, 5)},           # 2x2 = 4 px
        {"label": "ignore_region", "points": square(0, 0, 9, 9)},    # label *contains* "ignore"
    ]
    mask = polygons_to_mask(shapes, 10, 10)
    assert int((mask == 1).sum()) == 4 and mask[4, 4] == 1
    assert int((mask == 255).sum()) == 100 - 4


def test_flag_shapes_are_skipped_but_only_exact_flag_labels():
    shapes = [
        {"label": "Flag", "points": square(0, 0, 9, 9)},      # exact "flag" (case-insensitive): skipped
        {"label": "flagpole", "points": square(0, 0, 1, 1)},  # merely contains "flag": a target
    ]
    mask = polygons_to_mask(shapes, 10, 10)
    assert int(mask.sum()) == 4
    assert mask[:2, :2].tolist() == [[1, 1], [1, 1]]


def test_coordinates_are_truncated_like_int32_cast_not_rounded():
    mask = polygons_to_mask([{"label": "target", "points": square(0.9, 0.9, 2.9, 2.9)}], 5, 5)
    # int32 cast -> square(0, 0, 2, 2): rows/cols 0..2 (rounding would give 1..3)
    expected = np.zeros((5, 5), np.uint8)
    expected[0:3, 0:3] = 1
    np.testing.assert_array_equal(mask, expected)


def test_degenerate_polygon_still_draws_its_outline():
    mask = polygons_to_mask([{"label": "target", "points": [[1, 2], [6, 2]]}], 5, 8)
    assert mask[2, 1:7].tolist() == [1] * 6 and int(mask.sum()) == 6


def test_no_shapes_gives_empty_mask():
    mask = polygons_to_mask([], 3, 4)
    assert mask.shape == (3, 4) and mask.dtype == np.uint8 and not mask.any()


# ---------------------------------------------------------------------------------------------- reading


def _write_pair(folder: Path, name: str, data: dict | bytes, size: tuple[int, int] = (12, 10)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(folder / f"{name}.jpg", quality=95)
    raw = data if isinstance(data, bytes) else json.dumps(data).encode("utf-8")
    (folder / f"{name}.json").write_bytes(raw)


def _ann(texts, is_sentence=False, shapes=None):
    return {"text": texts, "is_sentence": is_sentence,
            "shapes": shapes if shapes is not None else [{"label": "target", "points": square(1, 1, 3, 3)}]}


def test_cp1252_fallback(tmp_path):
    raw = b'{"text": ["the \x93red\x94 caf\xe9 sign"], "is_sentence": false, "shapes": []}'
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    path = tmp_path / "a.json"
    path.write_bytes(raw)
    assert load_reasonseg_json(path)["text"] == ["the \u201cred\u201d caf\u00e9 sign"]


def test_utf8_is_preferred_over_cp1252(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"text": ["caf\u00e9"]}, ensure_ascii=False), encoding="utf-8")
    assert load_reasonseg_json(path)["text"] == ["caf\u00e9"]  # cp1252 would give "cafÃ©"


def test_queries_all_texts_by_default_and_first_text_only(tmp_path):
    split = tmp_path / "val"
    _write_pair(split, "b_img", _ann(["one", "two", "three"], is_sentence=True))
    _write_pair(split, "a_img", _ann(["alpha"]))
    ds = ReasonSegDataset(tmp_path, "val")
    assert [s.name for s in ds] == ["a_img", "b_img"]  # sorted
    qs = list(ds.queries())
    assert [q.query_id for q in qs] == ["val/a_img#0", "val/b_img#0", "val/b_img#1", "val/b_img#2"]
    assert [q.text for q in qs] == ["alpha", "one", "two", "three"]
    assert [q.is_sentence for q in qs] == [False, True, True, True]
    first = list(ReasonSegDataset(tmp_path, "val", first_text_only=True).queries())
    assert [(q.query_id, q.text) for q in first] == [("val/a_img#0", "alpha"), ("val/b_img#0", "one")]
    assert isinstance(qs[0], SegQuery) and isinstance(ds, SegDataset)


@pytest.mark.parametrize("layout", ["plain", "lisa", "split_itself"])
def test_split_folder_detection(tmp_path, layout):
    if layout == "plain":
        folder, root = tmp_path / "val", tmp_path
    elif layout == "lisa":
        folder, root = tmp_path / "dataset" / "reason_seg" / "ReasonSeg" / "val", tmp_path
    else:
        folder = root = tmp_path / "my_samples"
    _write_pair(folder, "x", _ann(["t"]))
    ds = ReasonSegDataset(root, "val")
    assert ds.split_dir == folder and len(ds) == 1


def test_loaded_mask_matches_image_size(tmp_path):
    _write_pair(tmp_path / "val", "x", _ann(["t"]), size=(12, 10))
    q = next(ReasonSegDataset(tmp_path, "val").queries())
    img, mask = q.load_image(), q.load_mask()
    assert img.shape == (10, 12, 3) and img.dtype == np.uint8
    assert mask.shape == (10, 12) and int(mask.sum()) == 9


def test_exif_rotated_image_size_agrees_with_decoded_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "r.jpg"
    Image.new("RGB", (16, 8)).save(path, exif=exif)
    assert image_hw(path) == read_rgb(path).shape[:2] == (16, 8)


# ----------------------------------------------------------------------------------------------- errors


def _one_line_error(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_missing_split_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetFormatError) as info:
        ReasonSegDataset(tmp_path, "val")
    _one_line_error(info, "'val'", str(tmp_path))
    with pytest.raises(DatasetFormatError, match="not found"):
        ReasonSegDataset(tmp_path / "nope", "val")


def test_image_without_json(tmp_path):
    split = tmp_path / "val"
    split.mkdir()
    Image.new("RGB", (4, 4)).save(split / "lonely.jpg")
    with pytest.raises(DatasetFormatError) as info:
        ReasonSegDataset(tmp_path, "val")
    _one_line_error(info, "lonely.jpg", "lonely.json")


def test_orphan_json_warns_but_loads(tmp_path):
    _write_pair(tmp_path / "val", "x", _ann(["t"]))
    (tmp_path / "val" / "orphan.json").write_text("{}")
    with pytest.warns(UserWarning, match="orphan"):
        assert len(ReasonSegDataset(tmp_path, "val")) == 1


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"text": ["a"], "is_sentence": fal', "invalid JSON"),
        (json.dumps({"text": ["a"], "shapes": []}).encode(), "'is_sentence'"),
        (json.dumps({"text": "a", "is_sentence": False, "shapes": []}).encode(), "list of strings"),
        (json.dumps({"text": [], "is_sentence": False, "shapes": []}).encode(), "empty"),
        (json.dumps({"text": ["a"], "is_sentence": "no", "shapes": []}).encode(), "is_sentence"),
        (json.dumps(_ann(["a"], shapes=[{"label": "target"}])).encode(), "shapes[0]"),
        (json.dumps(_ann(["a"], shapes=[{"label": "t", "points": [[1, "x"]]}])).encode(), "points"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_broken_json_files(tmp_path, raw, fragment):
    _write_pair(tmp_path / "val", "broken", raw)
    with pytest.raises(DatasetFormatError) as info:
        ReasonSegDataset(tmp_path, "val")
    _one_line_error(info, "broken.json", fragment)


# ---------------------------------------------------------------------------------------------- writing


def test_round_trip_writer_to_loader_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    shapes = [
        {"label": "target", "points": square(2, 2, 20, 15)},
        {"label": "ignore", "points": square(5, 5, 7, 7)},
        {"label": "flag", "points": square(0, 0, 29, 19)},
    ]
    img_path, json_path = write_reasonseg_sample(
        tmp_path / "val", "s1", image, ["the box", "a box"], True, shapes, image_format="png",
    )
    assert img_path.name == "s1.png" and json_path.name == "s1.json"
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["text"] == ["the box", "a box"] and data["is_sentence"] is True
    assert (data["imagePath"], data["imageHeight"], data["imageWidth"], data["imageData"]) == ("s1.png", 20, 30, None)
    assert data["shapes"][0] == {"label": "target", "points": square(2.0, 2.0, 20.0, 15.0),
                                 "group_id": None, "shape_type": "polygon", "flags": {}}
    ds = ReasonSegDataset(tmp_path, "val")
    (q0, q1) = list(ds.queries())
    np.testing.assert_array_equal(q0.load_image(), image)  # PNG is lossless
    mask = q1.load_mask()
    np.testing.assert_array_equal(mask, polygons_to_mask(shapes, 20, 30))
    # target 19x14 = 266 px, with a 3x3 ignore hole; the "flag" shape is not drawn
    assert int((mask == 1).sum()) == 266 - 9 and int((mask == 255).sum()) == 9
    assert not list((tmp_path / "val").glob(".*tmp"))  # no temp file left behind


def test_round_trip_jpeg_and_pil_input(tmp_path):
    image = Image.new("RGB", (17, 9), (200, 100, 50))
    img_path, _ = write_reasonseg_sample(tmp_path, "p", image, ["x"], False, [])
    assert img_path.suffix == ".jpg"
    with Image.open(img_path) as im:
        assert im.format == "JPEG"
    ds = ReasonSegDataset(tmp_path, "whatever")  # the folder itself is the split
    loaded = ds[0].load_image()
    assert loaded.shape == (9, 17, 3)
    assert np.abs(loaded.astype(int) - [200, 100, 50]).max() <= 3  # quality 95
    assert not ds[0].load_mask().any()


def test_non_ascii_texts_written_as_utf8(tmp_path):
    _, json_path = write_reasonseg_sample(tmp_path, "u", np.zeros((4, 4, 3), np.uint8), ["caf\u00e9 \u201csign\u201d"], False, [])
    assert "caf\u00e9" in json_path.read_text(encoding="utf-8")
    assert ReasonSegDataset(tmp_path, "u")[0].texts == ["caf\u00e9 \u201csign\u201d"]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "a/b"}, "plain file stem"),
        ({"texts": []}, "non-empty list"),
        ({"image_format": "gif"}, "image_format"),
        ({"image": np.zeros((4, 4), np.float32)}, "uint8"),
        ({"shapes": [{"points": [[0, 0]]}]}, "label"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, kwargs, fragment):
    args = {"split_dir": tmp_path, "name": "ok", "image": np.zeros((4, 4, 3), np.uint8),
            "texts": ["t"], "is_sentence": False, "shapes": []}
    args.update(kwargs)
    with pytest.raises(InputError, match=fragment):
        write_reasonseg_sample(**args)
    assert not any(tmp_path.iterdir())
