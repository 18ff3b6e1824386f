"""The public entry point on the tiny preset: shapes, batching, broadcasting, result contents, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from llavaseg import SegmentationResult
from llavaseg.cli.main import main as cli_main


def test_single_call_returns_mask_at_original_size(tiny_segmenter, tmp_path: Path, rgb_image):
    path = tmp_path / "img.png"
    Image.fromarray(rgb_image).save(path)
    result = tiny_segmenter(str(path), "the red thing")
    assert isinstance(result, SegmentationResult)
    assert result.mask.shape == (90, 140) and result.mask.dtype == bool
    assert result.route == "llavaseg" and result.query == "the red thing"
    assert result.description  # never empty: falls back to the query when stage 1 says nothing
    assert set(result.prompts) == {"reason", "attributes", "answer"}
    assert set(result.raw_outputs) == {"reason", "attributes", "answer", "mllm_calls"}
    assert result.raw_outputs["mllm_calls"] == "3"  # stage 1, stage 2, the chat answer
    assert result.answer == result.raw_outputs["answer"]
    assert {"mllm_reason", "mllm_attributes", "text_encoder", "sam_encoder", "adapters_decoder"} <= set(result.timings)
    assert all(seconds >= 0 for seconds in result.timings.values())
    # attributes that did not parse are recorded, and then not used
    assert result.used_attributes == (result.attribute_parse != "none")


def test_answer_is_the_frozen_mllms_plain_chat_answer(tiny_segmenter, rgb_image):
    result = tiny_segmenter(rgb_image, "what colour is the square ?")
    assert result.answer == tiny_segmenter.mllm.answer([rgb_image], ["what colour is the square ?"])[0]


def test_batches_match_single_calls_and_broadcast(tiny_segmenter, rgb_image):
    grey = rgb_image.mean(axis=2).astype(np.uint8)
    rgba = np.dstack([rgb_image, np.full(rgb_image.shape[:2], 255, np.uint8)])
    batch = tiny_segmenter([rgb_image, grey, rgba], ["the red thing", "a circle", "the red thing"])
    assert [r.mask.shape for r in batch] == [(90, 140)] * 3
    single = tiny_segmenter(grey, "a circle")
    assert np.array_equal(single.mask, batch[1].mask) and single.description == batch[1].description
    assert np.array_equal(batch[0].mask, batch[2].mask)  # opaque RGBA == RGB
    many = tiny_segmenter(rgb_image, ["the red thing", "a circle"])  # one image, several queries
    assert [r.query for r in many] == ["the red thing", "a circle"]
    assert np.array_equal(many[0].mask, batch[0].mask) and many[0].description == batch[0].description


def test_results_round_trip_through_json(tiny_segmenter, rgb_image):
    result = tiny_segmenter(rgb_image, "the red thing")
    again = SegmentationResult.model_validate_json(result.model_dump_json())
    assert np.array_equal(again.mask, result.mask) and again.attributes == result.attributes


def test_cli_segment_writes_mask_and_overlay(tmp_path: Path, rgb_image, capsys):
    Image.fromarray(rgb_image).save(tmp_path / "img.png")
    out = tmp_path / "out" / "mask.png"
    assert cli_main(["segment", str(tmp_path / "img.png"), "the red thing", "--out", str(out), "--preset", "tiny"]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (90, 140) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(tmp_path / "out" / "mask_overlay.png").size == (140, 90)
    printed = capsys.readouterr().out
    assert printed.startswith("answer: ") and "description: " in printed
