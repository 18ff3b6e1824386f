"""LISA's mask losses (sigmoid BCE + Dice), one implementation for every trainer in the project.

LISA (``model/LISA.py``) trains with ``L = 1.0 * CE + 2.0 * BCE + 0.5 * Dice``, each mask compared with its ground
truth at the ground truth's original resolution:

* ``BCE_m`` = mean over the mask's pixels of ``binary_cross_entropy_with_logits``;
* ``Dice_m = 1 - (2 * sum(p/s * t) + eps) / (sum(p/s) + sum(t/s) + eps)`` with ``p = sigmoid(logits)``,
  LISA's ``scale s = 1000`` and ``eps = 1e-6`` (the scale is kept so figures stay comparable with LISA's);
* over a batch: summed over masks and divided by the number of masks.

Ground-truth value 255 marks *ignored* pixels (ReasonSeg's "ignore" polygons): where a mask has any, BCE is
averaged over the valid pixels only and both Dice sums skip them. LISA itself trains on ``mask == 1`` and so
treats them as background; the two agree whenever a mask has no 255 pixel.

The per-mask functions reduce the last two dimensions, so one call scores a single ``H x W`` mask, a batch
``N x H x W`` or the ``N x K x H x W`` multimask output of a SAM decoder. ``scale``/``eps`` are parameters because
the tiny SAM recipe uses the same Dice with ``scale=1, eps=1`` (the usual smoothed Dice).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from llavaseg.errors import InputError

__all__ = ["IGNORE_VALUE", "DICE_SCALE", "DICE_EPS", "LossWeights", "per_mask_bce", "per_mask_dice",
           "sigmoid_bce_loss", "dice_loss", "mask_loss", "sigmoid_ce_loss", "lisa_dice_loss", "mask_losses"]

IGNORE_VALUE = 255
DICE_SCALE = 1000.0
DICE_EPS = 1e-6
_REDUCE = (-2, -1)


class LossWeights(BaseModel):
    """Weights of LISA's three loss terms (``train_ds.py`` defaults)."""

    model_config = ConfigDict(frozen=True)

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


# ------------------------------------------------------------------------------------------------ per mask
def per_mask_bce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE-with-logits over each mask's (valid) pixels: ``(..., H, W) -> (...)``."""
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if valid is None:
        return per_pixel.mean(dim=_REDUCE)
    return (per_pixel * valid).sum(dim=_REDUCE) / valid.sum(dim=_REDUCE).clamp(min=1.0)


def per_mask_dice(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None, *,
                  scale: float = DICE_SCALE, eps: float = DICE_EPS) -> torch.Tensor:
    """Dice loss of each mask with LISA's ``scale``/``eps``: ``(..., H, W) -> (...)``."""
    probs = logits.sigmoid()
    if valid is not None:
        probs = probs * valid
        targets = targets * valid
    numerator = 2 * (probs / scale * targets).sum(dim=_REDUCE)
    denominator = (probs / scale).sum(dim=_REDUCE) + (targets / scale).sum(dim=_REDUCE)
    return 1 - (numerator + eps) / (denominator + eps)


# ------------------------------------------------------------------- one mask with 0/1/255 ground truth
def _prepare(logits: torch.Tensor, target: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
    if logits.shape[-2:] != target.shape[-2:]:
        raise InputError(f"logits {tuple(logits.shape)} and mask {tuple(target.shape)} differ in size; "
                         "upsample logits to the ground-truth resolution first")
    logits = logits.reshape(target.shape[-2:]).float()
    valid = target != IGNORE_VALUE
    return logits, (target == 1).to(logits.dtype), valid.to(logits.dtype)


def sigmoid_bce_loss(logits: torch.Tensor, target: torch.Tensor | np.ndarray) -> torch.Tensor:
    """BCE of ONE ``H x W`` mask against a 0/1/255 ground truth (ignore pixels excluded)."""
    logits, target, valid = _prepare(logits, target)
    return per_mask_bce(logits, target, valid)


def dice_loss(logits: torch.Tensor, target: torch.Tensor | np.ndarray, scale: float = DICE_SCALE,
              eps: float = DICE_EPS) -> torch.Tensor:
    """Dice of ONE ``H x W`` mask against a 0/1/255 ground truth (ignore pixels excluded)."""
    logits, target, valid = _prepare(logits, target)
    return per_mask_dice(logits, target, valid, scale=scale, eps=eps)


def mask_loss(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor | np.ndarray], *,
              bce_weight: float = 2.0, dice_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, bce, dice)`` averaged over masks, each at its own (original) resolution, as LISA."""
    if len(logits) != len(targets) or not logits:
        raise InputError(f"{len(logits)} predictions for {len(targets)} masks")
    bce = torch.stack([sigmoid_bce_loss(l, t) for l, t in zip(logits, targets)]).mean()
    dice = torch.stack([dice_loss(l, t) for l, t in zip(logits, targets)]).mean()
    return bce_weight * bce + dice_weight * dice, bce, dice


# ------------------------------------------------------------------- LISA's batched form (float targets)
def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """LISA's ``sigmoid_ce_loss``: per-mask mean BCE of ``N x H x W`` logits, summed, over ``num_masks``."""
    return per_mask_bce(inputs, targets).sum() / (num_masks + 1e-8)


def lisa_dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, scale: float = DICE_SCALE,
                   eps: float = DICE_EPS) -> torch.Tensor:
    """LISA's ``dice_loss``: per-mask Dice of ``N x H x W`` logits, summed, over ``num_masks``."""
    return per_mask_dice(inputs, targets, scale=scale, eps=eps).sum() / (num_masks + 1e-8)


def mask_losses(pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted BCE and Dice over a batch of images, weighted by masks per image exactly as LISA's
    ``model_forward``; ``pred_masks[i]`` are logits ``n_i x H_i x W_i``, ``gt_masks[i]`` float targets."""
    bce = pred_masks[0].new_zeros(())
    dice = pred_masks[0].new_zeros(())
    num_masks = 0
    for pred, gt in zip(pred_masks, gt_masks):
        if pred.shape != gt.shape:
            raise InputError(f"predicted masks {tuple(pred.shape)} do not match ground truth {tuple(gt.shape)}")
        n = gt.shape[0]
        if n == 0:
            continue
        bce = bce + sigmoid_ce_loss(pred, gt, num_masks=n) * n
        dice = dice + lisa_dice_loss(pred, gt, num_masks=n) * n
        num_masks += n
    return bce / (num_masks + 1e-8), dice / (num_masks + 1e-8)
