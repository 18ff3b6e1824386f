"""Frozen model wrappers: MLLM turns and caches, SAM below the predictor, adapters on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llavaseg.errors import CheckpointMismatchError
from llavaseg.images import image_digest
from llavaseg.models.adapters import load_adapters, save_adapters
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.components import new_adapters
from llavaseg.models.tiny_llava import tiny_vocabulary
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.tiny_llava import TinyLlavaSpec, build_tiny_llava


@pytest.fixture(scope="module")
def chatty_mllm() -> FrozenMLLM:
    """A random tiny LLaVA with sharpened weights so its (meaningless) answers vary with the input."""
    model, processor = build_tiny_llava(tiny_vocabulary(), seed=3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.mul_(8.0)
    return FrozenMLLM(model, processor, max_new_tokens=6)


def _images():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (50, 120, 3), dtype=np.uint8)


def test_mllm_is_frozen_and_in_eval_mode(chatty_mllm):
    assert not chatty_mllm.model.training
    assert all(not p.requires_grad for p in chatty_mllm.model.parameters())


def test_second_turn_with_reused_cache_equals_reencoding(chatty_mllm):
    image, _ = _images()
    turns = [["the red circle ?", "what colour is it ?", "where is it ?"]]
    with_cache = chatty_mllm.converse([image], turns, reuse_cache=True)
    from_scratch = chatty_mllm.converse([image], turns, reuse_cache=False)
    assert with_cache == from_scratch
    assert len(with_cache[0]) == 3


def test_left_padded_batch_equals_single_conversations(chatty_mllm):
    first, second = _images()
    prompts = [["the red circle ?", "what colour ?"], ["how many shapes are there in the top left ?", "why ?"]]
    batch = chatty_mllm.converse([first, second], prompts)
    singles = [chatty_mllm.converse([first], prompts[:1])[0], chatty_mllm.converse([second], prompts[1:])[0]]
    assert batch == singles


def test_follow_up_text_continues_the_chat_template(chatty_mllm):
    rendered = chatty_mllm.render_chat([], "the red circle ?")
    assert rendered == "USER: <image>\nthe red circle ? ASSISTANT:"
    assert chatty_mllm._continuation_text("a", "b ?") == "</s>USER: b ? ASSISTANT:"


@pytest.mark.parametrize("quantization, layer_class", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_saved_tiny_llava_loads_quantised_through_bitsandbytes(tmp_path: Path, quantization, layer_class):
    model, processor = build_tiny_llava(tiny_vocabulary(), TinyLlavaSpec(), seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    full = FrozenMLLM.from_pretrained(tmp_path)
    quantised = FrozenMLLM.from_pretrained(tmp_path, quantization=quantization)
    q_proj = quantised.model.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_class
    assert all(not p.requires_grad for p in quantised.model.parameters())
    image, _ = _images()
    answer = quantised.answer([image], ["what colour ?"], max_new_tokens=3)[0]
    assert isinstance(answer, str)
    assert full.answer([image], ["what colour ?"], max_new_tokens=3)[0] is not None


def test_loading_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CheckpointMismatchError, match="not a transformers model directory"):
        FrozenMLLM.from_pretrained(tmp_path)


def test_sam_features_match_segment_anything_predictor():
    """Our preprocessing + encoder call gives exactly SamPredictor.set_image's features, computed once."""
    from segment_anything import SamPredictor

    sam = FrozenSAM.create("tiny", seed=0)
    image, _ = _images()
    predictor = SamPredictor(sam.sam)
    predictor.set_image(image)
    features = sam.encode(image)
    assert torch.allclose(features.embedding, predictor.features, atol=1e-5)
    assert features.input_size == tuple(predictor.input_size) and features.original_size == (70, 90)
    assert [tuple(level.shape) for level in features.levels] == [(1, 64, 16, 16)] * 2
    assert sam.encode(image) is features  # second query on the same image: served from the cache


def test_sam_box_prompt_path_matches_predictor():
    from segment_anything import SamPredictor

    sam = FrozenSAM.create("tiny", seed=0)
    image, _ = _images()
    predictor = SamPredictor(sam.sam)
    predictor.set_image(image)
    box = np.array([10, 5, 60, 50])
    expected, _, _ = predictor.predict(box=box, multimask_output=False)
    masks, _ = sam.predict_boxes(image, box[None])
    assert masks.shape == (1, 1, 70, 90)
    assert np.array_equal(masks[0], expected)


def test_sam_cache_is_bounded():
    sam = FrozenSAM.create("tiny", cache_size=2)
    images = [np.full((20, 20, 3), value, np.uint8) for value in (0, 80, 160)]
    for image in images:
        sam.encode(image)
    assert len(sam._cache) == 2


def test_adapters_round_trip_and_report_parameter_count(tmp_path: Path):
    from llavaseg.models.text_encoder import FrozenTextEncoder

    sam = FrozenSAM.create("tiny")
    text = FrozenTextEncoder.create("tiny-clip")
    adapters = new_adapters(sam, text, dim=64, heads=4, scales=(4, 2, 1))
    count = adapters.num_parameters()
    assert count == sum(p.numel() for p in adapters.parameters()) and 10_000 < count < 1_000_000
    save_adapters(adapters, tmp_path, card={"steps": 0})
    loaded = load_adapters(tmp_path, sam_identity=sam.identity(), text_encoder_identity=text.identity())
    for (name, a), (_, b) in zip(adapters.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors", "card.json", "config.json"]
    other_text = FrozenTextEncoder.create("tiny-clip", seed=5)
    with pytest.raises(CheckpointMismatchError, match="trained for text encoder"):
        load_adapters(tmp_path, sam_identity=sam.identity(), text_encoder_identity=other_text.identity())


def test_vision_tower_runs_once_per_image_across_queries(chatty_mllm):
    image, other = _images()
    calls = []
    hook = chatty_mllm.model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        chatty_mllm._image_cache.clear()
        first = chatty_mllm.converse([image], [["the red circle ?", "what colour ?"]])
        again = chatty_mllm.converse([image, other], [["the red circle ?", "what colour ?"], ["why ?", "how ?"]])
    finally:
        hook.remove()
    assert len(calls) == 2  # once for `image`, once for `other`; the repeated image is served from the cache
    assert again[0] == first[0]
    fresh = FrozenMLLM(chatty_mllm.model, chatty_mllm.processor, max_new_tokens=6, image_cache_size=0)
    fresh._features_supported = False  # the plain pixel_values path
    assert fresh.converse([image, other], [["the red circle ?", "what colour ?"], ["why ?", "how ?"]]) == again


def test_image_cache_smaller_than_a_batch_still_serves_every_image(chatty_mllm):
    """A batch that hits one cached image and adds another must not evict its own hit (it used to: KeyError)."""
    image, other = _images()
    expected = chatty_mllm.converse([image, other], [["the red circle ?", "what colour ?"], ["why ?", "how ?"]])
    small = FrozenMLLM(chatty_mllm.model, chatty_mllm.processor, max_new_tokens=6, image_cache_size=1)
    small.converse([image], [["the red circle ?", "what colour ?"]])  # `image` cached; the cache is full
    assert small.converse([image, other], [["the red circle ?", "what colour ?"], ["why ?", "how ?"]]) == expected
    assert list(small._image_cache) == [image_digest(other)]  # the bound holds: the most recent image kept
    none = FrozenMLLM(chatty_mllm.model, chatty_mllm.processor, max_new_tokens=6, image_cache_size=0)
    assert none.converse([image, other], [["the red circle ?", "what colour ?"], ["why ?", "how ?"]]) == expected
    assert not none._image_cache


def test_sam_disk_cache_serves_a_new_process_without_encoding(tmp_path: Path):
    image, _ = _images()
    first = FrozenSAM.create("tiny", disk_cache=tmp_path)
    features = first.encode(image)
    second = FrozenSAM.create("tiny", disk_cache=tmp_path)  # same weights: same cache namespace
    calls = []
    hook = second.sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        loaded = second.encode(image)
    finally:
        hook.remove()
    assert calls == []
    assert torch.equal(loaded.embedding, features.embedding) and loaded.input_size == features.input_size
    assert all(torch.equal(a, b) for a, b in zip(loaded.levels, features.levels))
    other = FrozenSAM.create("tiny", seed=9, disk_cache=tmp_path)  # other weights never read those files
    assert not torch.equal(other.encode(image).embedding, features.embedding)
