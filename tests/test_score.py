"""``llavaseg-bench score``: predictions made elsewhere, scored by the shared evaluator.

Hand-built 10x10 ReasonSeg split (LISA's rasteriser: a polygon with corners 2..5 covers 4 x 4 = 16 pixels):

* ``a``: texts ``t0``, ``t1`` (short), target the 16-pixel square at rows/columns 2..5;
* ``b``: text ``u0`` (long), target rows 0..1, all 10 columns (20 pixels);
* ``c``: text ``v0`` (long), no target (no shape): only an empty prediction is right.

Every rule (missing, extra, empty, unreadable, naming, LISA's divisor) is checked against numbers computed by
hand from those pixel counts; a route run of the ``tiny`` preset is then scored from its own masks and must give
exactly its own numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.bench.records import BenchRecord
from llavaseg.cli.bench import main
from llavaseg.data.reasonseg import ReasonSegDataset, write_reasonseg_sample
from llavaseg.results import encode_mask

EPS = 1e-5
SQUARE = [[2, 2], [5, 2], [5, 5], [2, 5]]
BAND = [[0, 0], [9, 0], [9, 1], [0, 1]]


def _mask(rows: slice, cols: slice, shape=(10, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


GT_A, GT_B = _mask(slice(2, 6), slice(2, 6)), _mask(slice(0, 2), slice(0, 10))


def _png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("score-data")
    image = np.full((10, 10, 3), 200, np.uint8)
    write_reasonseg_sample(root / "val", "a", image, ["t0", "t1"], False, [{"label": "x", "points": SQUARE}],
                           image_format="png")
    write_reasonseg_sample(root / "val", "b", image, ["u0"], True, [{"label": "x", "points": BAND}],
                           image_format="png")
    write_reasonseg_sample(root / "val", "c", image, ["v0"], True, [], image_format="png")
    return root


def _score(data: Path, out: Path, *preds: str, extra: tuple[str, ...] = ()) -> dict:
    assert main(["score", "--data", str(data), "--out", str(out), "--bootstrap", "200",
                 *[f for p in preds for f in ("--pred", p)], *extra]) == 0
    return json.loads((out / "results.json").read_text())


def _records(out: Path, name: str) -> dict[str, BenchRecord]:
    lines = (out / f"queries-{name}.jsonl").read_text().splitlines()
    return {r.query_id: r for r in (BenchRecord.model_validate_json(x) for x in lines)}


def test_ground_truth_pixel_counts_are_the_hand_ones(data):
    masks = {q.query_id: q.load_mask() for q in ReasonSegDataset(data, "val").queries()}
    assert {k: int((m == 1).sum()) for k, m in masks.items()} == {"val/a#0": 16, "val/a#1": 16, "val/b#0": 20,
                                                                  "val/c#0": 0}
    assert np.array_equal(masks["val/a#0"] == 1, GT_A) and np.array_equal(masks["val/b#0"] == 1, GT_B)


def test_missing_extra_and_empty_predictions_by_hand(data, tmp_path):
    preds = tmp_path / "mine"
    _png(preds / "a_0.png", GT_A)                 # exact: I = U = 16
    _png(preds / "b_0.png", np.zeros((10, 10)))   # empty mask: I = 0, U = 20
    _png(preds / "zz_0.png", GT_A)                # extra: no image zz
    _png(preds / "a_7.png", GT_A)                 # extra: image a has no text 7
    (preds / "readme.txt").write_text("notes")    # extra: not a PNG
    (preds / "old").mkdir()                       # extra: a folder
    # a_1 and c_0 missing: scored as empty masks (a#1: I = 0, U = 16; c#0: empty GT too, U = 0 -> IoU 1)
    results = _score(data, tmp_path / "out", str(preds))
    records = _records(tmp_path / "out", "mine")
    assert {k: (r.intersection, r.union) for k, r in records.items()} == {
        "val/a#0": (16, 16), "val/a#1": (0, 16), "val/b#0": (0, 20), "val/c#0": (0, 0)}
    assert records["val/a#1"].notices == ["no prediction: scored as an empty mask"]
    metrics = results["routes"]["mine"]["metrics"]
    assert metrics["overall"]["giou"] == pytest.approx((16 / (16 + EPS) + 0 + 0 + 1) / 4, abs=1e-12)
    assert metrics["overall"]["ciou"] == pytest.approx(16 / (16 + 16 + 20 + 0), abs=1e-12)
    assert metrics["short"]["giou"] == pytest.approx(16 / (16 + EPS) / 2, abs=1e-12)
    assert metrics["long"]["giou"] == pytest.approx(0.5, abs=1e-12)
    # no-target metrics: c#0 (empty GT) answered empty -> N-acc 1/1; targets a#0 (found), a#1, b#0 (empty) -> 1/3
    assert metrics["overall"]["n_no_target"] == 1 and metrics["overall"]["n_acc"] == 1.0
    assert metrics["overall"]["t_acc"] == pytest.approx(1 / 3)
    source = results["predictions"]["mine"]
    assert source["naming"] == "per-text" and source["n_items"] == 6 and source["n_matched"] == 2
    assert source["missing"] == ["val/a#1", "val/c#0"]
    assert {u["item"]: u["reason"] for u in source["unmatched"]} == {
        "a_7.png": "no query of the data set has this name", "old": "a folder (not read)",
        "readme.txt": "not a .png file", "zz_0.png": "no query of the data set has this name"}


def test_unreadable_and_wrong_size_predictions_are_failures(data, tmp_path, capsys):
    preds = tmp_path / "broken"
    preds.mkdir()
    (preds / "a_0.png").write_bytes(b"not a png")
    _png(preds / "a_1.png", np.ones((12, 10)))
    _png(preds / "b_0.png", GT_B)
    _png(preds / "c_0.png", np.zeros((10, 10)))
    results = _score(data, tmp_path / "out", str(preds))
    records = _records(tmp_path / "out", "broken")
    # a failure: IoU 0, intersection 0, union = the ground-truth area (the evaluator's rule)
    assert (records["val/a#0"].iou, records["val/a#0"].union) == (0.0, 16) and records["val/a#0"].error
    assert "12x10" not in records["val/a#1"].error and "10x12" in records["val/a#1"].error
    unreadable = results["predictions"]["broken"]["unreadable"]
    assert set(unreadable) == {"val/a#0", "val/a#1"} and "cannot decode" in unreadable["val/a#0"]
    assert results["routes"]["broken"]["n_errors"] == 2
    assert results["routes"]["broken"]["metrics"]["overall"]["giou"] == pytest.approx(
        (0 + 0 + 20 / (20 + EPS) + 1) / 4, abs=1e-12)
    assert "2 unreadable, scored as failures" in capsys.readouterr().out


def test_image_stem_names_score_the_first_text_only(data, tmp_path):
    preds = tmp_path / "lisa_style"
    _png(preds / "a.png", GT_A)
    _png(preds / "b.png", GT_B)
    results = _score(data, tmp_path / "out", str(preds))
    records = _records(tmp_path / "out", "lisa_style")
    assert list(records) == ["val/a#0", "val/b#0", "val/c#0"]  # a#1 is not selected, so not missing either
    source = results["predictions"]["lisa_style"]
    assert source["naming"] == "first-text" and source["missing"] == ["val/c#0"]
    assert results["routes"]["lisa_style"]["metrics"]["overall"]["giou"] == pytest.approx(
        (16 / (16 + EPS) + 20 / (20 + EPS) + 1) / 3, abs=1e-12)


def test_lisa_compat_differs_from_the_default_only_by_its_divisor(data, tmp_path):
    # first texts: a#0 exact (16/(16+1e-5)), b#0 exact (20/(20+1e-5)), c#0 missing = empty on an empty GT (1.0).
    # The default is the mean; LISA's AverageMeter.all_reduce divides the same sum by count + 1e-5 (in float32).
    preds = tmp_path / "lisa_style"
    _png(preds / "a.png", GT_A)
    _png(preds / "b.png", GT_B)
    total = 16 / (16 + EPS) + 20 / (20 + EPS) + 1.0
    default = _score(data, tmp_path / "default", str(preds))["routes"]["lisa_style"]["metrics"]["overall"]
    lisa = _score(data, tmp_path / "lisa", str(preds), extra=("--lisa-compat",))
    metrics = lisa["routes"]["lisa_style"]["metrics"]["overall"]
    assert lisa["environment"]["protocol"] == "lisa" and metrics["protocol"] == "lisa"
    assert default["giou"] == pytest.approx(total / 3, abs=1e-12)
    assert metrics["giou"] == pytest.approx(total / (3 + 1e-5), abs=2e-7)  # float32 arithmetic, as LISA's
    assert default["giou"] - metrics["giou"] == pytest.approx(total / 3 - total / (3 + 1e-5), abs=2e-7)
    assert default["giou"] - metrics["giou"] > 2e-6  # ... which is larger than float32's rounding
    assert metrics["ciou"] == pytest.approx(default["ciou"], abs=1e-7) == 1.0
    # with per-text names, --lisa-compat scores the first texts and says why a_1.png was not scored
    per_text = tmp_path / "per_text"
    _png(per_text / "a_0.png", GT_A)
    _png(per_text / "a_1.png", GT_A)
    results = _score(data, tmp_path / "lisa2", str(per_text), extra=("--lisa-compat",))
    assert results["predictions"]["per_text"]["unmatched"] == [
        {"item": "a_1.png", "reason": "outside the selection (only the first text of each image is scored)"}]


def test_jsonl_predictions_by_hand(data, tmp_path):
    _png(tmp_path / "masks" / "b.png", GT_B)
    lines = [
        {"sample_id": "val/a", "text_index": 0, "rle": encode_mask(GT_A)},      # the data set's sample id
        {"sample_id": "a", "text_index": 1, "error": "timeout"},               # the image stem; a failure
        {"query_id": "val/b#0", "png": "masks/b.png"},                          # a PNG next to the file
        {"query_id": "val/zz#0", "rle": encode_mask(GT_A)},                     # extra
        {"sample_id": "c", "text_index": 3, "rle": None},                       # extra: c has one text
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    results = _score(data, tmp_path / "out", f"sys={path}")
    records = _records(tmp_path / "out", "sys")
    assert {k: (r.intersection, r.union, r.error is not None) for k, r in records.items()} == {
        "val/a#0": (16, 16, False), "val/a#1": (0, 16, True), "val/b#0": (20, 20, False), "val/c#0": (0, 0, False)}
    source = results["predictions"]["sys"]
    assert source["missing"] == ["val/c#0"] and source["unreadable"] == {}
    assert [u["item"] for u in source["unmatched"]] == ["line 4", "line 5"]
    assert results["routes"]["sys"]["metrics"]["overall"]["giou"] == pytest.approx(
        (16 / (16 + EPS) + 0 + 20 / (20 + EPS) + 1) / 4, abs=1e-12)


@pytest.mark.parametrize("setup, message", [
    ("mixed", "mixes <image stem>.png"),
    ("nothing", "no file in"),
    ("duplicate", "a second prediction for query val/a#0"),
    ("bad_json", "line 1: invalid JSON"),
    ("no_key", "needs query_id, or sample_id and text_index"),
])
def test_unusable_prediction_sets_are_one_line(data, tmp_path, capsys, setup, message):
    if setup == "mixed":
        _png(tmp_path / "p" / "a.png", GT_A)
        _png(tmp_path / "p" / "b_0.png", GT_B)
        pred = tmp_path / "p"
    elif setup == "nothing":
        _png(tmp_path / "p" / "x_0.png", GT_A)
        pred = tmp_path / "p"
    else:
        pred = tmp_path / "p.jsonl"
        body = {"duplicate": '{"query_id": "val/a#0"}\n{"sample_id": "a", "text_index": 0}\n',
                "bad_json": "{oops\n", "no_key": '{"rle": null}\n'}[setup]
        pred.write_text(body)
    assert main(["score", "--data", str(data), "--pred", str(pred), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llavaseg-bench: error: ") and message in err[0]


def test_split_and_data_mismatch_is_one_line(data, tmp_path, capsys):
    _png(tmp_path / "p" / "a_0.png", GT_A)
    for argv in (["score", "--data", str(data / "val"), "--split", "test", "--pred", str(tmp_path / "p")],
                 ["reasonseg", "--data", str(data / "val"), "--split", "test", "--preset", "tiny"]):
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is the 'val' split folder, not 'test'" in err[0]
    # the split folder itself, asked for as what it is, is fine
    assert _score(data / "val", tmp_path / "ok", str(tmp_path / "p"), extra=("--split", "val"))["routes"]["p"]
    # a data-set root with a meta.json beside its split folders is not taken for a split folder
    root = tmp_path / "root"
    shutil.copytree(data, root)
    (root / "meta.json").write_text("{}")
    capsys.readouterr()
    assert main(["score", "--data", str(root), "--split", "select", "--pred", str(tmp_path / "p"),
                 "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split 'select' not found under" in err[0], err


def test_a_results_folder_keeps_to_one_set_of_predictions(data, tmp_path, capsys):
    _png(tmp_path / "p" / "a_0.png", GT_A)
    _png(tmp_path / "q" / "a_0.png", GT_A)
    _score(data, tmp_path / "out", str(tmp_path / "p"))
    _score(data, tmp_path / "out", str(tmp_path / "p"))  # the same run again: rescored in place
    capsys.readouterr()
    assert main(["score", "--data", str(data), "--pred", str(tmp_path / "q"), "--out", str(tmp_path / "out")]) == 2
    assert "holds results of a different run" in capsys.readouterr().err


# ------------------------------------------------------------------------------- a route's own masks, rescored


@pytest.fixture(scope="module")
def route_run(tmp_path_factory, fast_tiny_models):
    """A ``tiny`` preset run of two routes on 4 images / 5 queries (the bench test's scenes)."""
    root = tmp_path_factory.mktemp("route-data")
    square = [[36, 20], [56, 20], [56, 40], [36, 40]]
    samples = [("img0", ["the blue square on the right"], True), ("img1", ["right square", "the big one"], False),
               ("img2", ["what would you sit on"], True), ("img3", ["the thing at right"], True)]
    for index, (name, texts, is_sentence) in enumerate(samples):
        rng = np.random.default_rng(index)
        image = np.full((48, 64, 3), 230, np.uint8)
        image[8:24, 8:24] = rng.integers(0, 255, 3)
        image[20:40, 36:56] = rng.integers(0, 255, 3)
        write_reasonseg_sample(root / "val", name, image, texts, is_sentence, [{"label": "t", "points": square}],
                               image_format="png")
    out = tmp_path_factory.mktemp("route-run")
    assert main(["reasonseg", "--data", str(root), "--preset", "tiny", "--routes", "llavaseg,llavaseg-noattr",
                 "--no-dialogue", "--out", str(out), "--bootstrap", "300", "--seed", "3"]) == 0
    return root, out


def test_scoring_a_routes_own_masks_gives_its_own_numbers(route_run, tmp_path):
    root, run = route_run
    folder = tmp_path / "llavaseg"
    for record in _records(run, "llavaseg").values():  # <image stem>_<text index>.png, non-zero = foreground
        _png(folder / f"{record.sample.split('/')[-1]}_{record.text_index}.png", record.predicted_mask())
    out = tmp_path / "scored"
    scored = _score(root, out, str(folder), f"noattr={run / 'queries-llavaseg-noattr.jsonl'}",
                    extra=("--bootstrap", "300", "--seed", "3"))
    own = json.loads((run / "results.json").read_text())
    for name, own_name in (("llavaseg", "llavaseg"), ("noattr", "llavaseg-noattr")):
        assert scored["routes"][name]["metrics"] == own["routes"][own_name]["metrics"]  # every number, exactly
        mine, theirs = _records(out, name), _records(run, own_name)
        assert list(mine) == list(theirs)
        assert [(r.intersection, r.union, r.iou) for r in mine.values()] == [
            (r.intersection, r.union, r.iou) for r in theirs.values()]
    assert scored["comparisons"][0]["giou_diff"] == own["comparisons"][0]["giou_diff"]
    assert scored["comparisons"][0]["giou_p"] == own["comparisons"][0]["giou_p"]
    for name in ("overlays.png", "iou_histogram.png", "metrics_by_split.png", "metrics_by_route.png", "report.html"):
        assert (out / name).is_file() and (run / name).is_file()
