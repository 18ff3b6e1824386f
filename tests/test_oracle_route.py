"""The oracle route: ground-truth stage outputs (``stages.jsonl``) replace the MLLM's, everything else unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llavaseg.data.reasonseg import ReasonSegDataset
from llavaseg.errors import InputError
from llavaseg.method.segment import adapter_mask_logits, encode_phrases, text_phrases


@pytest.fixture(scope="module")
def world(make_tiny_world):
    return make_tiny_world(seed=4, sizes={"train": 1, "val": 2})


@pytest.fixture(scope="module")
def oracle(tiny_segmenter, world):
    return tiny_segmenter.with_route("llavaseg-oracle", reference_data=(world, "val"))


def _records(world) -> dict[tuple[str, str], dict]:
    lines = (world / "val" / "stages.jsonl").read_text().splitlines()
    return {(r["image"], r["text"]): r for r in map(json.loads, lines)}


def test_stage_outputs_are_the_annotations_and_masks_follow_them(oracle, world):
    queries = list(ReasonSegDataset(world, "val").queries())
    images = [q.load_image() for q in queries]
    results = oracle(images, [q.text for q in queries])
    records = _records(world)
    route = oracle.route
    for query, image, result in zip(queries, images, results):
        want = records[(query.sample_id.rsplit("/", 1)[-1], query.text)]
        assert result.route == "llavaseg-oracle"
        assert result.description == want["description"] == result.raw_outputs["reason"]
        assert result.attributes.model_dump() == want["attributes"]
        assert result.attribute_parse == "reference" and result.used_attributes
        assert "mllm_reason" not in result.timings  # the MLLM was not asked for the stages
        assert result.answer  # ... but still answers the query as a chat turn
        # The mask is what the adapters + SAM make of exactly these phrases.
        phrases = text_phrases(want["description"], result.attributes, True, route.adapters.config.max_text_tokens)
        text, mask = encode_phrases(route.text_encoder, [phrases])
        with torch.inference_mode():
            features = route.sam.encode_batch([image])
            low, _ = adapter_mask_logits(route.adapters, route.sam, features, text, mask)
            expected = (route.sam.upscale(low, features[0])[0, 0] > route.sam.sam.mask_threshold).cpu().numpy()
        assert np.array_equal(result.mask, expected)


def test_unknown_query_or_image_is_a_clear_error(oracle, world):
    image = next(iter(ReasonSegDataset(world, "val").queries())).load_image()
    with pytest.raises(InputError, match="no ground-truth stages for query 'not a tiny-world query'"):
        oracle([image], ["not a tiny-world query"])
    with pytest.raises(InputError, match="no ground-truth stages"):
        oracle([np.zeros_like(image)], [next(iter(ReasonSegDataset(world, "val").queries())).text])


def test_needs_reference_data(tiny_segmenter):
    with pytest.raises(InputError, match="stages.jsonl"):
        tiny_segmenter.with_route("llavaseg-oracle")
