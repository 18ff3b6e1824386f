"""Running a ``[SEG]`` model on images: the two evaluation protocols of LISA (``docs/lisa.md`` §5).

* ``generate`` (LISA's ``evaluate()`` / ``chat.py``): greedy generation from the user prompt; each generated
  ``[SEG]`` yields a mask from the last-layer hidden state of the generated position that predicted it. The
  model may emit no ``[SEG]`` (empty mask) or several (one mask each; the route reports their union).
* ``teacher-forced`` (LISA's ``validate()``, which produced its published val numbers): the assistant turn is
  pre-filled with ``"[SEG]."`` and ONE forward pass is run; ``[SEG]`` is never generated (issue #145), so this
  measures the mask path alone and always yields exactly one mask per query.

Both go through the same extraction (:func:`~llavaseg.seg_token.model.select_seg_hidden`). For generation the
per-step hidden states returned by ``generate`` are concatenated (prompt block, then one row per generated
token but the last) so they align 1:1 with ``sequences[:, :-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from llavaseg.errors import UnsupportedError
from llavaseg.models.mllm import check_no_control_tokens, control_tokens
from llavaseg.seg_token.model import SegTokenModel, select_seg_hidden
from llavaseg.seg_token.prompts import (
    LISA,
    QueryStyle,
    TemplateSet,
    looks_like_sentence,
    validation_request,
)

Protocol = Literal["generate", "teacher-forced"]


@dataclass
class SegPass:
    """What one query produced before decoding masks: text, ``[SEG]`` hidden states and the prompt used."""

    prompt: str
    text: str
    hidden: torch.Tensor  # n_seg x H (last layer, predicting positions)
    token_ids: list[int] = field(default_factory=list)


def chat_messages(user_text: str, answer: str | None = None) -> list[dict[str, Any]]:
    """One user turn with the image first (as ``FrozenMLLM.render_chat``), optionally the assistant's answer."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render(processor: Any, user_text: str, answer: str | None = None) -> str:
    """Chat-template text: with ``answer`` the full exchange, without it the prompt awaiting generation."""
    return processor.apply_chat_template(chat_messages(user_text, answer), add_generation_prompt=answer is None,
                                         tokenize=False)


def request_text(query: str, style: QueryStyle = "auto", templates: TemplateSet = LISA) -> str:
    """LISA's validation request for ``query`` (sentence or phrase template; ``auto`` guesses)."""
    is_sentence = looks_like_sentence(query) if style == "auto" else style == "long"
    return validation_request(query, is_sentence, templates)


def _left_padded_inputs(model: SegTokenModel, images: list[np.ndarray], texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = model.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = model.processor(images=[Image.fromarray(image) for image in images], text=texts,
                                 return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {key: value.to(model.device) for key, value in inputs.items()}


def _pad_id(model: SegTokenModel) -> int:
    tokenizer = model.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def generate_pass(model: SegTokenModel, images: list[np.ndarray], user_texts: list[str], *,
                  max_new_tokens: int = 32, **generate_kwargs: Any) -> list[SegPass]:
    """Greedy generation; hidden states of the generated positions that predict each ``[SEG]``.

    ``generate_kwargs`` go to ``generate`` (e.g. ``sequence_bias`` to force tokens in tests)."""
    prompts = [render(model.processor, text) for text in user_texts]
    inputs = _left_padded_inputs(model, images, prompts)
    llava = model.llava
    inputs["pixel_values"] = inputs["pixel_values"].to(llava.dtype)
    output = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            output_hidden_states=True, return_dict_in_generate=True, pad_token_id=_pad_id(model),
                            **generate_kwargs)
    sequences = output.sequences
    start = inputs["input_ids"].shape[1]
    steps = output.hidden_states  # per step: tuple over layers of B x t x H
    hidden = torch.cat([step[-1] for step in steps], dim=1)  # aligned with sequences[:, :-1]
    hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], sequences.shape[1] - hidden.shape[1],
                                                 hidden.shape[2])], dim=1)
    rows = select_seg_hidden(hidden, sequences, model.seg_token_id, start=start)
    tokenizer = model.tokenizer
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    passes = []
    for index, row_hidden in enumerate(rows):
        ids = sequences[index, start:].tolist()
        for cut, token in enumerate(ids):
            if token in stop:
                ids = ids[:cut]
                break
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        passes.append(SegPass(prompt=prompts[index], text=text, hidden=row_hidden[: ids.count(model.seg_token_id)],
                              token_ids=ids))
    return passes


@torch.inference_mode()
def teacher_forced_pass(model: SegTokenModel, images: list[np.ndarray], user_texts: list[str]) -> list[SegPass]:
    """LISA ``validate()``: the assistant turn is ``"[SEG]."``; one forward pass, one ``[SEG]`` per query."""
    answer = model.templates.teacher_forced_answer
    texts = [render(model.processor, text, answer) for text in user_texts]
    inputs = _left_padded_inputs(model, images, texts)
    llava = model.llava
    # Left padding shifts absolute positions; give each row positions counted from its first real token.
    position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    output = llava(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=inputs["pixel_values"].to(llava.dtype), position_ids=position_ids,
                   output_hidden_states=True, use_cache=False)
    rows = select_seg_hidden(output.hidden_states[-1], inputs["input_ids"], model.seg_token_id)
    # The pre-filled answer ends the text, so its [SEG] is the row's last one (a "[SEG]" typed into the query
    # would come earlier and is ignored).
    return [SegPass(prompt=text, text=answer, hidden=hidden[-1:]) for text, hidden in zip(texts, rows)]


@dataclass
class SegPrediction:
    """One query's outcome: masks per ``[SEG]``, their predicted IoUs, and the text around them."""

    prompt: str
    text: str
    masks: np.ndarray  # n x H x W bool
    scores: list[float]

    @property
    def union(self) -> np.ndarray:
        return self.masks.any(axis=0)


@torch.inference_mode()
def predict(model: SegTokenModel, images: list[np.ndarray], queries: list[str], *,
            protocol: Protocol = "generate", style: QueryStyle | list[QueryStyle] = "auto", max_new_tokens: int = 32
            ) -> list[SegPrediction]:
    """Masks for a batch of (image, query) pairs with one of LISA's two protocols.

    ``style`` picks LISA's phrase (``short``) or sentence (``long``) template, per batch or per query (evaluation
    passes the data set's ``is_sentence`` flags, as LISA's ``ValDataset`` does)."""
    styles = list(style) if isinstance(style, (list, tuple)) else [style] * len(queries)
    if len(styles) != len(queries):
        raise ValueError(f"{len(styles)} query styles for {len(queries)} queries")
    was_training = model.training
    model.eval()
    try:
        user_texts = [request_text(query, s, model.templates) for query, s in zip(queries, styles)]
        tokens = control_tokens(model.processor)
        for text in user_texts:
            check_no_control_tokens(text, tokens)
        if protocol == "teacher-forced":
            if model.config.answer_style != "lisa":
                raise UnsupportedError("teacher forcing pre-fills LISA's answer; a model that writes attributes "
                                       "before [SEG] is evaluated by generation only")
            passes = teacher_forced_pass(model, images, user_texts)
        elif protocol == "generate":
            passes = generate_pass(model, images, user_texts, max_new_tokens=max_new_tokens)
        else:
            raise ValueError(f"unknown protocol {protocol!r}; use 'generate' or 'teacher-forced'")
        features = model.sam.encode_batch(images)
        predictions = []
        for image, feature, seg in zip(images, features, passes):
            logits, iou = model.decode(feature, model.project(seg.hidden))
            masks = (logits > model.sam.mask_threshold).cpu().numpy()
            if masks.shape[0] == 0:
                masks = np.zeros((0, image.shape[0], image.shape[1]), dtype=bool)
            predictions.append(SegPrediction(prompt=seg.prompt, text=seg.text, masks=masks,
                                             scores=[float(v) for v in iou.cpu()]))
        return predictions
    finally:
        model.train(was_training)
