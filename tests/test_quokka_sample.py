"""End-to-end check on a real photo: imgaug's quokka converted to a ReasonSeg sample.

Needs the imgaug 0.4.0 wheel (cached under ~/.cache/llavaseg/wheels, else fetched with ``pip download``);
skipped with the reason when it cannot be had.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llavaseg.data.quokka import (
    QUOKKA_TEXTS,
    QuokkaUnavailableError,
    imgaug_wheel,
    quokka_reasonseg_sample,
)
from llavaseg.data.reasonseg import ReasonSegDataset
from llavaseg.evaluate import MetricAccumulator


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    try:
        imgaug_wheel()
    except QuokkaUnavailableError as exc:
        pytest.skip(f"imgaug wheel unavailable (pip download failed): {exc}")
    return quokka_reasonseg_sample(tmp_path_factory.mktemp("quokka"))


def test_sample_files_and_size(split_dir):
    assert split_dir.name == "val"
    data = json.loads((split_dir / "quokka.json").read_text(encoding="utf-8"))
    assert data["text"] == QUOKKA_TEXTS and data["is_sentence"] is False
    assert (data["imageWidth"], data["imageHeight"]) == (960, 643)
    assert data["shapes"][0]["label"] == "target" and len(data["shapes"][0]["points"]) > 10
    # both ways of pointing at the split work
    assert len(ReasonSegDataset(split_dir, "val")) == len(ReasonSegDataset(split_dir.parent, "val")) == 1


def test_mask_is_plausible(split_dir):
    sample = ReasonSegDataset(split_dir.parent, "val")[0]
    image, mask = sample.load_image(), sample.load_mask()
    assert image.shape == (643, 960, 3) and mask.shape == (643, 960)
    pts = np.array(json.loads(sample.json_path.read_text())["shapes"][0]["points"]).astype(np.int32)
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    ys, xs = np.nonzero(mask)
    # the filled polygon spans exactly the (int-truncated) extent of its points
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (x0, x1, y0, y1)
    # and covers a good part of, but not all of, that box (it is an animal, not a rectangle)
    area = int((mask == 1).sum())
    box = (x1 - x0 + 1) * (y1 - y0 + 1)
    assert 0.3 * box < area < 0.95 * box
    assert not (mask == 255).any()


def test_evaluator_gt_vs_gt_and_empty_prediction(split_dir):
    ds = ReasonSegDataset(split_dir, "val")
    perfect, empty = MetricAccumulator(), MetricAccumulator()
    for q in ds.queries():
        gt = q.load_mask()
        perfect.add_masks(gt == 1, gt, query_id=q.query_id, is_sentence=q.is_sentence)
        empty.add_masks(np.zeros(gt.shape, bool), gt, query_id=q.query_id, is_sentence=q.is_sentence)
    p, e = perfect.result(), empty.result()
    assert p["overall"].n_queries == 3 and p["short"].n_queries == 3 and p["long"].n_queries == 0
    assert p["overall"].giou == pytest.approx(1.0, abs=1e-6)
    assert p["overall"].ciou == pytest.approx(1.0, abs=1e-9)
    assert e["overall"].giou == 0.0 and e["overall"].ciou == 0.0


def test_cached_wheel_is_reused(split_dir, monkeypatch):
    import subprocess

    def no_pip(*args, **kwargs):  # a second call must not shell out again
        raise AssertionError("pip should not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert imgaug_wheel().name.startswith("imgaug-0.4.0-")


def test_unavailable_wheel_gives_clear_error(tmp_path, monkeypatch):
    import subprocess

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(QuokkaUnavailableError, match="No matching distribution") as info:
        imgaug_wheel(tmp_path / "empty-cache")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "empty-cache").iterdir())  # no partial download left
