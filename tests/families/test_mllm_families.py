"""Every image-text-to-text family we support, through FrozenMLLM, with a tiny checkpoint of its real classes
and its hub chat template (tests/families/tiny_families.py): both stages batched and single, the KV-cache
continuation equal to recomputing the conversation, and the plain chat answer token for token equal to plain
transformers ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_families import FAMILIES, FAMILY_CLASSES

from llavaseg.models.mllm import FrozenMLLM

NEW_TOKENS = 6
TURNS = ["what is red ?", "which shape is on the left ?"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build(root / family) for family, build in FAMILIES.items()}


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)]


def _mllm(folder) -> FrozenMLLM:
    torch.manual_seed(0)
    return FrozenMLLM.from_pretrained(folder, local_files_only=True, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_as_its_real_class(checkpoints, family) -> None:
    mllm = _mllm(checkpoints[family])
    assert (type(mllm.model).__name__, type(mllm.processor).__name__) == FAMILY_CLASSES[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_turns_batched_single_and_without_cache_agree(checkpoints, family) -> None:
    mllm = _mllm(checkpoints[family])
    images = _images()
    prompts = [TURNS, ["what is blue ?", "which shape is on the right ?"]]
    batched = mllm.converse(images, prompts)
    singles = [mllm.converse([image], [turns]) for image, turns in zip(images, prompts)]  # KV cache reused
    recomputed = [mllm.converse([image], [turns], reuse_cache=False) for image, turns in zip(images, prompts)]
    assert [s[0] for s in singles] == [r[0] for r in recomputed]  # cache continuation == recomputation
    assert batched == [s[0] for s in singles]  # left padding changes nothing
    assert all(len(turns) == 2 for turns in batched)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_answer_equals_plain_generate(checkpoints, family) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = checkpoints[family]
    image = _images()[0]
    ours = _mllm(folder).answer([image], [TURNS[0]])[0]
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TURNS[0]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.fromarray(image)], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    plain = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert ours == plain
