"""One training step of the ``[SEG]`` model, exactly as LISA's ``model_forward`` + ``train_ds.py`` do it.

A batch is a list of conversations ``USER: <image>\\n{LISA question} ASSISTANT: {LISA answer with [SEG]}</s>``
(plus, optionally, plain VQA conversations without ``[SEG]``, LISA's ``vqa`` data). The language-model loss is
the usual next-token cross-entropy on the assistant's tokens only; each ``[SEG]`` gives a mask (see
:mod:`llavaseg.seg_token.model`) compared with its ground truth at original resolution by BCE and Dice.

:func:`seg_token_train_step` is the public single-step function (``benchmarks/train_step.py`` times it against
an adapter step): forward, weighted loss, backward, gradient clipping at 1.0, optimiser step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from llavaseg.errors import InputError, TemplateError
from llavaseg.losses import LossWeights, mask_losses
from llavaseg.models.sam import SamImageFeatures
from llavaseg.seg_token.inference import render
from llavaseg.seg_token.model import SegTokenModel, select_seg_hidden
from llavaseg.seg_token.prompts import SEG_TOKEN, training_answer, training_request
from llavaseg.train.schedule import lambda_scheduler

IGNORE_INDEX = -100


@dataclass
class SegSample:
    """One training conversation: a segmentation query with its mask, or (``mask=None``) a VQA pair."""

    image: np.ndarray
    query: str
    is_sentence: bool = False
    mask: np.ndarray | None = None  # H x W, values 0/1 (255 = ignore, treated as background like LISA's labels)
    answer: str | None = None  # VQA answer; segmentation answers are drawn from LISA's list
    attributes: str | None = None  # the target's attribute sentence (answers of attributes-first models)


@dataclass
class SegTokenBatch:
    """Tensors of one step. ``gt_masks[i]`` is ``n_i x H x W`` (``n_i`` = number of ``[SEG]`` in row ``i``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    features: list[SamImageFeatures]
    gt_masks: list[torch.Tensor]
    texts: list[str]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode_conversation(model: SegTokenModel, image: np.ndarray, user_text: str, answer: str
                        ) -> tuple[list[int], list[int], torch.Tensor, str]:
    """Token ids, labels (assistant part only) and pixel values of one conversation."""
    full = render(model.processor, user_text, answer)
    prompt = render(model.processor, user_text)
    encoded = model.processor(images=[Image.fromarray(image)], text=[full], return_tensors="pt")
    ids = encoded["input_ids"][0].tolist()
    image_token = model.processor.image_token
    image_id = model.tokenizer.convert_tokens_to_ids(image_token)
    expanded = prompt.replace(image_token, image_token * ids.count(image_id))
    prompt_ids = model.tokenizer(expanded, add_special_tokens=True)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError("the chat template tokenises the prompt differently with and without the answer; "
                            "cannot mask the prompt out of the language-model loss")
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return ids, labels, encoded["pixel_values"], full


def make_batch(model: SegTokenModel, samples: list[SegSample], rng: random.Random,
               features: list[SamImageFeatures] | None = None) -> SegTokenBatch:
    """Build one right-padded batch (LISA pads right for training). SAM features come from the shared
    ``FrozenSAM.encode_batch`` cache unless given."""
    if not samples:
        raise InputError("a training batch needs at least one sample")
    rows, label_rows, pixels, texts, gts = [], [], [], [], []
    for sample in samples:
        if sample.mask is None:
            if sample.answer is None:
                raise InputError(f"sample {sample.query!r} has neither a mask nor a VQA answer")
            user_text, answer = sample.query, sample.answer
        else:
            user_text = training_request(sample.query, sample.is_sentence, rng, model.templates)
            answer = training_answer(rng, model.templates, model.config.answer_style, sample.attributes)
        ids, labels, pixel_values, text = encode_conversation(model, sample.image, user_text, answer)
        n_seg = ids.count(model.seg_token_id)
        expected = 0 if sample.mask is None else 1
        if n_seg != expected:
            raise InputError(f"conversation holds {n_seg} {SEG_TOKEN} tokens, expected {expected}: {text!r}")
        rows.append(ids)
        label_rows.append(labels)
        pixels.append(pixel_values)
        texts.append(text)
        if sample.mask is None:
            gts.append(torch.zeros((0, *sample.image.shape[:2])))
        else:
            gts.append(torch.from_numpy((np.asarray(sample.mask) == 1).astype(np.float32))[None])
    width = max(len(row) for row in rows)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for index, (row, label) in enumerate(zip(rows, label_rows)):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention[index, : len(row)] = 1
        labels[index, : len(row)] = torch.tensor(label)
    if features is None:
        features = model.sam.encode_batch([sample.image for sample in samples])
    return SegTokenBatch(input_ids=input_ids, attention_mask=attention, labels=labels,
                         pixel_values=torch.cat(pixels), features=list(features), gt_masks=gts, texts=texts)


def seg_token_losses(model: SegTokenModel, batch: SegTokenBatch, weights: LossWeights = LossWeights()
                     ) -> dict[str, torch.Tensor]:
    """LISA's weighted losses for one batch: ``loss = ce*1.0 + bce*2.0 + dice*0.5`` (weights as given)."""
    device = model.device
    llava = model.llava
    output = llava(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                   pixel_values=batch.pixel_values.to(device, dtype=llava.dtype), labels=batch.labels.to(device),
                   output_hidden_states=True, use_cache=False)
    rows = select_seg_hidden(output.hidden_states[-1], batch.input_ids.to(device), model.seg_token_id)
    preds, gts = [], []
    for hidden, feature, gt in zip(rows, batch.features, batch.gt_masks):
        if hidden.shape[0] != gt.shape[0]:
            raise InputError(f"{hidden.shape[0]} {SEG_TOKEN} tokens but {gt.shape[0]} ground-truth masks")
        if gt.shape[0] == 0:
            continue
        logits, _ = model.decode(feature, model.project(hidden), size=(gt.shape[1], gt.shape[2]))
        preds.append(logits)
        gts.append(gt.to(device, dtype=logits.dtype))
    ce = output.loss * weights.ce
    if preds:
        bce, dice = mask_losses(preds, gts)
    else:
        bce = dice = ce.new_zeros(())
    bce, dice = bce * weights.bce, dice * weights.dice
    return {"loss": ce + bce + dice, "ce": ce, "bce": bce, "dice": dice}


def make_optimizer(model: SegTokenModel, lr: float = 3e-4) -> torch.optim.AdamW:
    """LISA's optimiser: AdamW, betas (0.9, 0.95), no weight decay, over the trainable parameters only."""
    return torch.optim.AdamW(list(model.trainable_parameters().values()), lr=lr, betas=(0.9, 0.95),
                             weight_decay=0.0)


def warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, last_epoch: int = -1
                 ) -> torch.optim.lr_scheduler.LambdaLR:
    """LISA's DeepSpeed ``WarmupDecayLR``: linear warm-up from 0, then linear decay to 0 at ``total_steps``."""
    return lambda_scheduler(optimizer, warmup=warmup_steps, total=total_steps, schedule="linear",
                            last_epoch=last_epoch)


ClipMode = Literal["global", "per-group"]


def seg_token_train_step(model: SegTokenModel, batch: SegTokenBatch, optimizer: torch.optim.Optimizer, *,
                         scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, max_grad_norm: float = 1.0,
                         weights: LossWeights = LossWeights(), clip: ClipMode = "global") -> float:
    """One optimiser step; returns the weighted total loss.

    ``clip="global"`` is LISA's (one norm over every trainable tensor, at 1.0). ``"per-group"`` clips the
    language and the mask path each at ``max_grad_norm``: when the text loss is large (a vocabulary the model
    does not know) the global norm is all text gradient, and clipping it scales the mask path's share down with
    it (measured ~1/70 early on the tiny world)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    losses = seg_token_losses(model, batch, weights)
    losses["loss"].backward()
    groups = model.parameter_groups().values() if clip == "per-group" else [
        [p for p in model.parameters() if p.requires_grad]]
    for group in groups:
        if group:
            torch.nn.utils.clip_grad_norm_(group, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    model.bump_version()
    model.config.trained_steps += 1
    return float(losses["loss"].detach())
