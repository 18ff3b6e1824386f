"""LISA's training losses (``model/LISA.py``, anchors §2.2): text CE 1.0 + mask BCE 2.0 + mask Dice 0.5.

The Dice loss keeps LISA's odd ``scale=1000`` (predictions and targets are divided by 1000 inside the sums),
which changes the effective epsilon: with the scale, ``1e-6`` is no longer negligible for tiny masks. Masks are
compared at the ground truth's original resolution, after upsampling the decoder output (as LISA does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

CE_WEIGHT = 1.0
BCE_WEIGHT = 2.0
DICE_WEIGHT = 0.5


class LossWeights(BaseModel):
    """Weights of the three loss terms (LISA's defaults)."""

    model_config = ConfigDict(frozen=True)

    ce: float = CE_WEIGHT
    bce: float = BCE_WEIGHT
    dice: float = DICE_WEIGHT


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, scale: float = 1000.0,
              eps: float = 1e-6) -> torch.Tensor:
    """LISA's Dice on logits ``N x H x W``: ``1 - (2 sum(p/s t) + eps) / (sum(p/s) + sum(t/s) + eps)``, summed
    over masks and divided by ``num_masks``."""
    probs = inputs.sigmoid().flatten(1, 2)
    targets = targets.flatten(1, 2)
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    loss = 1 - (numerator + eps) / (denominator + eps)
    return loss.sum() / (num_masks + 1e-8)


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """LISA's BCE on logits ``N x H x W``: mean over pixels per mask, summed over masks / ``num_masks``."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)


def mask_losses(pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted BCE and Dice over a batch, weighted by masks per image exactly as LISA's ``model_forward``.

    ``pred_masks[i]`` are logits ``n_i x H_i x W_i`` and ``gt_masks[i]`` float targets of the same shape.
    """
    bce = pred_masks[0].new_zeros(())
    dice = pred_masks[0].new_zeros(())
    num_masks = 0
    for pred, gt in zip(pred_masks, gt_masks):
        if pred.shape != gt.shape:
            raise ValueError(f"predicted masks {tuple(pred.shape)} do not match ground truth {tuple(gt.shape)}")
        n = gt.shape[0]
        if n == 0:
            continue
        bce = bce + sigmoid_ce_loss(pred, gt, num_masks=n) * n
        dice = dice + dice_loss(pred, gt, num_masks=n) * n
        num_masks += n
    return bce / (num_masks + 1e-8), dice / (num_masks + 1e-8)
