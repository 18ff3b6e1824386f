"""One optimiser step of the adapters on cached frozen features (what ``benchmarks/train_step.py`` times)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llavaseg.losses import mask_loss
from llavaseg.method.segment import predict_logits
from llavaseg.models.adapters import MultiScaleAdapters
from llavaseg.models.sam import FrozenSAM, SamImageFeatures

__all__ = ["adapter_train_step"]


def adapter_train_step(adapters: MultiScaleAdapters, sam: FrozenSAM, optimizer: torch.optim.Optimizer,
                       features: Sequence[SamImageFeatures], texts: Sequence[torch.Tensor],
                       masks: Sequence[np.ndarray | torch.Tensor], *, bce_weight: float = 2.0,
                       dice_weight: float = 0.5, grad_clip: float | None = 1.0,
                       scheduler: Any = None) -> tuple[float, float, float]:
    """One optimiser step on a batch of cached samples; returns ``(loss, bce, dice)`` as floats.

    Public so ``benchmarks/train_step.py`` can time exactly what training does.
    """
    adapters.train()
    logits = predict_logits(adapters, sam, features, texts)
    device_masks = [torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).to(sam.device)
                    for m in masks]
    loss, bce, dice = mask_loss(logits, device_masks, bce_weight=bce_weight, dice_weight=dice_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(adapters.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach()), float(bce.detach()), float(dice.detach())
