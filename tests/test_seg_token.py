"""The LISA-style [SEG] model: token handling, hidden-state selection, trainable sets, losses, checkpoints, route."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from llavaseg.errors import CheckpointMismatchError, UnsupportedError
from llavaseg.losses import lisa_dice_loss as dice_loss
from llavaseg.losses import mask_losses, sigmoid_ce_loss
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.components import build_mllm, build_sam
from llavaseg.seg_token.checkpoint import (
    CONFIG_NAME,
    load_seg_token_model,
    save_seg_token_model,
    trained_state,
)
from llavaseg.seg_token.inference import generate_pass, predict, render
from llavaseg.seg_token.model import (
    add_seg_token,
    create_seg_token_model,
    seg_token_mask,
    select_seg_hidden,
)
from llavaseg.seg_token.train import (
    IGNORE_INDEX,
    SegSample,
    make_batch,
    make_optimizer,
    seg_token_train_step,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base():
    mllm = build_mllm("random:tiny", device="cpu", dtype=None, quantization=None)
    sam = build_sam("tiny", None, device="cpu")
    return mllm, sam


@pytest.fixture(scope="module")
def model(base):
    mllm, sam = base
    return create_seg_token_model(mllm, sam, seed=0)


def _image(seed: int, size=(128, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


def _mask(size=(128, 128)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[20:60, 30:90] = 1
    return mask


def _samples() -> list[SegSample]:
    return [SegSample(_image(0), "the red circle", False, _mask()),
            SegSample(_image(1), "the circle that has the same colour as the square", True, _mask()),
            SegSample(_image(2), "what colour is the circle ?", answer="red")]


# ------------------------------------------------------------------------------------------------ token
def test_seg_token_added_once_and_embeddings_resized(base, model):
    mllm, _ = base
    n0 = len(mllm.tokenizer)
    assert "[SEG]" not in mllm.tokenizer.get_vocab()  # the shared tokenizer is untouched
    assert len(model.tokenizer) == n0 + 1 and model.seg_token_id == n0
    ids = model.tokenizer("It is [SEG].", add_special_tokens=False)["input_ids"]
    assert ids.count(model.seg_token_id) == 1
    assert model.input_embeddings().weight.shape[0] == n0 + 1
    assert model.output_embeddings().weight.shape[0] == n0 + 1
    assert mllm.model.get_input_embeddings().weight.shape[0] == n0
    assert add_seg_token(model.tokenizer) == model.seg_token_id and len(model.tokenizer) == n0 + 1


class _SplittingTokenizer:
    """Encodes "[SEG]" as two ordinary pieces (the failure of LISA issue #55 taken further)."""

    unk_token_id = 0

    def get_vocab(self):
        return {"[SEG]": 7}

    def add_tokens(self, tokens):
        return 0

    def convert_tokens_to_ids(self, token):
        return 7

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3, 4] * text.count("[SEG]")}


def test_add_seg_token_refuses_a_split_token():
    with pytest.raises(UnsupportedError, match="one token"):
        add_seg_token(_SplittingTokenizer())


# ------------------------------------------------------------------------------------------- positions
def test_seg_token_mask_marks_the_predicting_position():
    seg = 9
    ids = torch.tensor([[5, seg, 7, seg, 1], [seg, 2, 3, 4, seg]])
    assert seg_token_mask(ids, seg).tolist() == [[True, False, True, False, False],
                                                 [False, False, False, True, False]]
    # start=3 ignores [SEG] before index 3 (prompt tokens)
    assert seg_token_mask(ids, seg, start=3).tolist() == [[False, False, True, False, False],
                                                          [False, False, False, True, False]]


def test_seg_hidden_states_follow_expanded_image_tokens(model):
    """Hand-built ids: text, 64 image placeholders, text with two [SEG]s; rows are the positions before them."""
    tok = model.tokenizer
    image_id = model.llava.config.image_token_id
    n_image = model.llava.config.image_seq_length
    seg = model.seg_token_id
    word = tok.convert_tokens_to_ids("circle")
    user, colon = tok.convert_tokens_to_ids("USER"), tok.convert_tokens_to_ids(":")
    row0 = [user, colon] + [image_id] * n_image + [word, word, seg, word, seg, tok.eos_token_id]
    row1 = [user, colon] + [image_id] * n_image + [word, seg, word, word, word, word]
    ids = torch.tensor([row0, row1])
    # positions of [SEG]: row0 at 2+64+2 = 68 and 70; row1 at 67 -> selected rows 67, 69 and 66
    assert [i for i, t in enumerate(row0) if t == seg] == [68, 70]
    assert [i for i, t in enumerate(row1) if t == seg] == [67]
    pixel_values = model.processor.image_processor(images=[_image(3), _image(4)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                          output_hidden_states=True)
    hidden = out.hidden_states[-1]
    assert hidden.shape[1] == ids.shape[1]  # transformers expands <image> in input_ids: no 255-style pad
    rows = select_seg_hidden(hidden, ids, seg)
    assert rows[0].shape[0] == 2 and rows[1].shape[0] == 1
    assert torch.equal(rows[0][0], hidden[0, 67]) and torch.equal(rows[0][1], hidden[0, 69])
    assert torch.equal(rows[1][0], hidden[1, 66])
    # The last layer's output is the normed state that feeds lm_head (LISA's output_hidden_states[-1]).
    assert torch.allclose(model.output_embeddings()(hidden), out.logits, atol=1e-5)


def test_generated_seg_hidden_equals_full_forward(model):
    """Generation path: per-step hidden states, concatenated, give the same rows as one forward pass."""
    image = _image(5)
    passes = generate_pass(model, [image], ["the red circle"], max_new_tokens=3,
                           sequence_bias={(model.seg_token_id,): 1000.0})
    assert passes[0].token_ids == [model.seg_token_id] * 3
    assert passes[0].text.count("[SEG]") == 3
    prompt = render(model.processor, "the red circle")
    inputs = model.processor(images=[image], text=[prompt + " [SEG] [SEG] [SEG]"], return_tensors="pt")
    assert inputs["input_ids"][0, -3:].tolist() == [model.seg_token_id] * 3
    with torch.no_grad():
        hidden = model.llava(**inputs, output_hidden_states=True).hidden_states[-1][0]
    start = inputs["input_ids"].shape[1] - 3
    assert torch.allclose(passes[0].hidden, hidden[start - 1: start + 2], atol=1e-4)


# -------------------------------------------------------------------------------------- trainable sets
def test_lora_targets_only_language_model_q_and_v(model):
    wrapped = [name for name, module in model.llm.named_modules() if hasattr(module, "lora_A")]
    layers = model.llava.config.text_config.num_hidden_layers
    assert len(wrapped) == 2 * layers
    assert all(".language_model." in name and name.endswith(("q_proj", "v_proj")) for name in wrapped)
    config = model.llm.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)


def test_trainable_and_frozen_parameters_are_lisas(model):
    names = set(model.trainable_parameters())
    decoder = {f"mask_decoder.{n}" for n, _ in model.mask_decoder.named_parameters()}
    fcs = {f"text_hidden_fcs.{n}" for n, _ in model.text_hidden_fcs.named_parameters()}
    lora = {n for n in names if ".lora_" in n}
    embeddings = {n for n in names if n.endswith(("embed_tokens.weight", "lm_head.weight"))}
    assert len(embeddings) == 2 and fcs == {n for n in names if n.startswith("text_hidden_fcs.")}
    assert decoder <= names and len(lora) == 4 * model.llava.config.text_config.num_hidden_layers
    assert names == decoder | fcs | lora | embeddings
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("vision_tower" in n for n in frozen) and any("multi_modal_projector" in n for n in frozen)
    assert not any(("vision_tower" in n or "multi_modal_projector" in n) for n in names)
    assert all("lora_" not in n for n in frozen)


def test_train_step_leaves_shared_models_bit_identical(base):
    mllm, sam = base
    model = create_seg_token_model(mllm, sam, seed=1)
    shared_llm = {k: v.clone() for k, v in mllm.model.state_dict().items()}
    shared_sam = {k: v.clone() for k, v in sam.sam.state_dict().items()}
    vocab = len(mllm.tokenizer)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = make_optimizer(model)
    batch = make_batch(model, _samples(), random.Random(0))
    loss = seg_token_train_step(model, batch, optimizer)
    assert math.isfinite(loss) and loss > 0
    assert all(torch.equal(v, mllm.model.state_dict()[k]) for k, v in shared_llm.items())
    assert all(torch.equal(v, sam.sam.state_dict()[k]) for k, v in shared_sam.items())
    assert len(mllm.tokenizer) == vocab
    after = dict(model.named_parameters())
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed <= set(model.trainable_parameters())
    assert "text_hidden_fcs.2.weight" in changed and any(k.endswith("lm_head.weight") for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed) and any("lora_B" in k for k in changed)  # B starts at 0, so A has no gradient yet


# ----------------------------------------------------------------------------------------------- batch
def test_batch_labels_cover_the_answer_only(model):
    batch = make_batch(model, _samples(), random.Random(0))
    image_id = model.llava.config.image_token_id
    for row in range(len(batch)):
        ids, labels = batch.input_ids[row], batch.labels[row]
        supervised = ids[labels != IGNORE_INDEX].tolist()
        assert (ids == image_id).sum() == model.llava.config.image_seq_length
        assert not (labels[ids == image_id] != IGNORE_INDEX).any()
        assert supervised[-1] == model.tokenizer.eos_token_id
        text = model.tokenizer.decode(supervised[:-1])
        assert ("[SEG]" in text) == (row < 2)
    assert [g.shape[0] for g in batch.gt_masks] == [1, 1, 0]
    assert batch.gt_masks[0].sum().item() == 40 * 60


# ---------------------------------------------------------------------------------------------- losses
def test_lisa_dice_and_bce_match_hand_computation():
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # numerator 2 * 0.5/1000 = 0.001; denominator 4*0.5/1000 + 1/1000 = 0.003
    assert dice_loss(logits, target, 1).item() == pytest.approx(1 - (0.001 + 1e-6) / (0.003 + 1e-6), rel=1e-5)
    assert sigmoid_ce_loss(logits, target, 1).item() == pytest.approx(math.log(2), rel=1e-6)
    confident = torch.tensor([[[20.0, -20.0], [-20.0, -20.0]]])
    bce, dice = mask_losses([confident, logits], [target, target])
    assert bce.item() == pytest.approx(math.log(2) / 2, rel=1e-3)
    assert dice.item() == pytest.approx((1 - (0.001 + 1e-6) / (0.003 + 1e-6)) / 2, rel=1e-3)


# ------------------------------------------------------------------------------------------ checkpoints
def test_save_load_round_trip(base, tmp_path):
    mllm, sam = base
    model = create_seg_token_model(mllm, sam, seed=2)
    seg_token_train_step(model, make_batch(model, _samples(), random.Random(1)), make_optimizer(model, lr=1e-2))
    save_seg_token_model(model, tmp_path / "seg")
    loaded = load_seg_token_model(tmp_path / "seg", mllm, sam)
    saved, restored = trained_state(model), trained_state(loaded)
    assert saved.keys() == restored.keys() and any(k.startswith("lora.") for k in saved)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert loaded.config.trained_steps == 1
    images = [_image(6), _image(7, (96, 160))]
    first = predict(model, images, ["the red circle", "the blue square"], protocol="teacher-forced")
    second = predict(loaded, images, ["the red circle", "the blue square"], protocol="teacher-forced")
    for a, b in zip(first, second):
        assert np.array_equal(a.masks, b.masks) and a.scores == pytest.approx(b.scores, abs=1e-5)


def test_load_refuses_other_models(base, tmp_path):
    mllm, sam = base
    model = create_seg_token_model(mllm, sam, seed=0)
    save_seg_token_model(model, tmp_path / "seg")
    other_mllm = build_mllm("random:tiny", device="cpu", dtype=None, quantization=None, seed=1)
    with pytest.raises(CheckpointMismatchError, match="MLLM"):
        load_seg_token_model(tmp_path / "seg", other_mllm, sam)
    other_sam = build_sam("tiny", None, device="cpu")
    other_sam.sam.mask_decoder.iou_token.weight.data += 1.0
    with pytest.raises(CheckpointMismatchError, match="SAM"):
        load_seg_token_model(tmp_path / "seg", mllm, other_sam)
    (tmp_path / "seg" / CONFIG_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointMismatchError, match="unreadable"):
        load_seg_token_model(tmp_path / "seg", mllm, sam)
    with pytest.raises(CheckpointMismatchError, match="not a \\[SEG\\] model"):
        load_seg_token_model(tmp_path / "nothing", mllm, sam)


# ------------------------------------------------------------------------------------------------ route
def test_route_returns_segmentation_results_at_image_size(base, model):
    from llavaseg.models.components import Components
    from llavaseg.prompting import PromptSet
    from llavaseg.results import SegmentationResult
    from llavaseg.routes.registry import RouteContext, build_route

    mllm, sam = base
    context = RouteContext(Components(mllm, sam, None, None, untrained=("seg_token",)), PromptSet.load(),
                           options={"max_new_tokens": 4})
    route = build_route("seg-token", context)
    images = [_image(8, (100, 150)), _image(9)]
    results = route(images, ["the red circle", "the circle that has the same colour as the square"])
    assert all(isinstance(r, SegmentationResult) for r in results)
    assert results[0].mask.shape == (100, 150) and results[1].mask.shape == (128, 128)
    assert results[0].route == "seg-token" and results[0].raw_outputs["protocol"] == "generate"
    assert "[SEG]" not in results[0].description and isinstance(results[0].answer, str)
    assert results[1].prompts["segment"].endswith("Please output segmentation mask. ASSISTANT:")
    forced = build_route("seg-token", RouteContext(Components(mllm, sam, None, None, untrained=("seg_token",)),
                                                   PromptSet.load(),
                                                   options={"teacher_forced": True}))
    tf = forced(images, ["the red circle", "the blue square"])
    assert [r.raw_outputs["seg_count"] for r in tf] == ["1", "1"] and tf[0].mask.shape == (100, 150)
    dialogue = route.dialogue_model()
    assert isinstance(dialogue, FrozenMLLM) and dialogue.model is not mllm.model
    assert "[SEG]" in dialogue.tokenizer.get_vocab()


def test_segmenter_switches_to_the_seg_token_route_without_touching_shared_models():
    from llavaseg.segmenter import Segmenter

    segmenter = Segmenter.from_preset("tiny")
    shared = {k: v.clone() for k, v in segmenter.mllm.model.state_dict().items()}
    seg = segmenter.with_route("seg-token", teacher_forced=True)
    result = seg(np.zeros((50, 70, 3), np.uint8), "the red circle")
    assert result.mask.shape == (50, 70) and result.raw_outputs["protocol"] == "teacher-forced"
    assert seg.route.model.llava is not segmenter.mllm.model and seg.mllm is segmenter.mllm
    assert all(torch.equal(v, segmenter.mllm.model.state_dict()[k]) for k, v in shared.items())
