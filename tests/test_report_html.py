"""The pictures and the one-page report of a results folder (drawn with pillow; the page needs no server)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.bench.charts import Bar, bar_chart, iou_histogram
from llavaseg.cli.bench import main
from llavaseg.data.reasonseg import write_reasonseg_sample


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    """Two prediction sets (one named with HTML characters) scored on a 3-image split."""
    root = tmp_path_factory.mktemp("report")
    image = np.full((10, 10, 3), 200, np.uint8)
    square = [[2, 2], [5, 2], [5, 5], [2, 5]]
    for name, texts, long in (("a", ["t0", "t1"], False), ("b", ["u0"], True), ("c", ["v0"], True)):
        write_reasonseg_sample(root / "data" / "val", name, image, texts, long, [{"label": "x", "points": square}],
                               image_format="png")
    target = np.zeros((10, 10), np.uint8)
    target[2:6, 2:6] = 255
    for folder, names in (("good", ("a_0", "a_1", "b_0", "c_0")), ("half", ("a_0", "b_0"))):
        (root / folder).mkdir()
        for stem in names:
            Image.fromarray(target).save(root / folder / f"{stem}.png")
    out = root / "out"
    assert main(["score", "--data", str(root / "data"), "--pred", f"<good>={root / 'good'}", "--pred",
                 str(root / "half"), "--out", str(out), "--bootstrap", "100"]) == 0
    return out


def test_charts_are_written_next_to_the_overlays(scored):
    for name in ("overlays.png", "iou_histogram.png", "metrics_by_split.png", "metrics_by_route.png"):
        with Image.open(scored / name) as picture:
            assert picture.format == "PNG" and picture.size[0] >= 300
    with Image.open(scored / "iou_histogram.png") as histogram:
        assert histogram.size == (300, 14 + 150 * 2)  # one panel per prediction set


def test_report_html_is_one_self_contained_page(scored):
    page = (scored / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 4  # 3 charts + overlays
    assert not re.search(r"""(src|href)=["']?(https?:|//|[a-z_]+\.(png|css|js))""", page)  # nothing fetched
    assert "&lt;good&gt;" in page and "<good>" not in page  # names are escaped
    for text in ("Paired comparisons", "Prediction sets", "Settings", "studentized bootstrap over images",
                 "val/a#1: no prediction, scored as an empty mask"):
        assert text in page


def test_results_json_and_csv_carry_intervals_and_comparisons(scored):
    results = json.loads((scored / "results.json").read_text())
    assert set(results) == {"environment", "routes", "skipped_routes", "base_dialogue", "comparisons", "predictions"}
    assert results["environment"]["bootstrap"] == 100 and results["environment"]["interval_method"] == "studentized"
    [comparison] = results["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["n_queries"], comparison["n_images"]) == ("<good>", "half",
                                                                                                    4, 3)
    assert comparison["giou_diff"] > 0 and comparison["exact"]  # 3 images: all 8 swap patterns
    with (scored / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["route"] for r in rows] == ["<good>", "half"]
    overall = results["routes"]["half"]["metrics"]["overall"]
    assert float(rows[1]["overall_giou_ci_low"]) == pytest.approx(overall["giou_ci"][0])
    assert list(rows[0])[:4] == ["route", "untrained", "n_queries", "n_errors"]  # earlier columns kept in place


def test_bar_chart_and_histogram_layout():
    chart = bar_chart(["short", "long"], ["r1", "r2", "r3"], [[Bar(0.5, (0.4, 0.6)), Bar(None), Bar(1.2)]] * 2, "t")
    assert chart.size == (44 + 12 + 2 * (3 * 40 + 24), 260)  # margins + per group: 3 bars of 40 px + a gap
    histogram = iou_histogram({"r": np.array([0.0, 0.05, 1.0, 1.0])})
    assert histogram.size == (300, 164)
    pixels = np.asarray(histogram)
    assert (pixels != 255).any(axis=2).sum() > 500  # bars were drawn
