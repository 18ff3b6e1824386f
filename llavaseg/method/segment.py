"""Step 3 of the method: description + attribute phrases -> frozen text encoder -> adapters -> frozen SAM.

Inference, the feature cache and training all call these functions, so the phrases a model is trained on are
exactly the ones it sees at inference, and the decoder call is the same differentiable path in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llavaseg.attributes import Attributes
from llavaseg.models.adapters import MultiScaleAdapters
from llavaseg.models.common import autocast_for
from llavaseg.models.sam import FrozenSAM, SamImageFeatures
from llavaseg.models.text_encoder import FrozenTextEncoder

__all__ = ["text_phrases", "pad_text", "encode_phrases", "adapter_mask_logits", "predict_logits"]


def text_phrases(description: str, attributes: Attributes, use_attributes: bool, max_tokens: int) -> list[str]:
    """What the text encoder embeds for one query: the description first, then one phrase per attribute."""
    phrases = [description]
    if use_attributes:
        phrases += attributes.phrases()
    return phrases[:max_tokens]


def pad_text(texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ``T_i x D`` phrase embeddings -> ``B x T x D`` plus a ``B x T`` validity mask."""
    width = max(t.shape[0] for t in texts)
    out = torch.zeros((len(texts), width, texts[0].shape[-1]))
    mask = torch.zeros((len(texts), width), dtype=torch.bool)
    for row, text in enumerate(texts):
        out[row, : text.shape[0]] = text
        mask[row, : text.shape[0]] = True
    return out, mask


def encode_phrases(encoder: FrozenTextEncoder, phrase_lists: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ragged phrase lists into ``B x T x D`` with a ``B x T`` validity mask."""
    flat = encoder.encode_text([phrase for phrases in phrase_lists for phrase in phrases])
    rows, offset = [], 0
    for phrases in phrase_lists:
        rows.append(flat[offset: offset + len(phrases)])
        offset += len(phrases)
    return pad_text(rows)


def adapter_mask_logits(adapters: MultiScaleAdapters, sam: FrozenSAM, features: list[SamImageFeatures],
                        text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits (``B x 1 x 4g x 4g``) and predicted IoU (``B x 1``) for one prompt per image.

    Differentiable in the adapters' parameters (training uses it unchanged).
    """
    device = sam.device
    levels = [torch.cat([f.levels[i] for f in features]).to(device) for i in range(len(features[0].levels))]
    embedding = torch.cat([f.embedding for f in features]).to(device)
    with autocast_for(device):
        sparse, dense_delta = adapters(text.to(device), text_mask.to(device), levels, embedding)
    sparse = sparse.float()
    dense_delta = dense_delta.float() if dense_delta is not None else None
    dense = sam.no_mask_dense(len(features))
    if dense_delta is not None:
        dense = dense + dense_delta
    # SAM's decoder takes one image embedding with any number of prompt rows: decode all queries on the same
    # image in one call, and loop over distinct images.
    groups: dict[int, list[int]] = {}
    for index, feature in enumerate(features):
        groups.setdefault(id(feature), []).append(index)
    logits: list[torch.Tensor | None] = [None] * len(features)
    ious: list[torch.Tensor | None] = [None] * len(features)
    for rows in groups.values():
        low, iou = sam.decode(features[rows[0]], sparse[rows], dense[rows], multimask_output=False)
        for position, row in enumerate(rows):
            logits[row], ious[row] = low[position: position + 1], iou[position: position + 1]
    return torch.cat(logits), torch.cat(ious)


def predict_logits(adapters: MultiScaleAdapters, sam: FrozenSAM, features: Sequence[SamImageFeatures],
                   texts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Adapters -> frozen decoder -> logits at each image's original size (``H x W`` each), differentiable."""
    device = sam.device
    features = [f.to(device) for f in features]
    text, text_mask = pad_text(texts)
    low_res, _ = adapter_mask_logits(adapters, sam, list(features), text, text_mask)
    return [sam.upscale(low_res[i: i + 1], f)[0, 0] for i, f in enumerate(features)]
