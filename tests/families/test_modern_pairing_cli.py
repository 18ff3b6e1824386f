"""The modern pairing by flags: a Qwen2.5-VL-class MLLM and a SAM 2.1-class segmenter (tiny checkpoints of the
real classes in their real layouts) through ``llavaseg segment`` and ``llavaseg-bench reasonseg --limit 2``."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import build

from llavaseg.cli.bench import main as bench
from llavaseg.cli.main import main as segment
from llavaseg.tinyworld import SAMPLE_QUERY, sample_scene


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import Sam2ImageProcessor, Sam2Model

    from llavaseg.models.sam2 import tiny_sam2_config

    root = tmp_path_factory.mktemp("modern")
    torch.manual_seed(0)
    Sam2Model(tiny_sam2_config()).save_pretrained(root / "sam2")
    Sam2ImageProcessor(size={"height": 128, "width": 128}).save_pretrained(root / "sam2")
    return build("qwen2.5-vl", root / "qwen2.5-vl"), root / "sam2"


def test_segment_and_bench_with_qwen25vl_and_sam21_by_flags(folders, tmp_path, capsys) -> None:
    from PIL import Image

    mllm, sam = folders
    torch.set_num_threads(1)
    flags = ["--preset", "tiny", "--mllm", str(mllm), "--sam", str(sam)]
    assert segment(["segment", str(sample_scene()), SAMPLE_QUERY, *flags, "--out", str(tmp_path / "m.png")]) == 0
    assert Image.open(tmp_path / "m.png").size == Image.open(sample_scene()).size
    assert bench(["reasonseg", "--limit", "2", *flags, "--out", str(tmp_path / "run"), "--no-dialogue"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    routes = results["routes"]
    assert {"llavaseg", "seg-token", "training-free"} <= set(routes)
    assert all(summary["n_queries"] == 2 and summary["n_errors"] == 0 for summary in routes.values()), routes
    components = results["environment"]["provenance"]["components"]
    assert components["sam"]["family"] == "sam2" and components["mllm"]["source"] == str(mllm)
